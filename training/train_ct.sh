#!/usr/bin/env bash
# Trains (or resumes) a candidate of the shipped CT prior on the TCGA-LUAD HU slices:
#   training/train_ct.sh whole|patch|native [STEPS] [DATA]
# whole: the position-aware LeanUNet on whole 128-px slices; patch: the same network with Patch
# Diffusion (32/64-px crops with their coordinates, whole slices half of the steps); native: the same
# network on 64/128-px crops of the slices at their own 512-px grid (0.54-0.78 mm pixels), never on
# whole slices (it denoises a 512-px slice tile by tile, as it was trained; mediff.denoiser.Tiled). 8 patients are
# held out (the same split for both: same seed). Watch val.csv: on whole slices held-out PSNR peaks
# at step 2000 and falls after it (the network memorises its 63 slices); the patch run (shipped as
# `ct` at step 5600) was still improving slowly at low noise there. Equivalent CLI (patch):
#   mediff train --data ../shared/data/ct_tcga/ct_hu_512.npz --out training/ct-patch --size 128 --batch 16 \
#     --steps 9000 --val-subjects 8 --intensity hu --position --patch-sizes 32,64 --full-prob 0.5 [--resume]
#
# DECAY=N finishes the run with a learning rate falling linearly to 0 over its last N steps, on a copy
# (training/ct-KIND-decayN, seeded from the constant-rate run's checkpoint; the constant-rate run stays
# resumable). Tried: DECAY=1400 training/train_ct.sh patch 7800 (from step 6400) ended with lower
# held-out validation PSNR than its start (training/ct-patch-decay1400/val.csv), so it was not shipped.
set -euo pipefail
cd "$(dirname "$0")/.."
DECAY=${DECAY:-0}
KIND=${1:?whole or patch}
STEPS=${2:-9000}
DATA=${3:-../shared/data}
case "$KIND" in
  whole) extra=(--size 128 --batch 16) ;;
  patch) extra=(--size 128 --batch 16 --patch-sizes 32,64 --full-prob 0.5) ;;
  native) extra=(--size 512 --batch 2 --patch-sizes 64,128 --full-prob 0 --checkpoint-every 100 --val-every 1000) ;;
  *) echo "usage: $0 whole|patch|native [STEPS] [DATA]" >&2; exit 2 ;;
esac
out=training/ct-$KIND
if [ "$DECAY" -gt 0 ]; then
  source training/decay_copy.sh
  decay_copy "$out" "$out-decay$DECAY"; out=$out-decay$DECAY
fi
resume=""; { [ -f "$out/checkpoint.safetensors" ] || [ -f "$out/resume.safetensors" ]; } && resume="--resume"
exec .venv/bin/python -m mediff train --data "$DATA/ct_tcga/ct_hu_512.npz" --out "$out" \
  --steps "$STEPS" --val-subjects 8 --val-every 200 --intensity hu --position "${extra[@]}" --no-progress --decay-steps "$DECAY" $resume
