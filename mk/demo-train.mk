# Training on the bundled sample (samples/cookie): a short smoke run and its evaluation.
# A real run: make train-sample TRAIN_ARGS="--teacher teachers/s.safetensors --steps 70000 --device cuda"
TRAIN_SAMPLE_RUN ?= runs/sample
TRAIN_ARGS ?= --teacher random --steps 20 --image-size 64 --device cpu

.PHONY: train-sample evaluate-sample

train-sample: install
	$(EAD) train samples/cookie --out $(TRAIN_SAMPLE_RUN) --penalty-dir samples/natural --force $(TRAIN_ARGS)

evaluate-sample: install
	$(EAD) evaluate $(TRAIN_SAMPLE_RUN) samples/cookie --json $(TRAIN_SAMPLE_RUN)/evaluation.json
