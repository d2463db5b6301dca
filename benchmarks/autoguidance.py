"""Samples of a prior with autoguidance weight w against real held-out slices: image statistics.

No pretrained feature network exists offline, so the samples are compared with real slices of the
prior's held-out subjects on statistics a reader can interpret: the radially averaged power spectrum
(mean |difference of log10 power| in a low, mid and high spatial-frequency band: speckle shows as
excess high-frequency power, blur as a deficit) and the 1-Wasserstein distance between foreground
intensity distributions (pixels > 0.05, normalised units). The row "real vs real" compares two
disjoint sets of real slices of the same size: the floor set by sampling alone. Same seed, sampler
and steps for every row; w = 1 is the prior alone, the guide row is the shipped guide model alone.

    python benchmarks/autoguidance.py --data ../shared/data --model brain-t1 --weights 1,1.5,2,2.5,3 [--n 48]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, write_table
from mediff.data import percentile_scale
from mediff.prior import load_prior
from mediff.samplers import SAMPLERS, nfe
from mediff.schedules import karras

BANDS = {"low": (0.0, 0.1), "mid": (0.1, 0.25), "high": (0.25, 0.5)}  # cycles per pixel


def log_spectrum(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over images (N, H, W) of log10 radially averaged power; returns (frequencies, log power)."""
    n, h, w = images.shape
    power = np.abs(np.fft.fftshift(np.fft.fft2(images), axes=(-2, -1))) ** 2 / (h * w)
    fy, fx = np.meshgrid(np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing="ij")
    r = np.sqrt(fx**2 + fy**2)
    bins = np.arange(1, h // 2 + 1) / h  # ring k holds radii in [(k-1)/h, k/h)
    ring = np.digitize(r, bins)
    radial = np.stack([np.bincount(ring.ravel(), p.ravel(), len(bins) + 1)[: len(bins)] for p in power])
    radial /= np.bincount(ring.ravel(), minlength=len(bins) + 1)[: len(bins)]
    return bins - 0.5 / h, np.log10(radial + 1e-12).mean(0)


def stats(images: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Spectral band distances and foreground-intensity W1 of ``images`` against ``real`` (both (N, H, W))."""
    f, a = log_spectrum(images)
    _, b = log_spectrum(real)
    out = {f"spec_{k}": float(np.abs(a - b)[(f >= lo) & (f < hi)].mean()) for k, (lo, hi) in BANDS.items()}
    fa, fb = np.sort(images[images > 0.05]), np.sort(real[real > 0.05])
    q = np.linspace(0, 1, 1001)[1:-1]
    out["intensity_W1"] = float(np.abs(np.quantile(fa, q) - np.quantile(fb, q)).mean())
    out["foreground_frac"] = float((images > 0.05).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--weights", default="1,1.5,2,2.5,3")
    ap.add_argument("--n", type=int, default=48, help="samples per row (and real slices per set)")
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="autoguidance")
    args = ap.parse_args()
    prior = load_prior(args.model)
    d = np.load(args.data / "ixi_t1" / "ixi_t1_axial_128.npz")
    ids = d["subject_ids"][d["subject_index"]].astype(str)
    held = np.flatnonzero(np.isin(ids, prior.meta.data.val_subjects))
    picks = np.random.default_rng(args.seed).permutation(held)[: 2 * args.n]
    real = d["images"][np.sort(picks)].astype(np.float32)
    real /= percentile_scale(real)[:, None, None]
    ref, other = real[: args.n], real[args.n:]
    rows = [{"row": "real vs real", "weight": "", "nfe_per_image": 0, **stats(other, ref), "s_per_image": 0.0}]
    sigmas = karras(args.steps, prior.sigma_min, prior.sigma_max).float()
    runs = [("guide alone", prior.guide, 1.0)] if prior.guide is not None else []
    runs += [("prior" if w == 1 else "autoguided", prior, w) for w in map(float, args.weights.split(","))]
    for label, model, w in runs:
        den, _ = model.autoguided(w)  # unconditional: no covariates is the null condition
        gen = torch.Generator().manual_seed(args.seed)
        t = time.perf_counter()
        with torch.no_grad():
            x = torch.randn((args.n, 1, prior.image_size, prior.image_size), generator=gen) * sigmas[0]
            out = torch.cat([SAMPLERS[args.sampler](den, xb, sigmas, generator=gen) for xb in x.split(16)])
        secs = (time.perf_counter() - t) / args.n
        step = model.meta.step
        rows.append({"row": f"{label} (step {step})", "weight": w,
                     "nfe_per_image": nfe(args.sampler, args.steps) * (1 if w == 1 else 2),
                     **stats(out.clamp_min(0)[:, 0].numpy(), ref), "s_per_image": secs})
        print(rows[-1], flush=True)
    write_table(args.name, rows, {**machine(), "model": args.model, "step": prior.meta.step,
                                  "guide_step": prior.guide.meta.step if prior.guide is not None else None,
                                  "n": args.n, "sampler": args.sampler, "steps": args.steps, "seed": args.seed,
                                  "subjects": sorted(set(ids[picks]))})


if __name__ == "__main__":
    main()
