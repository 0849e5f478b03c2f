#!/usr/bin/env bash
# Everything a lent GPU is for, in one call of at most ~12 minutes (issue 23), on a
# machine with torch but no SimpleITK and no network, from an upload of <= 64 MiB
# (the code, the crop banks and training_runs/):
#   1. the training benchmark: the reference and the fast trainer side by side;
#   2. the bundled runs continued from their committed state (training_runs/), side by
#      side, for TRAIN_SECONDS each (the epoch running then ends first);
#   3. the inference benchmark (bench/engine_device.py).
# Writes under OUT: gpu.log, training-bench.json, engine.json, and training_runs/
# (each run's checkpoint and log.csv) to copy back and commit.
#   scripts/gpu_run.sh BANK_DIR OUT [TRAIN_SECONDS]
# Tested on the CPU with a tiny budget: DEVICE=cpu scripts/gpu_run.sh BANK OUT 5
set -u
BANK=$1; OUT=$2; TRAIN_SECONDS=${3:-420}; DEVICE=${DEVICE:-cuda}; SLICES=${SLICES:-300}
RUNS=${RUNS:-"all no-cptac no-lidc1"}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
# STATE: the runs' committed state to go on from (default: the repository's training_runs/)
cp -r "${STATE:-training_runs}" "$OUT/training_runs" 2>/dev/null || mkdir -p "$OUT/training_runs"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nvidia-smi 2>/dev/null --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== 1. training benchmark (reference vs fast trainer, $DEVICE)"
for trainer in reference fast; do
  timeout 150 "$PY" - "$trainer" "$DEVICE" "$OUT" <<'PY'
import json, sys, tempfile
from pathlib import Path
from ILDSegmentationLib.commands.bench import _worker_training
trainer, device, out = sys.argv[1:4]
cpu = device == "cpu"
spec = {"device": device, "trainer": trainer, "train_shapes": [[96, 80]] if cpu else [[224, 160], [320, 240]],
        "train_epochs": 1 if cpu else 3, "train_crops": 2 if cpu else 64, "batch_size": 1 if cpu else 16,
        "out": tempfile.mkdtemp()}
r = _worker_training(spec)
print(json.dumps(r))
with open(Path(out) / "training-bench.jsonl", "a") as f:
    f.write(json.dumps(r) + "\n")
PY
  echo "training bench $trainer: exit $?"
done

echo "== 2. bundled runs, ${TRAIN_SECONDS} s each, side by side"
declare -A EXCLUDE=([all]="" [no-cptac]="cptac-lscc-c3n-00247" [no-lidc1]="lidc-idri-0001")
declare -A INIT=([all]="--init ILDSegmentationLib/models/default.safetensors" [no-cptac]="" [no-lidc1]="")
pids=()
for name in $RUNS; do
  ( timeout $((TRAIN_SECONDS + 120)) "$PY" scripts/train_bundled_model.py train --bank "$BANK" \
      --out "$OUT/training_runs/$name" --device "$DEVICE" --time-limit "$TRAIN_SECONDS" ${INIT[$name]} \
      ${TRAIN_ARGS:-} ${EXCLUDE[$name]:+--exclude ${EXCLUDE[$name]}} > "$OUT/train-$name.log" 2>&1
    echo "$name: exit $? $(tail -n 1 "$OUT/train-$name.log")" ) &
  pids+=($!)
done
# The runs only: a bare `wait` would also wait for the log's tee (bash >= 5.1), forever.
wait "${pids[@]}"
for name in $RUNS; do rm -f "$OUT/training_runs/$name"/{model.safetensors,learning_curves.png,confusion.png}; done

echo "== 3. inference benchmark ($DEVICE, $SLICES slices)"
timeout 150 "$PY" bench/engine_device.py --device "$DEVICE" --slices "$SLICES" --json "$OUT/engine.json" \
    > "$OUT/engine.log" 2>&1
echo "engine bench: exit $?"; tail -n 12 "$OUT/engine.log"
ls -la "$OUT" "$OUT/training_runs"/*
