"""MRI reconstruction benchmark on held-out IXI subjects: every solver and baseline side by side.

The prior's validation subjects (never trained on) are split: the first ``--tune-subjects`` (sorted)
tune the baselines' regularisation weights (``--tune``), the rest are evaluated. k-space is simulated
from the magnitude slices (single-coil, or C coils with ESPIRiT re-estimated maps), 1D random masks
with an 8 % fully-sampled centre, one mask seed per slice.

    python benchmarks/mri.py --data ../shared/data --model brain-t1 --tune
    python benchmarks/mri.py --data ../shared/data --model brain-t1 --n-slices 50 --accels 4,8 --coils 1,8

``--samples K``: every diffusion solver draws K posterior samples per slice (one batch) and is scored
on their mean, the estimate ``mediff reconstruct --samples K`` writes (NFE stays per sample).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, heldout_slices, machine, write_table
from mediff.prior import load_prior
from mediff.recon import BASELINES, DEFAULT_LAMBDA, run_solver, score, simulate_task

LAMBDA_GRID = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1)


def forward_seconds(prior, reps: int = 5) -> float:
    x, s = torch.rand(1, 1, prior.image_size, prior.image_size), torch.full((1,), 0.5)
    with torch.no_grad():
        prior(x, s)
        t0 = time.perf_counter()
        for _ in range(reps):
            prior(x, s)
    return (time.perf_counter() - t0) / reps


def tune(images: np.ndarray, accel: float, coils: int) -> dict[str, float]:
    """Per baseline, the weight of LAMBDA_GRID with the best mean PSNR on the tuning slices."""
    out = {}
    for method in ("tv", "l1wavelet"):
        means = {}
        for lam in LAMBDA_GRID:
            ps = [score(t, run_solver(t, method, lam=lam).mean)["PSNR"]
                  for t in (simulate_task(im, accel, seed=1000 + i, coils=coils) for i, im in enumerate(images))]
            means[lam] = float(np.mean(ps))
            print(f"tune {method} lam={lam:g}: PSNR {means[lam]:.2f}", flush=True)
        out[method] = max(means, key=means.get)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--n-slices", type=int, default=50)
    ap.add_argument("--accels", default="4,8")
    ap.add_argument("--coils", default="1,8")
    ap.add_argument("--solvers", default="dds,ddnm,dps,mcg,langevin")
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tune", action="store_true", help="tune baseline weights on the tuning subjects and exit")
    ap.add_argument("--tune-subjects", type=int, default=5)
    ap.add_argument("--tune-slices", type=int, default=8)
    ap.add_argument("--samples", type=int, default=1, help="posterior samples per slice (scored: their mean)")
    ap.add_argument("--name", default="mri")
    args = ap.parse_args()
    prior = load_prior(args.model)
    npz = args.data / "ixi_t1" / "ixi_t1_axial_128.npz"
    val = sorted(prior.meta["data"]["val_subjects"])
    tune_subj, eval_subj = val[: args.tune_subjects], val[args.tune_subjects:]
    lam_file = RESULTS / "mri_lambda.json"
    if args.tune:
        imgs, _ = heldout_slices(npz, tune_subj, args.tune_slices, seed=1)
        lams = tune(imgs, 4.0, 1)
        RESULTS.mkdir(exist_ok=True)
        lam_file.write_text(json.dumps({"lambda": lams, "tuning_subjects": tune_subj, "accel": 4, "coils": 1,
                                        "grid": LAMBDA_GRID}, indent=2))
        print("tuned:", lams)
        return
    lams = json.loads(lam_file.read_text())["lambda"] if lam_file.exists() else DEFAULT_LAMBDA
    imgs, ids = heldout_slices(npz, eval_subj, args.n_slices)
    fwd = forward_seconds(prior)
    methods = [m for m in args.solvers.split(",") + args.baselines.split(",") if m]
    samples = {m: 1 if m in BASELINES else args.samples for m in methods}  # baselines are deterministic
    rows = []
    for coils in (int(c) for c in args.coils.split(",")):
        for accel in (float(a) for a in args.accels.split(",")):
            acc: dict[str, list[dict]] = {m: [] for m in methods}
            for i, im in enumerate(imgs):
                task = simulate_task(im, accel, seed=i, coils=coils)
                for m in methods:
                    r = run_solver(task, m, prior, args.steps, seed=i, samples=samples[m], lam=lams.get(m))
                    acc[m].append({**score(task, r.mean), "seconds": r.seconds, "NFE": r.nfe})
                print(f"coils {coils} x{accel:g} slice {i + 1}/{len(imgs)}: " +
                      "  ".join(f"{m} {acc[m][-1]['PSNR']:.2f}" for m in methods), flush=True)
            for m in methods:
                a = acc[m]
                row = {"coils": coils, "accel": accel, "method": m, "samples": samples[m], "NFE": a[0]["NFE"],
                       "PSNR": float(np.mean([r["PSNR"] for r in a])), "PSNR_sd": float(np.std([r["PSNR"] for r in a])),
                       "SSIM": float(np.mean([r["SSIM"] for r in a])), "NMSE": float(np.mean([r["NMSE"] for r in a])),
                       "s_per_slice": float(np.mean([r["seconds"] for r in a]))}
                if row["NFE"] and row["samples"] == 1:  # K samples share one batch: no per-sample time
                    row["time_over_NFE_x_forward"] = row["s_per_slice"] / (row["NFE"] * fwd)
                rows.append(row)
    write_table(args.name, rows, {**machine(), "model": args.model, "prior_step": prior.meta["step"],
                                  "images_seen": prior.meta["images_seen"], "n_slices": len(imgs),
                                  "eval_subjects": sorted(set(ids.tolist())), "steps": args.steps,
                                  "lambda": lams, "forward_s_batch1": fwd, "mask": "random1d, 8% centre"})


if __name__ == "__main__":
    main()
