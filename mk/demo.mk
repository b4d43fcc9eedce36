# `make demo`: a model from the bundled cookie images in a few minutes on a laptop CPU, then the server.
#   make demo                             train runs/demo (if models/demo/model.onnx is missing), export, serve
#   make demo DEMO_SERVE_ARGS="--port 9000 --host 0.0.0.0"
#   make demo-model                       only train + export (no server)
# The short run (DEMO_STEPS) shows the whole path working; it is not a trained detector. Without the
# bundled distilled teacher (training/assets/teacher_small.safetensors) the teacher is random.
DEMO_DATA ?= samples/cookie
# about 2-3 s per step at 256 px on two CPU cores, plus ~20 s of statistics and evaluation
DEMO_STEPS ?= 50
DEMO_IMAGE_SIZE ?= 256
DEMO_TEACHER_FILE := training/assets/teacher_small.safetensors
DEMO_TEACHER ?= $(if $(wildcard $(DEMO_TEACHER_FILE)),,random)
DEMO_SERVE_ARGS ?=

.PHONY: demo demo-model

demo: demo-model
	$(EAD) serve $(DEMO_MODEL) $(DEMO_SERVE_ARGS)

demo-model: $(DEMO_MODEL)/model.onnx

$(DEMO_RUN)/checkpoint.json: | install
	$(EAD) train $(DEMO_DATA) --out $(DEMO_RUN) --steps $(DEMO_STEPS) --image-size $(DEMO_IMAGE_SIZE) \
		$(if $(DEMO_TEACHER),--teacher $(DEMO_TEACHER)) --force

$(DEMO_MODEL)/model.onnx: $(DEMO_RUN)/checkpoint.json
	$(EAD) export $(DEMO_RUN) --out $(DEMO_MODEL) --force
