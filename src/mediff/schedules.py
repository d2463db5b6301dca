"""Noise schedules: pure functions returning a descending sigma tensor (n + 1,) that ends in 0.

Sigmas are noise standard deviations in the data's units (variance-exploding convention, which every
sampler here uses). A VP/DDPM model's discrete steps map to sigma = sqrt((1 - abar) / abar).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _append_zero(s: Tensor) -> Tensor:
    return torch.cat([s, s.new_zeros(1)])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (EDM) Eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    if n < 1:
        raise ValueError("need at least one step")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def log_linear(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Geometric spacing in sigma (the annealed-Langevin schedule of Song & Ermon 2019)."""
    return _append_zero(torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=torch.float64))


def vp_sigmas(alphas_cumprod: Tensor, n: int) -> Tensor:
    """n of a VP model's T training steps, evenly spaced from T-1 down to 0, as VE sigmas + 0.

    Euler on these sigmas is deterministic DDIM (Song et al. 2021) on the same steps of the same model.
    """
    T = len(alphas_cumprod)
    steps = torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long()
    abar = alphas_cumprod.double()[steps]
    return _append_zero(((1 - abar) / abar).sqrt())


SCHEDULES = {"karras": karras, "loglinear": log_linear}
