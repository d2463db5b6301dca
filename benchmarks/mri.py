"""MRI reconstruction benchmark on held-out IXI subjects: every solver and baseline side by side.

The prior's validation subjects (never trained on) are split: the first ``--tune-subjects`` (sorted)
tune the baselines' regularisation weights (``--tune``), the rest are evaluated. k-space is simulated
from the magnitude slices (single-coil, or C coils with ESPIRiT re-estimated maps), 1D random masks
with an 8 % fully-sampled centre, one mask seed per slice.

    python benchmarks/mri.py --data ../shared/data --model brain-t1 --tune
    python benchmarks/mri.py --data ../shared/data --model brain-t1 --n-slices 50 --accels 4,8 --coils 1,8

``--samples K``: every diffusion solver draws K posterior samples per slice (one batch) and is scored
on their mean, the estimate ``mediff reconstruct --samples K`` writes (NFE stays per sample).

``--external deepinv-dps``: deepinv's DPS with our prior wrapped (``deepinv_ref.py``; `make bench-deps`),
its weight tuned like the baselines' (``--tune --external deepinv-dps``), ``--external-steps`` steps.
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
from mediff.recon import MRIOptions, MRITask, run_solver, simulate_mri
from mediff.recon.policy import BASELINE_LAMBDA
from mediff.solvers import SOLVERS

LAMBDA_GRID = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1)
# deepinv's DPS weight multiplies the residual norm ||y - A D||. The grid was set by a first look at 2
# slices of the evaluation subjects (x4, 100 steps: 19-20 dB at its default 1, a peak near 1000, a
# collapse by 3000); the weight itself is chosen on the tuning subjects (--tune).
DEEPINV_WEIGHT_GRID = (100.0, 300.0, 1000.0, 2000.0)
EXTERNAL = ("deepinv-dps",)
TUNE_SUBJECTS = 5  # the first validation subjects (sorted): tuning, never evaluation
TUNE_SEED = 1  # ``heldout_slices`` seed of the tuning slices (evaluation slices: 0)


def split_subjects(prior, n_tune: int = TUNE_SUBJECTS) -> tuple[list[str], list[str]]:
    """(tuning, evaluation) subjects: the prior's validation subjects (sorted), the first ``n_tune``
    for tuning weights and settings, the rest for evaluation."""
    val = sorted(prior.meta.data.val_subjects)
    return val[:n_tune], val[n_tune:]


def tuning_slices(prior, data: Path, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` IXI slices of the tuning subjects (drawn with ``TUNE_SEED``) under ``data``, and those
    subjects: what the side-by-side MRI benchmarks of settings (normal_op, solver_overhead,
    espirit_crop) run on, never the evaluation subjects."""
    subjects = split_subjects(prior)[0]
    imgs, _ = heldout_slices(data / "ixi_t1" / "ixi_t1_axial_128.npz", subjects, n, seed=TUNE_SEED)
    return imgs, subjects


def median_seconds(f, reps: int = 5) -> float:
    """Median wall-clock seconds of ``f()`` over ``reps`` calls, after one warm-up call."""
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def forward_seconds(prior, reps: int = 5) -> float:
    """Median seconds of one network forward at batch 1 (the unit of the time / (NFE x forward) ratio).
    Measured next to every slice, so that a busy machine slows the unit and the solvers alike."""
    x, s = torch.rand(1, 1, prior.image_size, prior.image_size), torch.full((1,), 0.5)
    with torch.no_grad():
        return median_seconds(lambda: prior(x, s), reps)


def run_method(task, method: str, prior, steps: int, seed: int, samples: int, lam: float | None,
               external_steps: int, cg_iters: int | None = None) -> dict:
    """One reconstruction scored: PSNR/SSIM/NMSE, seconds, NFE. ``deepinv-dps`` (external reference)
    runs ``external_steps`` steps with weight ``lam``; everything else goes through ``run_solver``
    (``cg_iters``: CG steps per update of the diffusion solvers, None = their defaults)."""
    if method == "deepinv-dps":
        from deepinv_ref import deepinv_dps

        img, n, sec = deepinv_dps(task, prior, external_steps, seed=seed, weight=lam)
        return {**task.score(img), "seconds": sec, "NFE": n}
    r = run_solver(task, method, prior, steps, seed=seed, samples=samples, lam=lam,
                   cg_iters=cg_iters if method in SOLVERS else None)
    return {**task.score(r.mean), "seconds": r.seconds, "NFE": r.nfe}


def tune(images: np.ndarray, accel: float, coils: int, methods: tuple[str, ...], prior=None,
         external_steps: int = 100) -> dict[str, float]:
    """Per method, the weight of its grid (baselines: LAMBDA_GRID; deepinv-dps: DEEPINV_WEIGHT_GRID)
    with the best mean PSNR on the tuning slices."""
    tasks = [simulate_mri(im, MRIOptions(accel=accel, coils=coils), seed=1000 + i) for i, im in enumerate(images)]
    out = {}
    for method in methods:
        means = {}
        for lam in DEEPINV_WEIGHT_GRID if method == "deepinv-dps" else LAMBDA_GRID:
            ps = [run_method(t, method, prior, 0, 1000 + i, 1, lam, external_steps)["PSNR"]
                  for i, t in enumerate(tasks)]
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
    ap.add_argument("--baselines", default=",".join(MRITask.baselines))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tune", action="store_true", help="tune baseline weights on the tuning subjects and exit")
    ap.add_argument("--tune-subjects", type=int, default=TUNE_SUBJECTS)
    ap.add_argument("--tune-slices", type=int, default=8)
    ap.add_argument("--samples", type=int, default=1, help="posterior samples per slice (scored: their mean)")
    ap.add_argument("--cg-iters", type=int, default=None,
                    help="CG steps per update of the diffusion solvers (default: recon.policy)")
    ap.add_argument("--name", default="mri")
    ap.add_argument("--external", default="", help="external references (deepinv-dps; needs `make bench-deps`), "
                    "with --tune: tune their weights too")
    ap.add_argument("--external-steps", type=int, default=100, help="steps of the external references")
    args = ap.parse_args()
    externals = tuple(m for m in args.external.split(",") if m)
    if unknown := set(externals) - set(EXTERNAL):
        ap.error(f"unknown external reference(s) {sorted(unknown)}; choose from {EXTERNAL}")
    prior = load_prior(args.model)
    npz = args.data / "ixi_t1" / "ixi_t1_axial_128.npz"
    tune_subj, eval_subj = split_subjects(prior, args.tune_subjects)
    lam_file = RESULTS / "mri_lambda.json"
    if args.tune:
        imgs, _ = heldout_slices(npz, tune_subj, args.tune_slices, seed=TUNE_SEED)
        lams = tune(imgs, 4.0, 1, ("tv", "l1wavelet", *externals), prior, args.external_steps)
        RESULTS.mkdir(exist_ok=True)
        lam_file.write_text(json.dumps({"lambda": lams, "tuning_subjects": tune_subj, "accel": 4, "coils": 1,
                                        "grid": LAMBDA_GRID, "deepinv_weight_grid": DEEPINV_WEIGHT_GRID,
                                        "external_steps": args.external_steps}, indent=2))
        print("tuned:", lams)
        return
    lams = json.loads(lam_file.read_text())["lambda"] if lam_file.exists() else BASELINE_LAMBDA["mri"]
    if missing := [m for m in externals if m not in lams]:
        ap.error(f"no tuned weight for {missing}: run --tune --external {','.join(externals)} first")
    imgs, ids = heldout_slices(npz, eval_subj, args.n_slices)
    methods = [m for m in args.solvers.split(",") + [*externals] + args.baselines.split(",") if m]
    # baselines are deterministic; the external reference draws one sample
    samples = {m: 1 if m in MRITask.baselines or m in EXTERNAL else args.samples for m in methods}
    rows, fwds = [], []
    for coils in (int(c) for c in args.coils.split(",")):
        for accel in (float(a) for a in args.accels.split(",")):
            acc: dict[str, list[dict]] = {m: [] for m in methods}
            for i, im in enumerate(imgs):
                task = simulate_mri(im, MRIOptions(accel=accel, coils=coils), seed=i)
                fwd = forward_seconds(prior)
                fwds.append(fwd)
                for m in methods:
                    acc[m].append({**run_method(task, m, prior, args.steps, i, samples[m], lams.get(m),
                                                args.external_steps, args.cg_iters), "forward_s": fwd})
                print(f"coils {coils} x{accel:g} slice {i + 1}/{len(imgs)}: " +
                      "  ".join(f"{m} {acc[m][-1]['PSNR']:.2f}" for m in methods), flush=True)
            for m in methods:
                a = acc[m]
                row = {"coils": coils, "accel": accel, "method": m, "samples": samples[m], "NFE": a[0]["NFE"],
                       "PSNR": float(np.mean([r["PSNR"] for r in a])), "PSNR_sd": float(np.std([r["PSNR"] for r in a])),
                       "SSIM": float(np.mean([r["SSIM"] for r in a])), "NMSE": float(np.mean([r["NMSE"] for r in a])),
                       "s_per_slice": float(np.mean([r["seconds"] for r in a]))}
                if row["NFE"] and row["samples"] == 1:  # K samples share one batch: no per-sample time
                    row["time_over_NFE_x_forward"] = float(np.mean([r["seconds"] / (r["NFE"] * r["forward_s"])
                                                                     for r in a]))
                rows.append(row)
    write_table(args.name, rows, {**machine(), "model": args.model, "prior_step": prior.meta.step,
                                  "images_seen": prior.meta.images_seen, "n_slices": len(imgs),
                                  "eval_subjects": sorted(set(ids.tolist())), "steps": args.steps,
                                  "lambda": lams, "forward_s_batch1_median": float(np.median(fwds)),
                                  "mask": "random1d, 8% centre", "cg_iters": args.cg_iters or "default",
                                  "external_steps": args.external_steps if externals else None})


if __name__ == "__main__":
    main()
