"""Tests for mediff.metrics: closed-form values, reference implementations, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mediff.errors import MediffError
from mediff.metrics import coverage, nmse, psnr, ssim, uncertainty_stats


def _smooth_images(shape: tuple[int, ...], seed: int, sigma: float = 2.0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    sig = (0,) + (sigma,) * (len(shape) - 1)
    return gaussian_filter(rng.random(shape), sig)


# ---------------------------------------------------------------------------------------------- PSNR


def test_psnr_known_mse_and_per_item() -> None:
    ref = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    offsets = torch.tensor([0.1, 0.01, 0.5], dtype=torch.float64)
    x = ref + offsets.view(3, 1, 1, 1)  # MSE = offset² exactly
    out = psnr(x, ref, data_range=1.0)
    assert out.shape == (3,)
    expected = 10 * torch.log10(1.0 / offsets**2)
    torch.testing.assert_close(out, expected)
    assert out[0].item() == pytest.approx(20.0)


def test_psnr_data_range_scaling_and_per_item_range() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64)
    x = ref + 0.05 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    p1 = psnr(x, ref, 1.0)
    p2 = psnr(x, ref, 2.0)
    torch.testing.assert_close(p2 - p1, torch.full((2,), 20 * math.log10(2.0), dtype=torch.float64))
    mixed = psnr(x, ref, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(mixed, torch.stack([p1[0], p2[1]]))


def test_psnr_mask_restricts_region() -> None:
    ref = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x = ref.clone()
    x[..., :2, :] = 0.1  # error only in the top half
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True
    assert psnr(x, ref, 1.0, mask=mask).item() == pytest.approx(20.0)
    assert psnr(x, ref, 1.0).item() == pytest.approx(10 * math.log10(1 / 0.005))
    assert math.isinf(psnr(x, ref, 1.0, mask=~mask).item())
    with pytest.raises(MediffError):
        psnr(x, ref, 1.0, mask=torch.zeros_like(mask))


def test_psnr_complex_uses_magnitude() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    phase = torch.exp(1j * torch.rand(ref.shape, generator=g, dtype=torch.float64))
    assert (psnr(ref * phase, ref, 1.0) > 200).all()  # equal up to rounding of |x·e^{iφ}|
    assert (psnr(ref * phase, ref * phase.real, 1.0) < 60).all()


def test_bad_inputs_raise() -> None:
    a = torch.zeros(2, 1, 8, 8)
    with pytest.raises(MediffError):
        psnr(a, torch.zeros(2, 1, 8, 7), 1.0)
    with pytest.raises(MediffError):
        psnr(a, a, 0.0)
    with pytest.raises(MediffError):
        psnr(a, a, torch.ones(3))


# ---------------------------------------------------------------------------------------------- NMSE


def test_nmse_known_value() -> None:
    ref = torch.ones(2, 1, 4, 4, dtype=torch.float64)
    x = torch.stack([ref[0] * 1.1, ref[1] * 0.5])
    torch.testing.assert_close(nmse(x, ref), torch.tensor([0.01, 0.25], dtype=torch.float64))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    x2 = ref.clone()
    x2[..., 1:, :] = 5.0  # errors outside the mask are ignored
    torch.testing.assert_close(nmse(x2, ref, mask=mask), torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- SSIM


def test_ssim_identity_is_one() -> None:
    x = torch.tensor(_smooth_images((3, 1, 32, 32), 0), dtype=torch.float64)
    torch.testing.assert_close(ssim(x, x, 1.0), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 40, 48), (2, 16, 18, 20)])
def test_ssim_matches_skimage(shape: tuple[int, ...]) -> None:
    from skimage.metrics import structural_similarity

    ref = _smooth_images(shape, 1)
    rng = np.random.default_rng(2)
    noisy = ref + 0.05 * rng.standard_normal(shape) + 0.02
    dr = 1.3
    ours = ssim(torch.tensor(noisy)[:, None], torch.tensor(ref)[:, None], dr)
    assert ours.shape == (shape[0],)
    for i in range(shape[0]):
        sk = structural_similarity(
            noisy[i], ref[i], data_range=dr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert ours[i].item() == pytest.approx(sk, abs=1e-3)
    # Per-item data_range: a larger range shrinks the constants' influence differently per item.
    mixed = ssim(torch.tensor(noisy)[:, None], torch.tensor(ref)[:, None], torch.tensor([dr] + [10.0] * (shape[0] - 1)))
    assert mixed[0].item() == pytest.approx(ours[0].item())
    assert not torch.allclose(mixed[1:], ours[1:])


def test_ssim_orders_quality_and_complex() -> None:
    ref = torch.tensor(_smooth_images((1, 1, 32, 32), 3))
    g = torch.Generator().manual_seed(0)
    small = ref + 0.02 * torch.randn(ref.shape, generator=g, dtype=ref.dtype)
    large = ref + 0.2 * torch.randn(ref.shape, generator=g, dtype=ref.dtype)
    assert ssim(small, ref, 1.0).item() > ssim(large, ref, 1.0).item()
    phased = ref * torch.exp(torch.tensor(0.7j, dtype=torch.complex128))
    assert ssim(phased, ref, 1.0).item() == pytest.approx(1.0)
    with pytest.raises(MediffError):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 1.0)  # smaller than the 11-tap window


# ---------------------------------------------------------------------------------------------- coverage


def test_coverage_calibrated_samples() -> None:
    g = torch.Generator().manual_seed(0)
    k, b, n = 200, 2, 48
    # Calibrated posterior: reference and samples are independent draws from the same N(mu, 1).
    # (Samples centred on the reference itself would cover it almost surely, not at rate `level`.)
    mu = torch.rand(b, 1, n, n, generator=g, dtype=torch.float64)
    ref = mu + torch.randn(mu.shape, generator=g, dtype=torch.float64)
    samples = mu + torch.randn((k, b, 1, n, n), generator=g, dtype=torch.float64)
    cov = coverage(samples, ref, level=0.9)
    assert cov.shape == (b,)
    # Binomial CLT bound over n² pixels (4 sigma) plus the O(1/K) order-statistic bias.
    tol = 4 * math.sqrt(0.9 * 0.1 / n**2) + 2.0 / k
    assert torch.all((cov - 0.9).abs() < tol), cov
    # Far-off reference: essentially never covered.
    assert torch.all(coverage(samples, ref + 10.0, level=0.9) < 1e-3)
    # Over-dispersed samples over-cover, under-dispersed under-cover.
    assert torch.all(coverage(mu + 3 * (samples - mu), ref, 0.9) > 0.99)
    assert torch.all(coverage(mu + 0.3 * (samples - mu), ref, 0.9) < 0.5)
    # Level is respected: 50% interval covers about half.
    assert torch.all((coverage(samples, ref, level=0.5) - 0.5).abs() < 4 * math.sqrt(0.25 / n**2) + 2.0 / k)


def test_coverage_mean_std_variant_and_mask() -> None:
    g = torch.Generator().manual_seed(1)
    b, n = 2, 64
    mean = torch.zeros(b, 1, n, n, dtype=torch.float64)
    std = torch.ones_like(mean)
    ref = torch.randn(mean.shape, generator=g, dtype=torch.float64)
    cov = coverage(None, ref, 0.9, mean=mean, std=std)
    assert torch.all((cov - 0.9).abs() < 4 * math.sqrt(0.09 / n**2))
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[: n // 2] = True
    ref2 = ref.clone()
    ref2[..., n // 2 :, :] = 100.0  # uncovered, but outside the mask
    torch.testing.assert_close(
        coverage(None, ref2, 0.9, mean=mean, std=std, mask=mask),
        coverage(None, ref, 0.9, mean=mean, std=std, mask=mask),
    )
    with pytest.raises(MediffError):
        coverage(None, ref, 0.9)
    with pytest.raises(MediffError):
        coverage(ref[None].expand(3, *ref.shape), ref, 1.5)


def test_uncertainty_stats() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 2, 1, 4, 4, generator=g, dtype=torch.float64)
    m, sd = uncertainty_stats(s)
    assert m.shape == sd.shape == (2, 1, 4, 4)
    torch.testing.assert_close(m, s.mean(0))
    torch.testing.assert_close(sd, torch.from_numpy(np.std(s.numpy(), axis=0, ddof=1)))
    mc, _ = uncertainty_stats(s.to(torch.complex128) * 1j)
    torch.testing.assert_close(mc, s.abs().mean(0))  # complex -> magnitude
    with pytest.raises(MediffError):
        uncertainty_stats(s[:1])
