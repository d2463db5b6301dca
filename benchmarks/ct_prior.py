"""Which CT prior to ship: candidates trained on the same patients, compared on the held-out ones.

For each candidate (e.g. whole-slice training vs Patch Diffusion, ``training/train_ct.sh``), on
every slice of the patients both held out (their ``data.val_subjects``, the same split):
denoising PSNR at sigma 0.05 / 0.1 / 0.2 (u units, u = (HU + 1000) / 2000, data range 1; a prior
trained on crops only also on the whole slice at once, ``*_whole_image``, against its tiles) and
reconstruction PSNR at 60 views with DDS and DDNM (HU window [-1000, 1000], as ``benchmarks/ct.py``),
beside FBP.

    python benchmarks/ct_prior.py --data ../shared/data/ct_tcga \
        --candidates whole=training/ct-whole/prior.safetensors,patch=training/ct-patch/prior.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import machine, write_table
from ct import load_slices, make_task
from mediff import metrics
from mediff.prior import load_prior
from mediff.recon import run_solver
from mediff.recon.ct import fit_hu, hu_window

SIGMAS = (0.05, 0.1, 0.2)


def denoise_psnr(prior, clean: torch.Tensor) -> dict[str, float]:
    """Mean denoising PSNR (u units, data range 1) of clean images (N, 1, H, W) at each of SIGMAS
    (noise from seed 0, the same for every candidate)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for s in SIGMAS:
        noisy = clean + s * torch.randn(clean.shape, generator=gen)
        with torch.no_grad():
            den = torch.cat([prior(c, torch.full((len(c),), s)) for c in noisy.split(4)])
        out[f"denoise_PSNR_s{s}"] = float(metrics.psnr(den, clean, 1.0).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/ct_tcga"))
    ap.add_argument("--candidates", required=True, help="name=checkpoint,name=checkpoint")
    ap.add_argument("--views", type=int, default=60)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--solvers", default="dds,ddnm")
    ap.add_argument("--name", default="ct_prior")
    args = ap.parse_args()
    cands = dict(c.split("=", 1) for c in args.candidates.split(","))
    priors = {k: load_prior(v) for k, v in cands.items()}
    splits = {tuple(sorted(p.meta.data.val_subjects)) for p in priors.values()}
    if len(splits) != 1:
        raise SystemExit("the candidates hold out different patients: train them with the same seed and data")
    patients = list(splits.pop())
    slices = load_slices(args.data, patients, None)
    rows = []
    for name, prior in priors.items():
        hu_range = hu_window(prior.meta.normalization, prior.name)
        size = prior.image_size
        clean = torch.stack([prior.normalize(fit_hu(hu, size, px)[0])[0] for _, hu, px in slices]).clamp_min(0)[:, None]
        row: dict = {"candidate": name, "step": prior.meta.step, "images_seen": prior.meta.images_seen}
        row.update(denoise_psnr(prior, clean))
        net = getattr(prior.model, "fine", prior.model)  # a two-scale prior's fine network
        if net.tile is not None:  # crops only: tile by tile (the default) against the whole slice at once
            tile, net.tile = net.tile, None
            row.update({f"{k}_whole_image": v for k, v in denoise_psnr(prior, clean).items()})
            net.tile = tile
        for m in ["fbp", *[s for s in args.solvers.split(",") if s]]:
            psnr = [t.score(run_solver(t, m, prior, args.steps, seed=i).mean)["PSNR"]
                    for i, t in enumerate(make_task(hu, px, size, (args.views, None, None), i, hu_range)
                                          for i, (_, hu, px) in enumerate(slices))]
            row[f"{m}_{args.views}v_PSNR"] = float(np.mean(psnr))
        print(row, flush=True)
        rows.append(row)
    write_table(args.name, rows, {**machine(), "candidates": cands, "eval_patients": patients,
                                  "n_slices": len(slices), "views": args.views, "steps": args.steps,
                                  "metric": "denoising: u units, data range 1; reconstruction: HU window "
                                            "[-1000, 1000], data range 2000"})


if __name__ == "__main__":
    main()
