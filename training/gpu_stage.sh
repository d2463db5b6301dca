#!/usr/bin/env bash
# Stages this checkout for a device-tool call that trains on a lent GPU (training/gpu_brain_t1.sh),
# and undoes it. The device tool sends the working tree (tracked and untracked-not-ignored files plus
# `carry`) only up to 64 MiB; the tracked weights and resume states alone are ~120 MB.
#   training/gpu_stage.sh hide [DATA]   # data -> gpu_carry/ (gitignored); tracked *.safetensors -> ../.mediff-stash
#   then: device run, command "bash training/gpu_brain_t1.sh 8", carry ["gpu_carry"], timeout_s 600
#   training/gpu_stage.sh restore FILES_AT   # tracked files back; the GPU run's state -> training/brain-t1-gpu/
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=../.mediff-stash
case "${1:-}" in
  hide)
    DATA=${2:-../shared/data}
    mkdir -p gpu_carry "$STASH"
    cp "$DATA/ixi_t1/ixi_t1_axial_128.npz" "$DATA/ixi_t1/participants.csv" gpu_carry/
    git ls-files -z '*.safetensors' | while IFS= read -r -d '' f; do
      mkdir -p "$STASH/$(dirname "$f")"; mv "$f" "$STASH/$f"
    done
    du -sh --exclude=.git --exclude=.venv . ;;
  restore)
    FILES=${2:?FILES_AT: the folder the device tool fetched the run files into}
    git ls-files -z '*.safetensors' | while IFS= read -r -d '' f; do
      if [ -f "$STASH/$f" ]; then mv "$STASH/$f" "$f"; else git checkout -- "$f"; fi
    done
    run=training/brain-t1-gpu
    mkdir -p "$run"
    cat "$FILES"/resume.safetensors.part-* > "$run/resume.safetensors"
    cp "$FILES/prior.safetensors" "$FILES/prior.json" "$FILES/resume.json" "$run/"
    tar xzf "$FILES/logs.tgz" -C "$run"
    git status --short ;;
  *) echo "usage: $0 hide [DATA] | restore FILES_AT" >&2; exit 2 ;;
esac
