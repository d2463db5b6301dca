"""Where a DDS solve's time goes, measured inside the solve: the network, and the rest of each update
(data consistency by CG, sampler arithmetic), single-coil and 8-coil, for several CG counts.

On slices of the tuning subjects of ``mri.py`` (1D random mask with an 8 % centre; 8 coils with ESPIRiT
maps), the solver's denoiser is wrapped by a timer, so one run gives side by side, per CG count:
``net_over_NFE_x_forward`` (the network's own time inside the solve over NFE x one batch-1 forward timed
in a loop next to every slice), ``rest_ms_per_update`` (everything else, per network call) and the whole
``time_over_NFE_x_forward`` of ``mri.py``. Rows ``method = normal`` time the operator's A^H A (the
operator every solver runs CG on) called repeatedly (``ms_warm``) and once right after a network forward
(``ms_after_forward``): the cost a data-consistency step meets when the forward has evicted the
operator's data from cache.

    cd benchmarks && python solver_overhead.py --data ../../shared/data --n 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, write_table
from mri import forward_seconds, median_seconds, tuning_slices
from mediff.prior import load_prior
from mediff.recon import MRIOptions, simulate_mri
from mediff.recon.run import default_cg_iters
from mediff.solvers import Problem, solve


def after_forward_ms(prior, normal, x: torch.Tensor, reps: int = 11) -> float:
    """Median ms of one ``normal(x)`` call made right after a batch-1 network forward."""
    z, s = torch.rand(1, 1, prior.image_size, prior.image_size), torch.full((1,), 0.5)
    times = []
    with torch.no_grad():
        for _ in range(reps):
            prior(z, s)
            t0 = time.perf_counter()
            normal(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--n", type=int, default=4, help="slices")
    ap.add_argument("--accel", type=float, default=4.0)
    ap.add_argument("--coils", default="1,8")
    ap.add_argument("--cg", default="1,5,20", help="comma-separated CG steps per update")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--name", default="solver_overhead")
    args = ap.parse_args()
    prior = load_prior(args.model)
    imgs, subjects = tuning_slices(prior, args.data, args.n)
    rows = []
    for coils in (int(c) for c in args.coils.split(",")):
        acc: dict[str, list[tuple[float, ...]]] = {}
        for i, img in enumerate(imgs):
            task = simulate_mri(img, MRIOptions(accel=args.accel, coils=coils), seed=i)
            op = task.solver_operator()  # what recon.run_solver solves with
            fwd = forward_seconds(prior)
            x1 = torch.randn(1, 1, *task.shape, generator=torch.Generator().manual_seed(i))
            acc.setdefault("normal", []).append(
                (1e3 * median_seconds(lambda: op.normal(x1), reps=50), after_forward_ms(prior, op.normal, x1)))
            problem = Problem(op, task.y, task.noise_sigma)
            for k in sorted({*(int(c) for c in args.cg.split(",")), default_cg_iters(task, "dds")}):
                net = [0.0, 0]

                def timed(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                    t0 = time.perf_counter()
                    out = prior(x, sigma)
                    net[0] += time.perf_counter() - t0
                    net[1] += 1
                    return out

                t0 = time.perf_counter()
                x, nfe = solve(timed, problem, (1, 1, *task.shape), "dds", steps=args.steps,
                               sigma_data=prior.meta.sigma_data, sigma_min=prior.sigma_min,
                               sigma_max=prior.sigma_max, generator=torch.Generator().manual_seed(i), cg_iters=k)
                sec = time.perf_counter() - t0
                key = f"dds cg={k}" + (" (shipped)" if k == default_cg_iters(task, "dds") else "")
                acc.setdefault(key, []).append((task.score(task.image(x.detach()))["PSNR"], net[0] / (nfe * fwd),
                                                1e3 * (sec - net[0]) / net[1], sec / (nfe * fwd)))
            print(f"{coils} coil(s) slice {i + 1}/{len(imgs)}", flush=True)
        for method, v in acc.items():
            cols = np.array(v).mean(0)
            row = {"coils": coils, "accel": args.accel, "method": method}
            if method == "normal":
                row.update(ms_warm=float(cols[0]), ms_after_forward=float(cols[1]))
            else:
                row.update(PSNR=float(cols[0]), net_over_NFE_x_forward=float(cols[1]),
                           rest_ms_per_update=float(cols[2]), time_over_NFE_x_forward=float(cols[3]))
            rows.append(row)
    write_table(args.name, rows, {**machine(), "model": args.model, "slices": args.n, "steps": args.steps,
                                  "subjects": subjects, "forward_s_batch1": "timed next to every slice"})


if __name__ == "__main__":
    main()
