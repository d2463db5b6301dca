"""The prior as a denoiser on held-out subjects vs classical denoisers tuned with the oracle.

For sigma in {0.05, 0.1, 0.2} (normalised units, 1 = slice 99.5th percentile): PSNR of the prior's
D(x, sigma) against a Gaussian filter and TV denoising whose parameter is chosen per sigma to
maximise PSNR on the very same evaluation slices (an oracle, the best those methods can do).

    python benchmarks/denoise.py --data ../shared/data --model brain-t1 [--n 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import heldout_slices, machine, write_table
from mediff import baselines, metrics
from mediff.data import percentile_scale
from mediff.prior import load_prior

SIGMAS = (0.05, 0.1, 0.2)
GAUSS_PX = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
TV_LAMBDA = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)


def best(fn, grid, noisy, clean) -> tuple[float, float]:
    scores = [(float(metrics.psnr(fn(noisy, p), clean, 1.0).mean()), p) for p in grid]
    return max(scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--n", type=int, default=64, help="held-out slices")
    args = ap.parse_args()
    prior = load_prior(args.model)
    subjects = prior.meta.data.val_subjects
    imgs, _ = heldout_slices(args.data / "ixi_t1" / "ixi_t1_axial_128.npz", subjects, args.n)
    clean = torch.from_numpy(imgs / percentile_scale(imgs)[:, None, None])[:, None]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for s in SIGMAS:
        noisy = clean + s * torch.randn(clean.shape, generator=gen)
        with torch.no_grad():
            den = torch.cat([prior(c, torch.full((len(c),), s)) for c in noisy.split(16)])
        g_psnr, g_p = best(baselines.gaussian_denoise, GAUSS_PX, noisy, clean)
        t_psnr, t_p = best(lambda x, lam: baselines.tv_denoise(x, lam, iters=100), TV_LAMBDA, noisy, clean)
        rows.append({"sigma": s, "noisy_PSNR": float(metrics.psnr(noisy, clean, 1.0).mean()),
                     "prior_PSNR": float(metrics.psnr(den, clean, 1.0).mean()),
                     "gaussian_oracle_PSNR": g_psnr, "gaussian_sigma_px": g_p,
                     "tv_oracle_PSNR": t_psnr, "tv_lambda": t_p,
                     "prior_minus_best_classical_dB": float(metrics.psnr(den, clean, 1.0).mean()) - max(g_psnr, t_psnr)})
    write_table("denoise", rows, {**machine(), "model": args.model, "step": prior.meta.step,
                                  "images_seen": prior.meta.images_seen, "n_slices": len(clean),
                                  "subjects": sorted(set(subjects))})


if __name__ == "__main__":
    main()
