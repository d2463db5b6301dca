"""Hounsfield units, attenuation and low-dose (Poisson) sinogram simulation."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.physics.operators import LinearOperator

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy, 1/mm


def hu_to_mu(hu: Tensor | float, mu_water: float = MU_WATER_PER_MM) -> Tensor | float:
    """Hounsfield units -> linear attenuation in 1/mm: mu = mu_water (1 + HU / 1000)."""
    if not mu_water > 0:
        raise MediffError(f"mu_water must be > 0 (1/mm), got {mu_water!r}")
    return mu_water * (1.0 + hu / 1000.0)


def mu_to_hu(mu: Tensor | float, mu_water: float = MU_WATER_PER_MM) -> Tensor | float:
    """Linear attenuation in 1/mm -> Hounsfield units: HU = 1000 (mu / mu_water - 1)."""
    if not mu_water > 0:
        raise MediffError(f"mu_water must be > 0 (1/mm), got {mu_water!r}")
    return 1000.0 * (mu / mu_water - 1.0)


def check_hu(image: Tensor | np.ndarray) -> None:
    """Raise MediffError unless ``image`` looks like a CT slice in Hounsfield units.

    A real HU slice contains air (about -1000 HU) around the patient, so the minimum must be below
    -500; images normalised to [0, 1], 8-bit images or attenuation maps (~0.02 /mm) all fail that.
    Values beyond [-10000, 100000] HU are rejected as implausible (wrong units or corrupt data).
    """
    arr = torch.as_tensor(np.asarray(image)) if not isinstance(image, Tensor) else image.detach()
    if arr.numel() == 0:
        raise MediffError("CT image is empty")
    if arr.is_complex() or arr.dtype == torch.bool:
        raise MediffError(f"CT image must be real-valued HU, got {arr.dtype}")
    arr = arr.double()
    if not bool(torch.isfinite(arr).all()):
        raise MediffError("CT image contains NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo > -500.0:
        raise MediffError(
            f"CT image does not look like Hounsfield units: values in [{lo:.4g}, {hi:.4g}] contain no air "
            "(about -1000 HU); convert normalised or attenuation data to HU first"
        )
    if lo < -10000.0 or hi > 100000.0:
        raise MediffError(f"CT image values [{lo:.4g}, {hi:.4g}] are implausible for Hounsfield units")


def simulate_sinogram(
    mu_image: Tensor,
    op: LinearOperator,
    dose_I0: float | None = None,  # noqa: N803 - I0 is the standard symbol
    electronic_noise_sigma: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Simulate measured line integrals from an attenuation image (B, 1, N, N) in 1/mm.

    Clean: p = A mu. Low dose (``dose_I0`` = unattenuated photons per detector bin): counts ~
    Poisson(I0 exp(-p)) + N(0, electronic_noise_sigma^2), floored at 1 count (log of a non-positive
    count is undefined; this caps p at log(I0)), then p_noisy = -log(counts / I0).
    Randomness comes only from ``generator`` (required when noise is simulated); the global torch
    RNG is never touched. Returns (B, 1, n_views, n_detectors) in the dtype of ``mu_image``.
    """
    # Validate everything before the (possibly large) projection.
    if dose_I0 is None:
        if electronic_noise_sigma:
            raise MediffError("electronic_noise_sigma is in detector counts and needs dose_I0")
        return op.A(mu_image)
    if not (math.isfinite(float(dose_I0)) and float(dose_I0) > 0):
        raise MediffError(f"dose_I0 must be a positive photon count, got {dose_I0!r}")
    if not (math.isfinite(float(electronic_noise_sigma)) and float(electronic_noise_sigma) >= 0):
        raise MediffError(f"electronic_noise_sigma must be >= 0, got {electronic_noise_sigma!r}")
    if generator is None:
        raise MediffError("simulate_sinogram needs an explicit torch.Generator for reproducible noise")
    p = op.A(mu_image)
    # Poisson sampling in float64: float32 rates lose integer resolution above ~1.6e7 counts.
    rate = float(dose_I0) * torch.exp(-p.detach().double())
    counts = torch.poisson(rate, generator=generator)
    if electronic_noise_sigma > 0:
        counts = counts + float(electronic_noise_sigma) * torch.randn(
            counts.shape, dtype=counts.dtype, device=counts.device, generator=generator
        )
    counts = counts.clamp_min(1.0)
    return (-torch.log(counts / float(dose_I0))).to(p.dtype)
