# Reliability: `make soak` (long open-loop load on the real server), `make fuzz` (atheris on the image
# path), `make reliability` (fault injection, fuzzing, security and a short soak as tests).
# `make soak` holds 80% of a null model's capacity (the server's own limit) for 10 minutes; e.g.
#   make soak DURATION=900 RATE_FRACTION=0.7 SOAK_ARGS="--model-dir models/demo"
#   make fuzz FUZZ_SECONDS=1800
DURATION ?= 600
RATE_FRACTION ?= 0.8
SOAK_ARGS ?= --null-model
FUZZ_SECONDS ?= 600
FUZZ_DIR ?= runs/fuzz  # runs/ is git-ignored

.PHONY: soak fuzz reliability

soak: install
	$(PYTHON) -m benchmarks.soak --duration $(DURATION) --fraction $(RATE_FRACTION) $(SOAK_ARGS)

fuzz: install
	mkdir -p $(FUZZ_DIR)/corpus $(FUZZ_DIR)/findings
	$(PYTHON) fuzz/fuzz_imaging.py --make-seeds $(FUZZ_DIR)/corpus
	cp tests/reliability/fuzz_regressions/edge-* $(FUZZ_DIR)/corpus/
	$(PYTHON) fuzz/fuzz_imaging.py $(FUZZ_DIR)/corpus -max_total_time=$(FUZZ_SECONDS) -max_len=65536 \
		-print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/findings/

reliability: install
	$(PYTHON) -m pytest tests/reliability -q
