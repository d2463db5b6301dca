"""Synthesis metrics on closed-form cases: Fréchet distances of shifted and scaled Gaussians, precision /
recall / density / coverage counted by hand, and MS-SSIM diversity of copies and of noise."""

from __future__ import annotations

import math

import pytest
import torch

from mediff.errors import MediffError
from mediff.synthesis_metrics import (MS_SSIM_WEIGHTS, frechet_distance, frechet_distance_inf, ms_ssim_diversity,
                                     ms_ssim_scales, prdc)


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn((n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def whitened(n: int, d: int, seed: int) -> torch.Tensor:
    """Samples whose sample mean is exactly 0 and sample covariance exactly I (n - 1 normalisation)."""
    x = gaussian(n, d, seed)
    x = x - x.mean(0)
    cov = x.T @ x / (n - 1)
    return x @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


def test_frechet_distance_of_identical_sets_is_zero() -> None:
    x = gaussian(300, 16, 0)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift() -> None:
    """N(m1, S) vs N(m2, S) = |m1 - m2|^2: a shift leaves the sample covariance unchanged."""
    x = gaussian(400, 8, 1) @ gaussian(8, 8, 2)  # a non-diagonal S
    shift = torch.linspace(-1, 2, 8, dtype=torch.float64)
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_scaled_gaussians() -> None:
    """N(0, a^2 I) vs N(0, b^2 I) in D dimensions: D (a - b)^2."""
    x = whitened(500, 6, 3)
    assert frechet_distance(2.0 * x, 0.5 * x) == pytest.approx(6 * 1.5 ** 2, rel=1e-6)


def test_frechet_distance_inf_removes_the_small_sample_bias() -> None:
    """Two samples of one Gaussian: FD of 200 points in 32 dimensions sits well above 0 (its 1 / n
    bias); extrapolated to an infinite set it is near 0, and a true shift survives it."""
    ref, x = gaussian(20000, 32, 0), gaussian(200, 32, 1)
    plain = frechet_distance(ref, x)
    inf = frechet_distance_inf(ref, x, torch.Generator().manual_seed(0))
    assert plain > 1.0 and abs(inf) < 0.25 * plain, (plain, inf)
    shift = torch.full((32,), 0.5, dtype=torch.float64)
    shifted = frechet_distance_inf(ref, x + shift, torch.Generator().manual_seed(0))
    assert shifted - inf == pytest.approx(float(shift @ shift), rel=0.2)
    with pytest.raises(MediffError, match="2 sizes"):
        frechet_distance_inf(ref, x[:2], torch.Generator().manual_seed(0))


def test_frechet_distance_rejects_bad_features() -> None:
    with pytest.raises(MediffError, match="feature lengths differ"):
        frechet_distance(gaussian(10, 4, 0), gaussian(10, 5, 1))
    with pytest.raises(MediffError, match="at least 2"):
        frechet_distance(gaussian(1, 4, 0), gaussian(10, 4, 1))


def test_prdc_of_identical_sets() -> None:
    x = gaussian(200, 8, 4)
    m = prdc(x, x, k=5)
    assert m["precision"] == m["recall"] == m["coverage"] == 1.0
    assert m["density"] >= 1.0  # every point is at least in its own ball


def test_prdc_counted_by_hand() -> None:
    """1D, k = 1. Real 0, 1, 3: ball radii 1, 1, 2. Fake 0.5, 0.6, 10: radii 0.1, 0.1, 9.4.
    0.5 and 0.6 are in the balls of 0 and 1, 10 in none: precision 2/3, density (2 + 2 + 0) / 3.
    Real 1 and 3 are in the ball of 10, 0 in none: recall 2/3. The balls of 0 and 1 hold a fake
    point, the ball of 3 (nearest fake 0.6, 2.4 away) none: coverage 2/3."""
    real = torch.tensor([[0.0], [1.0], [3.0]])
    fake = torch.tensor([[0.5], [0.6], [10.0]])
    m = prdc(real, fake, k=1)
    assert m == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "density": 4 / 3, "coverage": 2 / 3})


def test_prdc_of_disjoint_sets_is_zero() -> None:
    x = gaussian(100, 4, 5)
    assert prdc(x, x + 100.0, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_worse_generator_ranks_worse_on_every_feature_metric() -> None:
    """Real N(0, I); fakes N(s, I) with growing shifts s: FD grows, every PRDC share falls."""
    real = gaussian(500, 8, 6)
    rows = [{"FD": frechet_distance(real, gaussian(500, 8, 7) + s), **prdc(real, gaussian(500, 8, 7) + s)}
            for s in (0.0, 0.5, 1.5)]
    assert rows[0]["FD"] < rows[1]["FD"] < rows[2]["FD"]
    for key in ("precision", "recall", "density", "coverage"):
        assert rows[0][key] > rows[1][key] > rows[2][key], key
    assert rows[0]["precision"] > 0.8 and rows[0]["recall"] > 0.8  # two draws of one distribution


def test_prdc_needs_more_than_k_points() -> None:
    with pytest.raises(MediffError, match="at least 6"):
        prdc(gaussian(5, 4, 0), gaussian(50, 4, 1), k=5)


def test_ms_ssim_scales_fit_the_image() -> None:
    assert ms_ssim_scales(128) == pytest.approx(MS_SSIM_WEIGHTS)
    for size, n in ((64, 4), (32, 3)):
        w = ms_ssim_scales(size)
        assert len(w) == n and math.isclose(sum(w), sum(MS_SSIM_WEIGHTS))
    with pytest.raises(MediffError, match="at least 7 px"):
        ms_ssim_scales(6)


def test_ms_ssim_diversity_of_copies_and_of_noise() -> None:
    """Copies of one image are as alike as can be (1); independent noise images are not (near 0)."""
    gen = torch.Generator().manual_seed(0)
    one = torch.rand((1, 1, 128, 128), generator=gen)
    assert ms_ssim_diversity(one.repeat(8, 1, 1, 1), 20, torch.Generator().manual_seed(1)) == pytest.approx(1.0)
    noise = torch.rand((8, 1, 128, 128), generator=gen)
    assert ms_ssim_diversity(noise, 20, torch.Generator().manual_seed(1)) < 0.1


def test_ms_ssim_diversity_is_seeded_and_rejects_single_images() -> None:
    x = torch.rand((10, 1, 32, 32), generator=torch.Generator().manual_seed(2))
    a = ms_ssim_diversity(x, 30, torch.Generator().manual_seed(3))
    assert a == ms_ssim_diversity(x, 30, torch.Generator().manual_seed(3))
    with pytest.raises(MediffError, match="at least 2 images"):
        ms_ssim_diversity(x[:1], 30, torch.Generator().manual_seed(3))
