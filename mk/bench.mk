# `make bench`: milliseconds per part and parts per second, per backend, side by side (benchmarks/).
# Results: benchmarks/results/<device>-<date>.json + .md + .png. Pass more flags with BENCH_ARGS, e.g.
#   make bench BENCH_ARGS="--model-dir models/demo --duration 20"
BENCH_ARGS ?=
BENCH_GPU_BATCH_SIZES ?= 1,2,4,8,16,32,64

.PHONY: bench bench-gpu

bench: install
	$(EAD) bench $(BENCH_ARGS)

bench-gpu: install
	$(EAD) bench --gpu --batch-sizes $(BENCH_GPU_BATCH_SIZES) $(BENCH_ARGS)
