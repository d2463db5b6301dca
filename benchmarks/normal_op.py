"""Multi-coil A^H A side by side: the FFT normal operator vs ``mri.MagnitudeMRI``'s per-row matrices.

On slices of the tuning subjects of ``mri.py`` (8 simulated coils, ESPIRiT maps, 1D random mask with an
8 % centre), one run times each variant's ``normal`` (median ms per call at batch 1) and a whole solve
(``--solvers``, 50 NFE, seed per slice), and scores both solves, so the PSNR shows the two are the same
operator. ``time_over_NFE_x_forward`` as in ``mri.py`` (one batch-1 forward timed next to every slice).

    cd benchmarks && python normal_op.py --data ../../shared/data --n 4
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from common import machine, write_table
from mri import forward_seconds, median_seconds, tuning_slices
from mediff.prior import load_prior
from mediff.recon import MRIOptions, run_solver, simulate_mri

# MRITask.row_gram: A^H A by FFTs (False) or by the per-row matrices the pipeline uses (True).
VARIANTS = {"fft": False, "row matrices": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--n", type=int, default=4, help="slices")
    ap.add_argument("--accels", default="4,8")
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--solvers", default="dds,ddnm,dps")
    ap.add_argument("--name", default="normal_op")
    args = ap.parse_args()
    prior = load_prior(args.model)
    imgs, subjects = tuning_slices(prior, args.data, args.n)
    rows = []
    for accel in (float(a) for a in args.accels.split(",")):
        acc: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for i, img in enumerate(imgs):
            task = simulate_mri(img, MRIOptions(accel=accel, coils=args.coils), seed=i)
            fwd = forward_seconds(prior)
            x1 = torch.randn(1, 1, *task.shape, generator=torch.Generator().manual_seed(i))
            for variant, row_gram in VARIANTS.items():
                t = dataclasses.replace(task, row_gram=row_gram)
                op = t.solver_operator()
                ms = 1e3 * median_seconds(lambda: op.normal(x1), reps=50)
                acc.setdefault((variant, "normal"), []).append((np.nan, ms, np.nan))
                for m in args.solvers.split(","):
                    r = run_solver(t, m, prior, seed=i)
                    acc.setdefault((variant, m), []).append((t.score(r.mean)["PSNR"], r.seconds,
                                                             r.seconds / (r.nfe * fwd)))
            print(f"x{accel:g} slice {i + 1}/{len(imgs)}", flush=True)
        for (variant, what), v in acc.items():
            psnr, sec, ratio = (np.array(c) for c in zip(*v))
            row = {"accel": accel, "normal": variant, "method": what}
            if what == "normal":
                row["ms_per_call"] = float(sec.mean())
            else:
                row.update(PSNR=float(psnr.mean()), s_per_slice=float(sec.mean()),
                           time_over_NFE_x_forward=float(ratio.mean()))
            rows.append(row)
    write_table(args.name, rows, {**machine(), "model": args.model, "slices": args.n, "coils": args.coils,
                                  "subjects": subjects})


if __name__ == "__main__":
    main()
