"""ESPIRiT's support threshold (``crop``: keep pixels whose top eigenvalue exceeds it) side by side.

On slices of the tuning subjects of ``mri.py`` (8 simulated coils, x4), for each mask kind (its own
calibration region, ``recon.mri.calib_region``) and each ``--crops`` value, the maps are estimated with
that threshold and one DDS solve (50 NFE, seed per slice) and the zero-filled image are scored, with the
fraction of the image inside the maps' support and the fraction of the reference's signal energy that
falls outside it (signal there cannot be explained by A, whatever the solver does).

    cd benchmarks && python espirit_crop.py --data ../../shared/data --n 4
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from common import machine, write_table
from mri import tuning_slices
from mediff.physics.mri import MultiCoilMRI, estimate_coil_maps, lowres_phase
from mediff.prior import load_prior
from mediff.recon import MRIOptions, run_solver, simulate_mri
from mediff.recon.mri import ESPIRIT_CROP, calib_region, espirit_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--n", type=int, default=4, help="slices")
    ap.add_argument("--masks", default="random1d,radial,poisson2d")
    ap.add_argument("--crops", default="0.95,0.9,0.8")
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--name", default="espirit_crop")
    args = ap.parse_args()
    prior = load_prior(args.model)
    imgs, subjects = tuning_slices(prior, args.data, args.n)
    rows = []
    for mask_kind in args.masks.split(","):
        acc: dict[float, list[tuple[float, ...]]] = {}
        for i, img in enumerate(imgs):
            task = simulate_mri(img, MRIOptions(accel=4.0, mask=mask_kind, coils=args.coils), seed=i)
            region = calib_region(task.mask)
            kspace = task.y[0] * task.scale
            ref = task.reference[0, 0].numpy()
            for crop in (float(c) for c in args.crops.split(",")):
                op = MultiCoilMRI(task.mask, estimate_coil_maps(kspace, region, kernel_size=espirit_kernel(region),
                                                                crop=crop))
                inside = op.support[0, 0].bool().numpy()
                t = dataclasses.replace(task, op=op, phase=lowres_phase(task.y, op, region), support=op.support)
                dds = t.score(run_solver(t, "dds", prior, 50, seed=i).mean)["PSNR"]
                zf = t.score(run_solver(t, "zero-filled").mean)["PSNR"]
                acc.setdefault(crop, []).append((dds, zf, inside.mean(), (ref[~inside] ** 2).sum() / (ref ** 2).sum()))
            print(f"{mask_kind} slice {i + 1}/{len(imgs)}: " +
                  "  ".join(f"crop {c:g} dds {v[-1][0]:.2f}" for c, v in acc.items()), flush=True)
        for crop, v in acc.items():
            dds, zf, frac, outside = np.array(v).T
            rows.append({"mask": mask_kind, "crop": crop, "shipped": crop == ESPIRIT_CROP, "dds_PSNR": float(dds.mean()),
                         "dds_PSNR_min": float(dds.min()), "zero_filled_PSNR": float(zf.mean()),
                         "support_fraction": float(frac.mean()), "signal_outside": float(outside.mean())})
    write_table(args.name, rows, {**machine(), "model": args.model, "slices": args.n, "coils": args.coils,
                                  "accel": 4, "subjects": subjects})


if __name__ == "__main__":
    main()
