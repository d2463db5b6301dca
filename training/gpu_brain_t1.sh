#!/usr/bin/env bash
# Runs ON a lent GPU machine (the device tool), from the repository root: trains a brain-t1 candidate
# from scratch for MINUTES, then leaves in $OUT what comes back (at most 8 files of <= 16 MiB each):
# the EMA prior, the compact resume state split into 15 MiB parts, and the logs.
#   training/gpu_brain_t1.sh [MINUTES] [BATCH]
# The device machine's python3 has torch, safetensors, typer, rich, numpy, matplotlib and pillow,
# which is all `mediff train` imports on NPZ data; the data travel in gpu_carry/ (training/gpu_stage.sh).
# Why from scratch: the 128-px NPZ (59 MB) and the CPU run's compact state (32 MB) do not fit the
# device tool's 64 MiB working tree together. A dry run here: DEVICE=cpu PY=.venv/bin/python CKPT=1 VAL=2
# OUT=/tmp/o training/gpu_brain_t1.sh 0.5 4 (in a clone staged by training/gpu_stage.sh hide).
# Back here, `training/gpu_stage.sh restore FILES_AT` puts the run in training/brain-t1-gpu/, and the
# CPU continues it with the same command as train_brain_t1.sh plus --out training/brain-t1-gpu
# --batch BATCH --resume; training/ship_prior.py training/brain-t1-gpu brain-t1 ships it (its card
# quotes the CPU command in CARDS: add this one).
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-8}
BATCH=${2:-64}
RUN=training/brain-t1-gpu
: "${OUT:?set OUT (the device tool sets it)}"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# timeout stops the run mid-step; checkpoints are atomic, so the last one is whole.
timeout --signal=TERM "${MINUTES}m" "$PY" -m mediff train --data gpu_carry/ixi_t1_axial_128.npz \
  --covariates gpu_carry/participants.csv --out "$RUN" --size 128 --batch "$BATCH" --steps 10000000 \
  --val-subjects 20 --pixel-spacing 2 --checkpoint-every "${CKPT:-250}" --val-every "${VAL:-1000}" --no-progress --device "${DEVICE:-cuda}"
echo "train exit $? (124 = stopped by the time limit)"
"$PY" -c "from pathlib import Path; from mediff.train import compact_checkpoint; compact_checkpoint(Path('$RUN'))" || exit 1
split -b 15M "$RUN/resume.safetensors" "$OUT/resume.safetensors.part-"
cp "$RUN/prior.safetensors" "$RUN/prior.json" "$RUN/resume.json" "$OUT/"
logs=$(cd "$RUN" && ls train.csv val.csv 2>/dev/null) || true  # a short run may not have logged yet
tar czf "$OUT/logs.tgz" -C "$RUN" $logs
ls -l "$OUT"
