"""DDS settings side by side: DDIM's noise renewal eta and the CG steps per update, on held-out data.

Each setting runs as a DDS variant (``SolverSpec("ddim", "prox", cg_iters, eta)``, registered under a
temporary name) next to the shipped ``dds`` and TV, on the same slices, seeds and masks: CT at 60 views
(``--model`` ct, evaluation patients as in ``ct.py``) and single-coil MRI x4 (``--mri-model``
brain-t1, evaluation subjects as in ``mri.py``). This is how the shipped DDS setting was chosen.

    python benchmarks/dds_sweep.py --data ../shared/data --ct-slices 2 --mri-slices 6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import RESULTS, heldout_slices, machine, write_table
from ct import load_slices, make_task
from mediff.prior import load_prior
from mediff.recon import DEFAULT_LAMBDA, run_solver, score, simulate_task
from mediff.recon_ct import hu_window
from mediff.solvers import SOLVERS, SolverSpec

ETAS = (0.0, 0.5, 0.85, 1.0)
CG_ITERS = (5, 10, 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--ct-model", default="ct")
    ap.add_argument("--mri-model", default="brain-t1")
    ap.add_argument("--ct-slices", type=int, default=2)
    ap.add_argument("--mri-slices", type=int, default=6)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--name", default="dds_sweep")
    args = ap.parse_args()
    variants = {f"dds eta={e:g} cg={k}": SolverSpec("ddim", "prox", cg_iters=k, eta=e) for e in ETAS for k in CG_ITERS}
    SOLVERS.update(variants)  # this process only: run_solver looks solvers up by name
    methods = ["tv", "dds", *variants]
    rows = []

    ct = load_prior(args.ct_model)
    hu_range = hu_window(ct.meta.get("normalization"), ct.name)
    lam_file = RESULTS / "ct_lambda.json"
    ct_lam = json.loads(lam_file.read_text())["lambda"]["60 views"] if lam_file.exists() else 1e-4
    slices = load_slices(args.data / "ct_tcga", sorted(ct.meta["data"]["val_subjects"]), args.ct_slices)
    tasks = [make_task(hu, px, ct.image_size, (60, None, None), i, hu_range) for i, (_, hu, px) in enumerate(slices)]
    rows += _rows("CT 60 views", tasks, methods, ct, args.steps, {"tv": ct_lam})

    mri = load_prior(args.mri_model)
    lam_file = RESULTS / "mri_lambda.json"
    mri_lam = json.loads(lam_file.read_text())["lambda"] if lam_file.exists() else DEFAULT_LAMBDA
    imgs, _ = heldout_slices(args.data / "ixi_t1" / "ixi_t1_axial_128.npz",
                             sorted(mri.meta["data"]["val_subjects"])[5:], args.mri_slices)
    tasks = [simulate_task(im, 4.0, seed=i, coils=1) for i, im in enumerate(imgs)]
    rows += _rows("MRI x4 single-coil", tasks, methods, mri, args.steps, mri_lam)
    write_table(args.name, rows, {**machine(), "ct_model": args.ct_model, "mri_model": args.mri_model,
                                  "ct_slices": len(slices), "mri_slices": len(imgs), "steps": args.steps,
                                  "shipped_dds": {"cg_iters": SOLVERS["dds"].cg_iters, "eta": SOLVERS["dds"].eta}})


def _rows(task_name: str, tasks: list, methods: list[str], prior, steps: int, lams: dict) -> list[dict]:
    psnr: dict[str, list[float]] = {m: [] for m in methods}
    for i, task in enumerate(tasks):
        for m in methods:
            psnr[m].append(score(task, run_solver(task, m, prior, steps, seed=i, lam=lams.get(m)).mean)["PSNR"])
        print(f"{task_name} slice {i + 1}/{len(tasks)}: " + "  ".join(f"{m} {psnr[m][-1]:.2f}" for m in methods),
              flush=True)
    return [{"task": task_name, "method": m, "PSNR": float(np.mean(v)), "PSNR_sd": float(np.std(v))}
            for m, v in psnr.items()]


if __name__ == "__main__":
    main()
