#!/usr/bin/env bash
# One prepared GPU session (issue 21): distil the teacher at full scale (>= 100,000 images seen), check it
# against its target on every data set (efficientad teacher-check), train EfficientAD-S with it by the
# paper's recipe on every data set at once (steps cut to fit a device call, learning curve every
# EVAL_EVERY steps), bench the backends and the training speed. Everything lands in $OUT: the teacher,
# the teacher checks, the fp16 checkpoint of each run (with its curve and scores), bench JSON/Markdown, logs.
# Tested on the CPU first with tiny settings:
#   OUT=/tmp/o DATA=samples DATASETS=cookie DEVICE=cpu DISTILL_STEPS=2 DISTILL_IMAGE=64 DISTILL_CROP=48 \
#     TRAIN_STEPS=2 EVAL_EVERY=1 TRAIN_IMAGE=64 BENCH_BATCHES=1 \
#     BENCH_ARGS="--no-training --repeats 1 --iterations 1" tools/gpu_session.sh
set -uo pipefail
OUT=${OUT:?set OUT}
DATA=${DATA:-.gpu/data}
DISTILL_STEPS=${DISTILL_STEPS:-7000}  # x DISTILL_BATCH 16 = 112,000 images seen
DISTILL_BATCH=${DISTILL_BATCH:-16}
DISTILL_IMAGE=${DISTILL_IMAGE:-256}
DISTILL_CROP=${DISTILL_CROP:-$DISTILL_IMAGE}
DISTILL_TARGET=${DISTILL_TARGET:-lite0-s8s16}  # Lite0's stride-8 and -16 stages, as the paper's layer2 + layer3
TRAIN_STEPS=${TRAIN_STEPS:-10000}  # the paper: 70,000 (about 35 min alone on an H200)
EVAL_EVERY=${EVAL_EVERY:-1000}
DATASETS=${DATASETS:-cookie elpv/mono elpv/poly}
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
ead distill "$DATA/natural" --target "$DISTILL_TARGET" --out "$OUT/teacher_small.safetensors" \
  --steps "$DISTILL_STEPS" --batch-size "$DISTILL_BATCH" --image-size "$DISTILL_IMAGE" \
  --crop-size "$DISTILL_CROP" --device "$DEVICE" > "$work/distill.log" 2>&1
echo "distill rc=$? seconds=$(( $(date +%s) - start ))" >> "$OUT/summary.txt"

for data in $DATASETS; do
  ead teacher-check "$OUT/teacher_small.safetensors" "$DATA/$data" --image-size "$TRAIN_IMAGE" \
    --device "$DEVICE" --json "$OUT/teacher_check_${data//\//_}.json" >> "$work/teacher_check.log" 2>&1
  echo "teacher-check $data rc=$?" >> "$OUT/summary.txt"
done

start=$(date +%s)
pids=()
for data in $DATASETS; do  # the paper's recipe (steps cut to fit a device call), all data sets at once
  name=${data//\//_}
  ead train "$DATA/$data" --out "$work/run_$name" --recipe paper --teacher "$OUT/teacher_small.safetensors" \
    --penalty-dir "$DATA/natural" --steps "$TRAIN_STEPS" --image-size "$TRAIN_IMAGE" --device "$DEVICE" \
    --eval-every "$EVAL_EVERY" --checkpoint-dtype float16 > "$work/train_$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; echo "train pid $pid rc=$?" >> "$OUT/summary.txt"; done
echo "train seconds=$(( $(date +%s) - start ))" >> "$OUT/summary.txt"

"$PY" - "$work" "$OUT" $DATASETS <<'PY'
import json, sys, pathlib
work, out = map(pathlib.Path, sys.argv[1:3])
runs = {}
for data in sys.argv[3:]:
    path = work / f"run_{data.replace('/', '_')}" / "checkpoint.json"
    runs[data] = json.loads(path.read_text()) if path.exists() else None
(out / "runs.json").write_text(json.dumps(runs, indent=2))
PY
# the trained models, fp16 already (--checkpoint-dtype float16: ~16 MB, small enough to commit)
for data in $DATASETS; do
  name=${data//\//_}
  mkdir -p "$OUT/run_$name" && cp "$work/run_$name"/checkpoint.* "$OUT/run_$name/" 2>/dev/null
done

start=$(date +%s)
ead bench --gpu --run-dir "$work/run_cookie" --batch-sizes "$BENCH_BATCHES" --no-http $BENCH_ARGS \
  --out "$work/bench" > "$work/bench.log" 2>&1
echo "bench rc=$? seconds=$(( $(date +%s) - start ))" >> "$OUT/summary.txt"
cp "$work"/bench/*.json "$work"/bench/*.md "$OUT/" 2>/dev/null
tail -c 3000 "$work"/*.log > "$OUT/logs.txt" 2>&1
cat "$OUT/summary.txt"
