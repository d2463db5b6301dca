#!/usr/bin/env bash
# Trains (or resumes) the shipped brain-t1 prior. Equivalent CLI:
#   mediff train --data ../shared/data/ixi_t1/ixi_t1_axial_128.npz \
#     --covariates ../shared/data/ixi_t1/participants.csv --out training/brain-t1 --size 128 --batch 16 \
#     --steps 100000 --val-subjects 20 [--resume]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
# Resumes from the full local checkpoint, else from the committed compact resume.safetensors.
resume=""; { [ -f training/brain-t1/checkpoint.safetensors ] || [ -f training/brain-t1/resume.safetensors ]; } && resume="--resume"
exec .venv/bin/python -m mediff train --data "$DATA/ixi_t1/ixi_t1_axial_128.npz" \
  --covariates "$DATA/ixi_t1/participants.csv" --out training/brain-t1 --size 128 --batch 16 \
  --steps 100000 --val-subjects 20 --no-progress $resume
