"""Noise schedules: descending sigma tensors of length n + 1 that end in exactly 0."""

from __future__ import annotations

import math

import pytest
import torch

from mediff.denoiser import linear_beta_alphas_cumprod
from mediff.schedules import SCHEDULES, karras, log_linear, vp_sigmas

SMIN, SMAX = 0.002, 80.0


def _check_shape(s: torch.Tensor, n: int) -> None:
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    assert s[-1].item() == 0.0
    assert (s[:-1] > 0).all()
    assert (s.diff() < 0).all()  # strictly descending, including the final drop to 0


@pytest.mark.parametrize("n", [2, 5, 18, 256])
def test_karras(n):
    s = karras(n, SMIN, SMAX)
    _check_shape(s, n)
    assert s[0].item() == pytest.approx(SMAX, rel=1e-14)
    assert s[-2].item() == pytest.approx(SMIN, rel=1e-12)
    # EDM Eq. 5 evaluated independently, rho = 7.
    lo, hi = SMIN ** (1 / 7), SMAX ** (1 / 7)
    ref = [(hi + i / (n - 1) * (lo - hi)) ** 7 for i in range(n)]
    assert s[:-1].tolist() == pytest.approx(ref, rel=1e-12)


def test_karras_rho_changes_spacing_and_edge_cases():
    a, b = karras(10, SMIN, SMAX, rho=7.0), karras(10, SMIN, SMAX, rho=1.0)
    assert torch.allclose(b[:-1], torch.linspace(SMAX, SMIN, 10, dtype=torch.float64), rtol=1e-12)
    assert a[5] < b[5]  # rho > 1 spends more steps at low noise
    one = karras(1, SMIN, SMAX)
    assert one.tolist() == [pytest.approx(SMAX), 0.0]
    with pytest.raises(ValueError):
        karras(0, SMIN, SMAX)


@pytest.mark.parametrize("n", [2, 10, 100])
def test_log_linear_is_geometric(n):
    s = log_linear(n, SMIN, SMAX)
    _check_shape(s, n)
    ratios = s[1:-1] / s[:-2]
    assert torch.allclose(ratios, torch.full_like(ratios, (SMIN / SMAX) ** (1 / (n - 1))), rtol=1e-6)
    assert s[0].item() == pytest.approx(SMAX, rel=1e-6)
    assert s[-2].item() == pytest.approx(SMIN, rel=1e-6)


def test_log_linear_endpoints_exact():
    s = log_linear(10, SMIN, SMAX)
    assert s[0].item() == pytest.approx(SMAX, rel=1e-12)
    assert s[-2].item() == pytest.approx(SMIN, rel=1e-12)


def test_schedule_registry():
    assert SCHEDULES["karras"] is karras and SCHEDULES["loglinear"] is log_linear


@pytest.mark.parametrize("n", [1, 10, 50, 1000])
def test_vp_sigmas_on_ddim_timesteps(n):
    abar = linear_beta_alphas_cumprod(1000)
    grid = ((1 - abar) / abar).sqrt()
    s = vp_sigmas(abar, n)
    _check_shape(s, n)
    # Every sigma is sqrt((1 - abar_t) / abar_t) at an integer DDIM timestep t.
    steps = torch.stack([(grid - v).abs().argmin() for v in s[:-1]])
    assert torch.allclose(s[:-1], grid[steps], rtol=1e-14, atol=0)
    assert steps[0].item() == 999  # starts from the last training step
    if n > 1:
        gaps = -steps.diff()
        # Uniform skip: the step spacing varies by at most one from rounding.
        assert gaps.max() - gaps.min() <= 1 and gaps.min() >= 1
        assert steps[-1].item() < 1000 / n  # and reaches down to the first skip interval
    if n == 1000:
        assert steps.tolist() == list(range(999, -1, -1))


def test_vp_sigmas_other_schedule():
    # A cosine schedule (Nichol & Dhariwal 2021), to make sure nothing assumes the linear betas.
    T = 200
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = (f(t) / f(torch.zeros(1, dtype=torch.float64))).clamp(1e-6, 1)
    s = vp_sigmas(abar, 8)
    _check_shape(s, 8)
    assert s[0].item() == pytest.approx(((1 - abar[-1]) / abar[-1]).sqrt().item(), rel=1e-14)
