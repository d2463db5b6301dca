"""DDS settings side by side: DDIM's noise renewal eta and the CG steps per update, on held-out data.

Each setting runs as a DDS variant (``SolverSpec("ddim", "prox", cg_iters, eta)``, registered under a
temporary name) next to the shipped ``dds`` (with its per-operator CG count, ``recon.policy.DDS_CG_ITERS``)
and TV, on the same slices, seeds and masks, on four operators: CT at 60 views and low dose (I0 = 1e4,
180 views) (``--ct-model`` ct, evaluation patients and TV weights as in ``ct.py``), and MRI x4
single-coil and 8-coil (``--mri-model`` brain-t1, evaluation subjects as in ``mri.py``). Seconds
and time / (NFE x one batch-1 forward, timed next to every slice) show what the CG steps cost.
This is how the shipped DDS settings were chosen (eta: ``--etas 0,0.5,0.85,1 --cg 5,10,20``).
``--samples K`` scores the mean of K posterior samples per slice (one batch of K). ``--tuning`` runs on
the tuning data instead of the evaluation data: CT slices of the last ``--ct-slices`` training patients
(one each, as ``ct.py`` tunes TV), MRI slices of the tuning subjects of ``mri.py``.

    python benchmarks/dds_sweep.py --data ../shared/data --ct-slices 4 --mri-slices 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import RESULTS, heldout_slices, machine, write_table
from ct import TASKS as CT_TASKS
from ct import load_slices, make_task, tuning_patients
from mri import TUNE_SEED, forward_seconds, split_subjects
from mediff.prior import load_prior
from mediff.recon import MRIOptions, run_solver, simulate_mri
from mediff.recon.ct import hu_window
from mediff.recon.policy import BASELINE_LAMBDA, DDS_CG_ITERS
from mediff.solvers import SOLVERS, SolverSpec

CT_SWEEP_TASKS = ("60 views", "low dose I0=1e4 (180 views)")
MRI_COILS = (1, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--ct-model", default="ct")
    ap.add_argument("--mri-model", default="brain-t1")
    ap.add_argument("--ct-slices", type=int, default=4)
    ap.add_argument("--mri-slices", type=int, default=8)
    ap.add_argument("--etas", default="1", help="comma-separated DDIM noise renewals")
    ap.add_argument("--cg", default="5,10,20,40", help="comma-separated CG steps per update")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=1, help="posterior samples per slice (scored: their mean)")
    ap.add_argument("--ct-tasks", default=",".join(CT_SWEEP_TASKS), help="comma-separated CT tasks of ct.py")
    ap.add_argument("--tuning", action="store_true", help="tuning patients/subjects, not evaluation ones")
    ap.add_argument("--name", default="dds_sweep")
    args = ap.parse_args()
    variants = {f"dds eta={float(e):g} cg={int(k)}": SolverSpec("ddim", "prox", cg_iters=int(k), eta=float(e))
                for e in args.etas.split(",") for k in args.cg.split(",")}
    SOLVERS.update(variants)  # this process only: run_solver looks solvers up by name
    methods = ["tv", "dds", *variants]
    rows = []

    if args.ct_slices:
        ct = load_prior(args.ct_model)
        hu_range = hu_window(ct.meta.normalization, ct.name)
        lam_file = RESULTS / "ct_lambda.json"  # TV weights tuned on the 128-px grid (family "ct")
        ct_lams = json.loads(lam_file.read_text())["lambda"] if lam_file.exists() else {}
        patients = sorted(ct.meta.data.val_subjects)
        if args.tuning:
            all_ids = np.load(args.data / "ct_tcga" / "ct_hu_512.npz")["patient_id"].astype(str).tolist()
            patients = tuning_patients(all_ids, patients, args.ct_slices)
        slices = load_slices(args.data / "ct_tcga", patients, args.ct_slices)
        for name in [t for t in args.ct_tasks.split(",") if t]:
            tasks = [make_task(hu, px, ct.image_size, CT_TASKS[name], i, hu_range)
                     for i, (_, hu, px) in enumerate(slices)]
            tv = ct_lams.get(name) if tasks[0].family == "ct" else None  # None: the policy's weight for the grid
            rows += _rows(f"CT {name}", tasks, methods, ct, args.steps, {"tv": tv}, args.samples)

    if args.mri_slices:
        mri = load_prior(args.mri_model)
        lam_file = RESULTS / "mri_lambda.json"
        mri_lam = json.loads(lam_file.read_text())["lambda"] if lam_file.exists() else BASELINE_LAMBDA["mri"]
        tune_subj, eval_subj = split_subjects(mri)
        subjects, seed = (tune_subj, TUNE_SEED) if args.tuning else (eval_subj, 0)
        imgs, _ = heldout_slices(args.data / "ixi_t1" / "ixi_t1_axial_128.npz", subjects, args.mri_slices, seed)
        for coils in MRI_COILS:
            tasks = [simulate_mri(im, MRIOptions(accel=4.0, coils=coils), seed=i) for i, im in enumerate(imgs)]
            rows += _rows(f"MRI x4 {coils}-coil", tasks, methods, mri, args.steps, mri_lam, args.samples)
    write_table(args.name, rows, {**machine(), "ct_model": args.ct_model, "mri_model": args.mri_model,
                                  "ct_slices": args.ct_slices, "mri_slices": args.mri_slices, "steps": args.steps,
                                  "samples": args.samples, "tuning": args.tuning,
                                  "shipped_dds": {"cg_iters": DDS_CG_ITERS, "eta": SOLVERS["dds"].eta}})


def _rows(task_name: str, tasks: list, methods: list[str], prior, steps: int, lams: dict,
          samples: int) -> list[dict]:
    acc: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    for i, task in enumerate(tasks):
        fwd = forward_seconds(prior)
        for m in methods:
            k = 1 if m == "tv" else samples
            r = run_solver(task, m, prior, steps, seed=i, samples=k, lam=lams.get(m))
            # K samples run as one batch of K: their time is over K x NFE batch-1 forwards
            acc[m].append((task.score(r.mean)["PSNR"], r.seconds, r.seconds / (k * r.nfe * fwd) if r.nfe else np.nan))
        print(f"{task_name} slice {i + 1}/{len(tasks)}: " + "  ".join(f"{m} {acc[m][-1][0]:.2f}" for m in methods),
              flush=True)
    rows = []
    for m, v in acc.items():
        psnr, sec, ratio = (np.array(c) for c in zip(*v))
        rows.append({"task": task_name, "method": m, "PSNR": float(psnr.mean()), "PSNR_sd": float(psnr.std()),
                     "s_per_slice": float(sec.mean()),
                     **({} if m == "tv" else {"time_over_NFE_x_forward": float(ratio.mean())})})
    return rows


if __name__ == "__main__":
    main()
