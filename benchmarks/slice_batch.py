"""Slices of a volume solved one run per slice vs several slices per run (``recon.run.run_batch``, the
way ``mediff reconstruct`` solves a volume): wall time per slice, single-coil x4 DDS, on consecutive
slices of a tuning subject's volume (what ``recon.volume.BATCH_IMAGES`` was chosen on).

Each slice keeps its own task (operator, phase, scale) either way; the batched run only lets the
network denoise the slices together. Same seeds, same steps; the first run warms up and is dropped.

    cd benchmarks && python slice_batch.py --data ../../shared/data --slices 8 --steps 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine, write_table
from mri import split_subjects
from mediff.prior import load_prior
from mediff.recon import MRIOptions
from mediff.recon.mri import mri_source
from mediff.recon.run import run_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../../shared/data"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--slices", type=int, default=8, help="consecutive slices from the volume's middle")
    ap.add_argument("--batches", default="1,4,8", help="slices per solver run to compare")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prior = load_prior(args.model)
    subject = split_subjects(prior)[0][0]
    source = mri_source(args.data / "ixi_t1" / "volumes" / f"{subject}_T1.nii.gz", prior.image_size, MRIOptions())
    mid = source.n // 2
    tasks = [source.build(k) for k in range(mid - args.slices // 2, mid - args.slices // 2 + args.slices)]
    rows = []
    for size in [int(b) for b in args.batches.split(",")]:
        for rep in range(2):  # rep 0 warms up
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(tasks), size):
                    run_batch(tasks[i: i + size], "dds", prior, args.steps, seed=i)
            if rep:
                rows.append({"slices_per_run": size, "seconds_per_slice": (time.perf_counter() - t0) / len(tasks),
                             "steps": args.steps, "subject": subject})
    write_table("slice_batch", rows, {**machine(), "slices": args.slices, "model": args.model})


if __name__ == "__main__":
    main()
