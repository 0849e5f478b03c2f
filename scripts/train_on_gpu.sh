#!/usr/bin/env bash
# The bundled model's training on one GPU machine that has torch but no SimpleITK and
# no CT files: three runs side by side from the crop banks that
# `scripts/train_bundled_model.py prepare` wrote (the shipped model on all six CTs, and
# the two leave-one-CT-out models), then the engine's speed on that GPU.
#   scripts/train_on_gpu.sh BANK_DIR OUT_DIR [SECONDS_OF_TRAINING]
# Writes OUT_DIR/result.tgz (run folders, logs, engine-cuda.json).
set -u
BANK=$1; OUT=$2; LIMIT=${3:-400}; DEVICE=${DEVICE:-cuda}; SLICES=${SLICES:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONUNBUFFERED=1
W=$(mktemp -d)
mkdir -p "$W/runs" "$OUT"
# RUNS=DIR: run folders of an earlier call (their checkpoints) to go on from (--resume)
if [ -n "${RUNS:-}" ]; then cp -r "$RUNS"/. "$W/runs/"; fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nvidia-smi 2>/dev/null --query-gpu=name,memory.total,driver_version --format=csv,noheader
train() {  # name, then the CTs to leave out
  local name=$1; shift
  timeout $((LIMIT + 150)) python3 scripts/train_bundled_model.py train --bank "$BANK" --out "$W/runs/$name" \
      --device "$DEVICE" --time-limit "$LIMIT" ${TRAIN_ARGS:-} ${1:+--exclude "$@"} > "$W/runs/$name.log" 2>&1
  echo "$name: exit $? $(tail -n 1 "$W/runs/$name.log")"
}
train all &
train no-cptac cptac-lscc-c3n-00247 &
train no-lidc1 lidc-idri-0001 &
wait
timeout 120 python3 bench/engine_device.py --device "$DEVICE" --slices "$SLICES" --json "$W/engine-cuda.json" > "$W/engine-cuda.log" 2>&1
echo "bench: exit $?"
tail -n 20 "$W/engine-cuda.log"
for f in "$W"/runs/*.log; do echo "== $f"; grep -E "crops|best|time limit" "$f" | tail -n 4; done
tar czf "$OUT/result.tgz" -C "$W" .
ls -la "$OUT"
