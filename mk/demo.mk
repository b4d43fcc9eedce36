# `make demo`: the shipped cookie model (samples/models/cookie, trained with the shipped teacher) exported
# and served at once, no training. CPU ONNX Runtime where there is no GPU.
#   make demo                             export samples/models/cookie -> models/demo (once), serve
#   make demo DEMO_SERVE_ARGS="--port 9000 --host 0.0.0.0"
#   make demo-model                       only the export (no server)
#   make demo-train                       train a cookie model from scratch on samples/cookie, export, serve
#   make demo-train DEMO_STEPS=1000 DEMO_DATA=../shared/data/cookie
SHIPPED_CHECKPOINT := samples/models/cookie
# the shipped model; a checkout without it (an older one) trains runs/demo first, as demo-train does
DEMO_CHECKPOINT ?= $(if $(wildcard $(SHIPPED_CHECKPOINT)/checkpoint.json),$(SHIPPED_CHECKPOINT),$(DEMO_RUN))
DEMO_SERVE_ARGS ?=
# demo-train: 128 px like the shipped model; about 0.6 s per step on two CPU cores, plus ~30 s of
# statistics and evaluation. Without the bundled teacher (training/assets/teacher_small.safetensors) the
# teacher is random and the model is not a detector.
DEMO_DATA ?= samples/cookie
DEMO_STEPS ?= 300
DEMO_IMAGE_SIZE ?= 128
DEMO_TRAIN_MODEL ?= models/demo-train
DEMO_TEACHER_FILE := training/assets/teacher_small.safetensors
DEMO_TEACHER ?= $(if $(wildcard $(DEMO_TEACHER_FILE)),,random)

.PHONY: demo demo-model demo-train demo-train-model

demo: demo-model
	$(EAD) serve $(DEMO_MODEL) $(DEMO_SERVE_ARGS)

demo-model: $(DEMO_MODEL)/model.onnx

$(DEMO_MODEL)/model.onnx: $(DEMO_CHECKPOINT)/checkpoint.json | install
	$(EAD) export $(DEMO_CHECKPOINT) --out $(DEMO_MODEL) --force

demo-train: demo-train-model
	$(EAD) serve $(DEMO_TRAIN_MODEL) $(DEMO_SERVE_ARGS)

demo-train-model: $(DEMO_TRAIN_MODEL)/model.onnx

$(DEMO_RUN)/checkpoint.json: | install
	$(EAD) train $(DEMO_DATA) --out $(DEMO_RUN) --steps $(DEMO_STEPS) --image-size $(DEMO_IMAGE_SIZE) \
		--penalty-dir samples/natural $(if $(DEMO_TEACHER),--teacher $(DEMO_TEACHER)) --force

$(DEMO_TRAIN_MODEL)/model.onnx: $(DEMO_RUN)/checkpoint.json
	$(EAD) export $(DEMO_RUN) --out $(DEMO_TRAIN_MODEL) --force
