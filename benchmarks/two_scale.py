"""Where the coarse whole-image model of a two-scale prior helps: denoising PSNR against noise level.

For a prior file that ships a coarse model (``mediff.prior.attach_coarse``; ``ct-native`` ships the
128-px ``ct``), on every slice of the held-out patients (the fine prior's ``data.val_subjects``) at
its own grid: the fine prior alone, the coarse prior alone (its estimate bilinearly upsampled), and
both combined at every sigma (``mediff.denoiser.TwoScale`` with from_sigma 0): where the coarse model's
block means are the better ones. Denoising is not the whole story (a reconstruction needs the layout
right at high noise first), so the shipped ``from_sigma`` is checked by reconstruction too
(``benchmarks/ct.py --native``). PSNR in u units, data range 1 (CT: u = (HU + 1000) / 2000); the
same noise (seed 0) for every column.

    python benchmarks/two_scale.py --model ct-native --data ../shared/data/ct_tcga

``--recon-slices N``: instead, DDS (50 NFE, ``benchmarks/ct.py``'s tasks, seeds and scoring on the
512-px grid) on the first N held-out slices with the coarse model used from each of ``--from-sigmas``
(``off``: the fine prior alone), side by side on the same tasks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import machine, write_table
from ct import TASKS, load_slices, make_task
from mediff import metrics
from mediff.denoiser import TwoScale
from mediff.prior import load_prior
from mediff.recon import run_solver
from mediff.recon.ct import fit_hu, hu_window

SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ct-native", help="a prior that ships a coarse model (name or path)")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/ct_tcga"))
    ap.add_argument("--name", default="two_scale")
    ap.add_argument("--recon-slices", type=int, default=0, help="reconstruct N slices instead of denoising")
    ap.add_argument("--from-sigmas", default="off,0.2,1.0")
    ap.add_argument("--tasks", default="limited 120 deg (60 views),30 views", help="benchmarks/ct.py task names")
    args = ap.parse_args()
    prior = load_prior(args.model)
    if not isinstance(prior.model, TwoScale):
        raise SystemExit(f"{args.model} ships no coarse model (mediff.prior.attach_coarse)")
    if args.recon_slices:
        return reconstruct(prior, args)
    two = prior.model
    both = TwoScale(two.fine, two.coarse, two.factor, 0.0)
    patients = sorted(prior.meta.data.val_subjects)
    slices = load_slices(args.data, patients, None)
    size = prior.image_size
    clean = torch.stack([prior.normalize(fit_hu(hu, size, px)[0])[0] for _, hu, px in slices]).clamp_min(0)[:, None]
    gen = torch.Generator().manual_seed(0)
    columns = {"fine": two.fine, "coarse_upsampled": lambda x, s: two.up(two.coarse(two.down(x), s / two.factor)),
               "two_scale": both}
    rows = []
    for s in SIGMAS:
        noisy = clean + s * torch.randn(clean.shape, generator=gen)
        row: dict = {"sigma": s}
        with torch.no_grad():
            for name, den in columns.items():
                out = torch.cat([den(c, torch.full((len(c),), s)) for c in noisy.split(2)])
                row[f"{name}_PSNR"] = float(metrics.psnr(out, clean, 1.0).mean())
        print(row, flush=True)
        rows.append(row)
    better = [r["sigma"] for r in rows if r["two_scale_PSNR"] > r["fine_PSNR"]]
    write_table(args.name, rows, {**machine(), "model": args.model, "step": prior.meta.step,
                                  "coarse_step": prior.meta.coarse.step, "factor": two.factor,
                                  "shipped_from_sigma": two.from_sigma, "eval_patients": patients,
                                  "n_slices": len(slices), "two_scale_better_at": better,
                                  "metric": "denoising PSNR, u units, data range 1"})


def reconstruct(prior, args: argparse.Namespace) -> None:
    """DDS PSNR per task and from_sigma on the first ``args.recon_slices`` held-out slices."""
    patients = sorted(prior.meta.data.val_subjects)
    slices = load_slices(args.data, patients, args.recon_slices)
    hu_range, shipped = hu_window(prior.meta.normalization, prior.name), prior.model.from_sigma
    rows = []
    for name in args.tasks.split(","):
        tasks = [make_task(hu, px, prior.image_size, TASKS[name], i, hu_range, True) for i, (_, hu, px) in enumerate(slices)]
        for fs in args.from_sigmas.split(","):
            prior.model.from_sigma = float("inf") if fs == "off" else float(fs)
            runs = [run_solver(t, "dds", prior, 50, seed=i) for i, t in enumerate(tasks)]
            psnr = [t.score(r.mean)["PSNR"] for t, r in zip(tasks, runs)]
            rows.append({"task": name, "from_sigma": fs, "PSNR": float(np.mean(psnr)), "PSNR_per_slice": psnr,
                         "s_per_slice": float(np.mean([r.seconds for r in runs]))})
            print(rows[-1], flush=True)
    prior.model.from_sigma = shipped
    write_table(args.name, rows, {**machine(), "model": args.model, "step": prior.meta.step,
                                  "coarse_step": prior.meta.coarse.step, "shipped_from_sigma": shipped,
                                  "eval_patients": patients, "n_slices": len(slices), "solver": "dds", "NFE": 50,
                                  "metric": "PSNR, HU window [-1000, 1000], on each slice's own grid"})


if __name__ == "__main__":
    main()
