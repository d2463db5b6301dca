"""CT reconstruction benchmark on held-out TCGA-LUAD patients: FBP, TV and the diffusion solvers.

Evaluation patients: the prior's validation subjects (``data.val_subjects`` in its metadata) with
``--model``, else the last 10 patient ids (sorted). TV's weight is tuned per task on 3 other
patients (the last 3 sorted ids outside the evaluation set), never on evaluation ones. Slices are
resampled to ``--size`` (area downsampling; the working pixel keeps its size in mm) and their
parallel-beam sinograms simulated (``mediff.recon.simulate_ct``, noise seeded per slice).
PSNR/SSIM on HU clipped to [-1000, 1000] (data_range 2000), as ``mediff reconstruct`` reports them.
``--samples K``: every diffusion solver draws K posterior samples per slice (one batch) and is scored on
their mean, the estimate ``mediff reconstruct --samples K`` writes (NFE stays per sample).

    python benchmarks/ct.py --data ../shared/data/ct_tcga --n 4 --size 128
    python benchmarks/ct.py --data ../shared/data/ct_tcga --model ct --n 10 --size 256

``--native``: every slice is measured and scored on its own 512 x 512 grid, as ``mediff reconstruct``
does with a 512-px input: the sinogram is simulated from the full-resolution slice, FBP and TV run on
that grid, and each prior of ``--model`` (comma-separated, ``label=path`` or a name) works on its own
grid: a 512-px prior on the slice's grid, a 128-px prior on its coarser grid with the detector rebinned
(``recon.ct.hu_task``), its result mapped back to 512 px to be scored. TV's weight is tuned on the
tuning patients at 512 px over ``--lambda-grid``.

    python benchmarks/ct.py --native --model ct,native=training/ct-native/prior.safetensors --n 8 \
        --tasks "60 views" --name ct_native
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, machine, write_table
from mediff.recon import CTOptions, CTTask, run_solver, simulate_ct
from mediff.recon.ct import fit_hu, hu_task, hu_window
from mediff.solvers import SOLVERS

# name -> (views, limited angle (deg) or None, dose I0 or None)
TASKS = {
    "30 views": (30, None, None),
    "60 views": (60, None, None),
    "120 views": (120, None, None),
    "limited 120 deg (60 views)": (60, 120.0, None),
    "low dose I0=1e4 (180 views)": (180, None, 1e4),
}
LAMBDA_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # CT TV weights, relative to ||A||^2
N_TUNE_PATIENTS = 3


def tuning_patients(all_ids: list[str], eval_ids: list[str], n: int) -> list[str]:
    """The last ``n`` sorted patient ids outside the evaluation set: where weights and settings are
    chosen (patients the prior trained on: the only other real CT slices there are). ``all_ids`` may
    repeat a patient (one id per slice): each counts once."""
    ids = [p for p in sorted(set(all_ids)) if p not in set(eval_ids)][-n:]
    assert not set(ids) & set(eval_ids)
    return ids


def load_slices(data: Path, patients: list[str], n: int | None) -> list[tuple[str, np.ndarray, float]]:
    """Up to ``n`` (all if None) slices (patient, HU (512, 512), pixel mm) of ``patients``, one per
    patient in turn so the slices spread over patients. A slice whose pixels equal an earlier one's
    is dropped: the TCGA-LUAD set holds 5 such pairs (two series files, one image), and a copy would
    count one image twice in a mean."""
    d = np.load(data / "ct_hu_512.npz")
    ids, hu, px = d["patient_id"].astype(str), d["hu"], d["pixel_spacing_mm"]
    seen: set[bytes] = set()
    per: dict[str, list[int]] = {}
    for p in patients:
        per[p] = []
        for i in np.flatnonzero(ids == p).tolist():
            key = hashlib.sha1(hu[i].tobytes()).digest()
            if key not in seen:
                seen.add(key)
                per[p].append(i)
    order = []
    while any(per.values()):
        for p in patients:
            if per[p]:
                order.append(per[p].pop(0))
    order = order if n is None else order[:n]
    return [(ids[i], hu[i].astype(np.float32), float(px[i])) for i in order]


def make_task(hu: np.ndarray, px: float, size: int | None, spec: tuple, seed: int, hu_range: tuple[float, float],
              native: bool = False):
    """The task of an HU slice on a size x size grid: the slice resampled there and measured there, or
    (``native``) measured at its own resolution and scored there (size None: its own grid)."""
    views, limited, dose = spec
    if native:
        task = hu_task(hu, px, size, CTOptions(views, limited, dose), seed, hu_range)
    else:
        work, _, px_work, _ = fit_hu(hu, size, px)
        task = simulate_ct(work, CTOptions(views, limited, dose), seed, px_work, hu_range)
    task.op.A(torch.zeros(1, 1, *task.shape))  # build the float32 copy of the projector before timing
    return task


def tune(slices: list, size: int | None, hu_range: tuple[float, float], tasks: dict[str, tuple],
         grid: tuple[float, ...] = LAMBDA_GRID, native: bool = False) -> dict[str, float]:
    """Per task, the TV weight of ``grid`` with the best mean PSNR on the tuning slices."""
    out = {}
    for name, spec in tasks.items():
        tasks = [make_task(hu, px, size, spec, 1000 + i, hu_range, native) for i, (_, hu, px) in enumerate(slices)]
        means = {lam: float(np.mean([t.score(run_solver(t, "tv", lam=lam).mean)["PSNR"] for t in tasks]))
                 for lam in grid}
        out[name] = max(means, key=means.get)
        print(f"tune {name}: " + "  ".join(f"{k:g}: {v:.2f}" for k, v in means.items()) + f" -> {out[name]:g}",
              flush=True)
        if len(grid) > 1 and out[name] in (grid[0], grid[-1]):
            print(f"  warning: best weight at the edge of the grid for {name}", flush=True)
    return out


def load_priors(spec: str) -> dict[str, object]:
    """``--model``: comma-separated names or label=path -> {label: Prior}."""
    from mediff.prior import load_prior

    out = {}
    for item in (x for x in spec.split(",") if x):
        label, _, path = item.rpartition("=")
        out[label or path] = load_prior(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/ct_tcga"))
    ap.add_argument("--model", default=None, help="CT prior(s) (names or label=path, comma-separated; several "
                                                  "only with --native); without it: fbp and tv only")
    ap.add_argument("--n", type=int, default=10, help="evaluation slices")
    ap.add_argument("--size", type=int, default=256, help="working grid (the prior's size when --model is given)")
    ap.add_argument("--native", action="store_true", help="measure and score every slice on its own 512-px grid")
    ap.add_argument("--lambda-grid", default=None, help="TV weights to tune over (default: the module's grid)")
    ap.add_argument("--lambdas-from", type=Path, default=None,
                    help="a results/NAME_lambda.json of an earlier run on the same tuning patients and grid: its "
                         "tuned TV weights instead of tuning again (--n 0 runs the tuning alone)")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cg-iters", type=int, default=None, help="CG steps per data-consistency update (default: policy)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of: " + ", ".join(TASKS))
    ap.add_argument("--samples", type=int, default=1, help="posterior samples per slice (scored: their mean)")
    ap.add_argument("--name", default="ct")
    args = ap.parse_args()

    hu_range = (-1000.0, 1000.0)
    all_ids = sorted(set(np.load(args.data / "ct_hu_512.npz")["patient_id"].astype(str).tolist()))
    priors = load_priors(args.model) if args.model else {}
    if len(priors) > 1 and not args.native:
        raise SystemExit("several --model priors need --native (each works on its own grid)")
    if priors:
        first = next(iter(priors.values()))
        hu_range = hu_window(first.meta.normalization, first.name)
        if not args.native and args.size != first.image_size:
            print(f"--size {args.size} replaced by the prior's {first.image_size}")
            args.size = first.image_size
        eval_ids = sorted(set(first.meta.data.val_subjects) & set(all_ids))
        if not eval_ids:
            raise SystemExit(f"none of the prior's validation subjects is a patient of {args.data}")
        for label, p in priors.items():
            if sorted(set(p.meta.data.val_subjects) & set(all_ids)) != eval_ids:
                raise SystemExit(f"prior {label} holds out other patients than {next(iter(priors))}")
    else:
        eval_ids = all_ids[-10:]
    tune_ids = tuning_patients(all_ids, eval_ids, N_TUNE_PATIENTS)
    tasks = {k: TASKS[k] for k in args.tasks.split(",") if k}
    solvers = [s for s in args.solvers.split(",") if s] if priors else []
    # (row label, method, prior or None, working grid: None = the slice's own)
    methods = [(b, b, None, None if args.native else args.size) for b in CTTask.baselines]
    methods += [(m if len(priors) == 1 else f"{m} ({label})", m, p, p.image_size)
                for label, p in priors.items() for m in solvers]
    lam_grid = LAMBDA_GRID if args.lambda_grid is None else tuple(float(v) for v in args.lambda_grid.split(","))

    t0 = time.perf_counter()
    base_size = None if args.native else args.size
    if args.lambdas_from is not None:
        tuned = json.loads(args.lambdas_from.read_text())
        if tuned["tuning_patients"] != tune_ids or tuned["size"] != (base_size or "native"):
            raise SystemExit(f"{args.lambdas_from} was tuned on other patients or another grid")
        lams, lam_grid = {k: tuned["lambda"][k] for k in tasks}, tuple(tuned["grid"])
    else:
        lams = tune(load_slices(args.data, tune_ids, N_TUNE_PATIENTS), base_size, hu_range, tasks, lam_grid,
                    args.native)  # 1 slice per patient
    tune_s = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}_lambda.json").write_text(json.dumps(
        {"lambda": lams, "tuning_patients": tune_ids, "size": base_size or "native", "grid": lam_grid}, indent=2))
    if args.n == 0:
        return

    slices = load_slices(args.data, eval_ids, args.n)
    rows = []
    for name, spec in tasks.items():
        acc: dict[str, list[dict]] = {label: [] for label, *_ in methods}
        for i, (pid, hu, px) in enumerate(slices):
            built: dict = {}  # one task per working grid, shared by the methods on it
            for label, m, prior, size in methods:
                if size not in built:
                    built[size] = make_task(hu, px, size, spec, i, hu_range, args.native)
                task = built[size]
                k = 1 if m in CTTask.baselines else args.samples
                r = run_solver(task, m, prior, args.steps, seed=i, samples=k, lam=lams[name] if m == "tv" else None,
                               cg_iters=None if m in CTTask.baselines else args.cg_iters)
                acc[label].append({**task.score(r.mean), "seconds": r.seconds, "NFE": r.nfe,
                                   "grid": task.shape[0]})
            print(f"{name} slice {i + 1}/{len(slices)} ({pid}): " +
                  "  ".join(f"{lab} {acc[lab][-1]['PSNR']:.2f}" for lab, *_ in methods), flush=True)
        for label, m, *_ in methods:
            a = acc[label]
            rows.append({"task": name, "method": label, "grid": a[0]["grid"],
                         "samples": 1 if m in CTTask.baselines else args.samples, "NFE": a[0]["NFE"],
                         "PSNR": float(np.mean([r["PSNR"] for r in a])),
                         "PSNR_sd": float(np.std([r["PSNR"] for r in a])),
                         "SSIM": float(np.mean([r["SSIM"] for r in a])),
                         "s_per_slice": float(np.mean([r["seconds"] for r in a])),
                         **({"lambda": lams[name]} if m == "tv" else {})})
    meta = {**machine(), "model": args.model, "size": "native" if args.native else args.size,
            "n_slices": len(slices), "eval_patients": sorted({s[0] for s in slices}), "tuning_patients": tune_ids,
            "lambda": lams, "tune_seconds": round(tune_s, 1), "steps": args.steps if priors else None,
            "cg_iters": args.cg_iters,
            "metric": "PSNR/SSIM on HU clipped to [-1000, 1000], data_range 2000, " +
                      ("on each slice's own grid (grid: the method's working grid)" if args.native else "working grid"),
            "geometry": "parallel beam, simulated from the HU slices" + (" at full resolution" if args.native else "") +
                        "; limited angle = views over [0, 120) deg; low dose = Poisson counts at I0 photons/bin",
            "prior_step": {label: p.meta.step for label, p in priors.items()}}
    write_table(args.name, rows, meta)


if __name__ == "__main__":
    main()
