# Export stage (export/): checkpoint -> model dir (model.onnx + model.json) -> TensorRT engine.
#   make export-model                 models/demo from runs/demo (override EXPORT_RUN / EXPORT_MODEL)
#   make engine                       TensorRT FP16 engine for this GPU in $(EXPORT_MODEL)/engines/ (needs the gpu extra)
#   make test-export                  the export tests alone (TensorRT tests skip without TensorRT + a GPU)
EXPORT_RUN ?= $(DEMO_RUN)
EXPORT_MODEL ?= $(DEMO_MODEL)
ENGINE_MAX_BATCH ?= 32

.PHONY: export-model engine test-export

export-model: install
	$(EAD) export $(EXPORT_RUN) --out $(EXPORT_MODEL) --force

engine: install
	$(EAD) engine $(EXPORT_MODEL) --max-batch $(ENGINE_MAX_BATCH)

test-export: install
	$(PYTHON) -m pytest tests/export -q
