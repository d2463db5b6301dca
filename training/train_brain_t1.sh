#!/usr/bin/env bash
# Trains (or resumes) the shipped brain-t1 prior. Equivalent CLI:
#   mediff train --data ../shared/data/ixi_t1/ixi_t1_axial_128.npz \
#     --covariates ../shared/data/ixi_t1/participants.csv --out training/brain-t1 --size 128 --batch 16 \
#     --steps 100000 --val-subjects 20 --pixel-spacing 2 [--resume]
# (--pixel-spacing: the IXI slices are 2 mm, which the npz does not record; the prior keeps it so that
# reconstruct can warn when a scan's pixel differs.)
# STEPS=S DECAY=N finishes the run at step S with a learning rate falling linearly to 0 over its last N
# steps, on a copy (training/brain-t1-decayN, seeded from the constant-rate run's state; that run stays
# resumable).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
STEPS=${STEPS:-100000}
DECAY=${DECAY:-0}
out=training/brain-t1
if [ "$DECAY" -gt 0 ]; then
  source training/decay_copy.sh
  decay_copy "$out" "$out-decay$DECAY"; out=$out-decay$DECAY
fi
# Resumes from the full local checkpoint, else from the committed compact resume.safetensors.
resume=""; { [ -f "$out/checkpoint.safetensors" ] || [ -f "$out/resume.safetensors" ]; } && resume="--resume"
exec .venv/bin/python -m mediff train --data "$DATA/ixi_t1/ixi_t1_axial_128.npz" \
  --covariates "$DATA/ixi_t1/participants.csv" --out "$out" --size 128 --batch 16 \
  --steps "$STEPS" --val-subjects 20 --pixel-spacing 2 --no-progress --decay-steps "$DECAY" $resume
