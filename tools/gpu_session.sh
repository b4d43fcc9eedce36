#!/usr/bin/env bash
# One prepared GPU session (issue 12): distil the teacher at full scale, train EfficientAD-S with it and
# with a random teacher (baseline) in parallel, evaluate both, bench the backends and the training speed.
# Everything lands in $OUT: the teacher, the fp16 cookie checkpoint of each run (commit the better one as
# samples/models/cookie), evaluations, bench JSON/Markdown, logs.
# Tested on the CPU first with tiny settings:
#   OUT=/tmp/o DATA=samples DEVICE=cpu DISTILL_STEPS=2 DISTILL_IMAGE=64 DISTILL_CROP=32 TRAIN_STEPS=2 \
#     TRAIN_IMAGE=64 BENCH_BATCHES=1 BENCH_ARGS="--no-training --repeats 1 --iterations 1" tools/gpu_session.sh
set -uo pipefail
OUT=${OUT:?set OUT}
DATA=${DATA:-.gpu/data}
DISTILL_STEPS=${DISTILL_STEPS:-6000}
DISTILL_BATCH=${DISTILL_BATCH:-16}
DISTILL_IMAGE=${DISTILL_IMAGE:-256}
DISTILL_CROP=${DISTILL_CROP:-$DISTILL_IMAGE}
TRAIN_STEPS=${TRAIN_STEPS:-10000}
TRAIN_IMAGE=${TRAIN_IMAGE:-256}
BENCH_ARGS=${BENCH_ARGS:-}
BENCH_BATCHES=${BENCH_BATCHES:-1,2,4,8,16,32,64}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
ead() { "$PY" -m efficientad --log-level WARNING "$@"; }
work=$(mktemp -d)
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  "$PY" -c 'import torch, onnxruntime; print("torch", torch.__version__, "ort", onnxruntime.__version__)'
} > "$OUT/summary.txt" 2>&1

start=$(date +%s)
ead distill "$DATA/natural" --backbone efficientnet-lite0 --out "$OUT/teacher_small.safetensors" \
  --steps "$DISTILL_STEPS" --batch-size "$DISTILL_BATCH" --image-size "$DISTILL_IMAGE" \
  --crop-size "$DISTILL_CROP" --device "$DEVICE" > "$work/distill.log" 2>&1
echo "distill rc=$? seconds=$(( $(date +%s) - start ))" >> "$OUT/summary.txt"

start=$(date +%s)
ead train "$DATA/cookie" --out "$work/run_teacher" --teacher "$OUT/teacher_small.safetensors" \
  --penalty-dir "$DATA/natural" --steps "$TRAIN_STEPS" --image-size "$TRAIN_IMAGE" --device "$DEVICE" \
  --checkpoint-dtype float16 > "$work/train_teacher.log" 2>&1 &
p1=$!
ead train "$DATA/cookie" --out "$work/run_random" --teacher random \
  --penalty-dir "$DATA/natural" --steps "$TRAIN_STEPS" --image-size "$TRAIN_IMAGE" --device "$DEVICE" \
  --checkpoint-dtype float16 > "$work/train_random.log" 2>&1 &
p2=$!
wait $p1; r1=$?; wait $p2; r2=$?
echo "train teacher rc=$r1 random rc=$r2 seconds=$(( $(date +%s) - start ))" >> "$OUT/summary.txt"

for run in run_teacher run_random; do
  ead evaluate "$work/$run" "$DATA/cookie" --device "$DEVICE" --json "$work/eval_$run.json" \
    >> "$work/evaluate.log" 2>&1
  echo "evaluate $run rc=$?" >> "$OUT/summary.txt"
done
"$PY" - "$work" "$OUT" <<'PY'
import json, sys, pathlib
work, out = map(pathlib.Path, sys.argv[1:])
runs = {}
for run in ("run_teacher", "run_random"):
    entry = {}
    for name, path in (("evaluation", work / f"eval_{run}.json"), ("checkpoint", work / run / "checkpoint.json")):
        entry[name] = json.loads(path.read_text()) if path.exists() else None
    runs[run] = entry
(out / "runs.json").write_text(json.dumps(runs, indent=2))
PY
# the trained models, fp16 already (--checkpoint-dtype float16: ~16 MB, small enough to commit)
for run in run_teacher run_random; do
  mkdir -p "$OUT/$run" && cp "$work/$run"/checkpoint.* "$OUT/$run/" 2>/dev/null
done

start=$(date +%s)
ead bench --gpu --run-dir "$work/run_teacher" --batch-sizes "$BENCH_BATCHES" --no-http $BENCH_ARGS \
  --out "$work/bench" > "$work/bench.log" 2>&1
echo "bench rc=$? seconds=$(( $(date +%s) - start ))" >> "$OUT/summary.txt"
cp "$work"/bench/*.json "$work"/bench/*.md "$OUT/" 2>/dev/null
tail -c 3000 "$work/distill.log" "$work/train_teacher.log" "$work/train_random.log" "$work/evaluate.log" \
  "$work/bench.log" > "$OUT/logs.txt" 2>&1
cat "$OUT/summary.txt"
