"""Denoiser wrappers: the Gaussian oracle, EDM preconditioning, the eps adapter, CFG and autoguidance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mediff.denoiser import (AutoGuidedDenoiser, CFGDenoiser, EDMPrecond, EpsAdapter, GaussianDenoiser, TwoScale,
                             edm_sigma_range, linear_beta_alphas_cumprod)
from mediff.samplers import sample_heun
from mediff.schedules import karras

MU, S = 0.3, 0.5
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- GaussianDenoiser


def test_gaussian_denoiser_is_the_posterior_mean():
    """Orthogonality principle: E[x0|x] is the unique function (of this affine family) whose residual
    x0 - D(x) has mean zero and is uncorrelated with x. Checked by Monte Carlo at two noise levels."""
    g = _gen(0)
    n = 200_000
    for sigma in (0.2, 3.0):
        x0 = MU + S * torch.randn(n, generator=g, dtype=F64)
        x = x0 + sigma * torch.randn(n, generator=g, dtype=F64)
        r = x0 - GaussianDenoiser(MU, S)(x, torch.full((n,), sigma, dtype=F64))
        # sd of mean(r) is sqrt(post_var / n) <= S/sqrt(n); of mean(r (x - mean x)) <= S sqrt(S^2+sigma^2)/sqrt(n).
        assert abs(r.mean().item()) < 5 * S / math.sqrt(n)
        cov = (r * (x - x.mean())).mean().item()
        assert abs(cov) < 5 * S * math.sqrt(S**2 + sigma**2) / math.sqrt(n)
        # Posterior variance S^2 sigma^2 / (S^2 + sigma^2).
        assert r.var().item() == pytest.approx(S**2 * sigma**2 / (S**2 + sigma**2), rel=0.02)


def test_gaussian_denoiser_per_item_sigma_and_tensor_mean():
    mu = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)  # per-pixel prior mean (H, W)
    den = GaussianDenoiser(mu, S)
    x = torch.randn(3, 2, 2, generator=_gen(1), dtype=F64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    out = den(x, sigma)
    for i in range(3):
        c = S**2 / (S**2 + sigma[i] ** 2)
        assert torch.allclose(out[i], mu + c * (x[i] - mu), atol=1e-12)
    assert torch.allclose(den(x, torch.full((3,), 1e-8, dtype=F64)), x, atol=1e-12)  # no noise: identity
    assert torch.allclose(den(x, torch.full((3,), 1e8, dtype=F64)), mu.expand(3, 2, 2), atol=1e-12)


# ---------------------------------------------------------------- EDMPrecond


class _Recorder(nn.Module):
    """Returns a fixed value and records its inputs."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value, self.seen = value, []

    def forward(self, x, c_noise, cond=None):
        self.seen.append((x.clone(), c_noise.clone(), cond))
        return torch.full_like(x, self.value)


def _table1(sigma: torch.Tensor, sd: float):
    """EDM (Karras et al. 2022) Table 1, written out independently."""
    return {
        "c_skip": sd**2 / (sigma**2 + sd**2),
        "c_out": sigma * sd / torch.sqrt(sd**2 + sigma**2),
        "c_in": 1 / torch.sqrt(sigma**2 + sd**2),
        "c_noise": torch.log(sigma) / 4,
    }


def test_edm_precond_matches_table1():
    sd, mean = 0.7, 0.25
    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=F64)
    x = torch.randn(4, 1, 3, 3, generator=_gen(2), dtype=F64)
    k = _table1(sigma, sd)
    b = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731

    zero = _Recorder(0.0)
    out = EDMPrecond(zero, sigma_data=sd, data_mean=mean)(x, sigma)
    assert torch.allclose(out, mean + b(k["c_skip"]) * (x - mean), atol=1e-12)
    fx, fc, _ = zero.seen[0]
    assert torch.allclose(fx, b(k["c_in"]) * (x - mean), atol=1e-12)
    assert torch.allclose(fc, k["c_noise"], atol=1e-12)
    assert fc.shape == (4,)

    one = _Recorder(1.0)
    out = EDMPrecond(one, sigma_data=sd, data_mean=mean)(x, sigma)
    assert torch.allclose(out, mean + b(k["c_skip"]) * (x - mean) + b(k["c_out"]), atol=1e-12)


def _perfect_net(mu: float, std: float, sd: float) -> nn.Module:
    """The F for which EDM preconditioning equals the exact denoiser of N(mu, std^2), built from
    Table 1: F = (D_oracle - mean - c_skip xc) / c_out with xc = y / c_in, sigma = exp(4 c_noise)."""

    class Net(nn.Module):
        def forward(self, y, c_noise, cond=None):
            sigma = torch.exp(4 * c_noise)
            k = {n: v.reshape(-1, *([1] * (y.dim() - 1))) for n, v in _table1(sigma, sd).items()}
            xc = y / k["c_in"]
            d = GaussianDenoiser(mu, std)(xc + mu, sigma)
            return (d - mu - k["c_skip"] * xc) / k["c_out"]

    return Net()


def test_edm_precond_with_perfect_net_reproduces_oracle():
    std, sd = 0.8, 0.5  # data std differs from sigma_data, so F is non-zero
    den = EDMPrecond(_perfect_net(MU, std, sd), sigma_data=sd, data_mean=MU)
    oracle = GaussianDenoiser(MU, std)
    x = 3 * torch.randn(6, 1, 4, 4, generator=_gen(3), dtype=F64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=F64)
    assert torch.allclose(den(x, sigma), oracle(x, sigma), atol=1e-10)
    # When the data std equals sigma_data, F = 0 is already the exact denoiser (c_skip is the Wiener gain).
    zero = EDMPrecond(_Recorder(0.0), sigma_data=std, data_mean=MU)
    assert torch.allclose(zero(x, sigma), oracle(x, sigma), atol=1e-12)


def test_edm_precond_per_item_sigma_equals_single_calls():
    den = EDMPrecond(_perfect_net(MU, 0.8, 0.5), sigma_data=0.5, data_mean=MU)
    x = torch.randn(3, 1, 4, 4, generator=_gen(4), dtype=F64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=F64)
    batch = den(x, sigma)
    for i in range(3):
        assert torch.allclose(batch[i:i + 1], den(x[i:i + 1], sigma[i:i + 1]), atol=1e-12)
    assert not torch.allclose(batch[0], batch[1])
    # A scalar (0-d or 1-element) sigma broadcasts over the batch.
    same = torch.full((3,), 1.0, dtype=F64)
    assert torch.allclose(den(x, torch.tensor(1.0, dtype=F64)), den(x, same), atol=1e-12)
    assert torch.allclose(den(x, torch.tensor([1.0], dtype=F64)), den(x, same), atol=1e-12)


def test_edm_precond_passes_cond_through():
    rec = _Recorder()
    cond = torch.randn(2, 4, generator=_gen(5))
    EDMPrecond(rec)(torch.zeros(2, 1, 2, 2), torch.ones(2), cond)
    assert rec.seen[0][2] is cond


def test_edm_sigma_range():
    assert edm_sigma_range(0.5) == pytest.approx((0.002, 80.0))
    assert edm_sigma_range(0.25) == pytest.approx((0.001, 40.0))


# ---------------------------------------------------------------- EpsAdapter


def test_linear_beta_alphas_cumprod():
    abar = linear_beta_alphas_cumprod(1000)
    assert abar.shape == (1000,) and abar.dtype == F64
    betas = [1e-4 + (2e-2 - 1e-4) * i / 999 for i in range(1000)]
    expected = [1.0]
    for beta in betas:
        expected.append(expected[-1] * (1 - beta))
    assert torch.allclose(abar, torch.tensor(expected[1:], dtype=F64), rtol=1e-12)
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    assert (abar.diff() < 0).all()


def _interp(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    lo = t.floor().long().clamp(0, len(table) - 2)
    w = t - lo.to(t.dtype)
    return table[lo] * (1 - w) + table[lo + 1] * w


def _gaussian_eps_net(abar: torch.Tensor) -> nn.Module:
    """The exact eps-network of the VP process for x0 ~ N(MU, S^2): with a = abar(t) (linear in t
    between integer steps), E[eps | x_t] = (x_ve - D(x_ve, sigma)) / sigma, x_ve = x_t / sqrt(a)."""

    class Net(nn.Module):
        def forward(self, x_t, t):
            a = _interp(abar, t.double()).to(x_t.dtype)
            sigma = ((1 - a) / a).sqrt()
            x_ve = x_t / _b(a, x_t).sqrt()
            return (x_ve - GaussianDenoiser(MU, S)(x_ve, sigma)) / _b(sigma, x_t)

    return Net()


def _b(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def test_eps_adapter_equals_oracle_on_grid_and_close_between():
    abar = linear_beta_alphas_cumprod()
    grid = ((1 - abar) / abar).sqrt()
    ad = EpsAdapter(_gaussian_eps_net(abar), abar)
    oracle = GaussianDenoiser(MU, S)
    idx = torch.tensor([0, 1, 10, 250, 500, 998, 999])
    sigma = grid[idx]
    x = MU + (S**2 + sigma[:, None, None] ** 2).sqrt() * torch.randn(len(idx), 3, 3, generator=_gen(6), dtype=F64)
    assert torch.allclose(ad(x, sigma), oracle(x, sigma), rtol=0, atol=1e-9)
    # Between grid points the adapter interpolates t in log sigma, the net abar in t: close, not exact.
    mid = (grid[idx[1:-1]].log() + grid[idx[1:-1] + 1].log()).div(2).exp()
    xm = x[1:-1]
    err = (ad(xm, mid) - oracle(xm, mid)).abs().max().item()
    assert err < 1e-3
    assert ad.sigma_min == pytest.approx(grid[0].item(), rel=1e-12)
    assert ad.sigma_max == pytest.approx(grid[-1].item(), rel=1e-12)


def test_eps_adapter_timestep():
    abar = linear_beta_alphas_cumprod()
    grid = ((1 - abar) / abar).sqrt()
    ad = EpsAdapter(nn.Identity(), abar)
    t = ad.timestep(grid)
    assert torch.allclose(t, torch.arange(1000, dtype=F64), rtol=0, atol=1e-9)
    fine = torch.logspace(math.log10(grid[0].item()), math.log10(grid[-1].item()), 5000, dtype=F64)
    tf = ad.timestep(fine)
    assert (tf.diff() > 0).all()
    assert tf[0].item() == pytest.approx(0.0, abs=1e-9) and tf[-1].item() == pytest.approx(999.0, abs=1e-9)
    # Log-sigma interpolation: the geometric mean of two neighbours maps to the half step.
    half = (grid[41] * grid[42]).sqrt()
    assert ad.timestep(half.reshape(1)).item() == pytest.approx(41.5, abs=1e-9)
    # Clamped outside the trained range.
    out = ad.timestep(torch.tensor([1e-6, 1e6], dtype=F64))
    assert out.tolist() == pytest.approx([0.0, 999.0], abs=1e-9)


def test_eps_adapter_wraps_monai_unet():
    monai_nets = pytest.importorskip("monai.networks.nets")
    with torch.random.fork_rng():  # MONAI initialises with the global RNG; keep it reproducible
        torch.manual_seed(0)
        unet = monai_nets.DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 32, 32),
                                             attention_levels=(False, False, False), num_res_blocks=1,
                                             num_head_channels=32)
    ad = EpsAdapter(unet, linear_beta_alphas_cumprod()).eval()
    x = torch.randn(2, 1, 32, 32, generator=_gen(7))
    sigma = torch.tensor([0.05, 20.0])
    with torch.no_grad():
        out = ad(x, sigma)
        single = ad(x[1:], sigma[1:])
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert torch.allclose(out[1:], single, atol=1e-4)


# ---------------------------------------------------------------- CFGDenoiser


class _CondModel(nn.Module):
    """A toy conditional denoiser whose output depends on x, sigma and cond; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x, sigma, cond):
        self.calls += 1
        return x * (1 + cond.sum(1)).reshape(-1, 1, 1) - sigma.reshape(-1, 1, 1) * cond[:, :1, None]


def test_cfg_denoiser():
    x = torch.randn(3, 2, 2, generator=_gen(8), dtype=F64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    cond = torch.randn(3, 4, generator=_gen(9), dtype=F64)
    model = _CondModel()
    c = model(x, sigma, cond)
    u = model(x, sigma, torch.zeros_like(cond))
    assert not torch.allclose(c, u)

    m1 = _CondModel()
    assert torch.allclose(CFGDenoiser(m1, cond, 1.0)(x, sigma), c, atol=1e-12)
    assert m1.calls == 1
    assert torch.allclose(CFGDenoiser(_CondModel(), cond, 0.0)(x, sigma), u, atol=1e-12)
    assert torch.allclose(CFGDenoiser(_CondModel(), cond, 2.0)(x, sigma), 2 * c - u, atol=1e-12)
    assert torch.allclose(CFGDenoiser(_CondModel(), cond, 3.5)(x, sigma), u + 3.5 * (c - u), atol=1e-12)


# ---------------------------------------------------------------- AutoGuidedDenoiser


def test_autoguided_denoiser_extrapolates_and_skips_the_guide_at_weight_one():
    x = torch.randn(3, 2, 2, generator=_gen(10), dtype=F64)
    sigma = torch.tensor([0.1, 1.0, 5.0], dtype=F64)
    good, bad = GaussianDenoiser(MU, S), GaussianDenoiser(-0.2, 2 * S)
    for w in (0.0, 2.0, 3.5):
        want = bad(x, sigma) + w * (good(x, sigma) - bad(x, sigma))
        assert torch.allclose(AutoGuidedDenoiser(good, bad, w)(x, sigma), want, atol=1e-12)

    def never(x, sigma):
        raise AssertionError("w = 1 must not call the guide")

    assert torch.equal(AutoGuidedDenoiser(good, never, 1.0)(x, sigma), good(x, sigma))


@pytest.mark.parametrize("w", [1.0, 2.0, 3.0])
def test_autoguidance_of_gaussians_ends_at_the_closed_form_std(w: float):
    """Good model N(MU, S^2), guide N(MU, B^2): the guided denoiser is affine, D_w = MU + a(sigma) (x - MU)
    with a = w S^2/(S^2+sigma^2) + (1-w) B^2/(B^2+sigma^2), so the probability-flow ODE
    dx/dsigma = (x - D_w)/sigma scales x - MU by exp(-int_0^sigma_max (1-a)/sigma dsigma)
    = ((S^2+M^2)/S^2)^(-w/2) ((B^2+M^2)/B^2)^(-(1-w)/2), M = sigma_max: for large M the samples' std
    S^w B^(1-w) narrows geometrically below the good model's S as w grows. Heun (256 steps) must land on it."""
    b, m = 2 * S, 80.0
    sigmas = karras(256, 0.002, m).to(F64)
    start = torch.full((2, 1, 2, 2), m, dtype=F64)  # x_T - MU: the ODE is linear, so one point suffices
    den = AutoGuidedDenoiser(GaussianDenoiser(MU, S), GaussianDenoiser(MU, b), w)
    end = sample_heun(den, MU + start, sigmas) - MU
    factor = ((S**2 + m**2) / S**2) ** (-w / 2) * ((b**2 + m**2) / b**2) ** (-(1 - w) / 2)
    assert torch.allclose(end / start, torch.full_like(end, factor), rtol=2e-3)
    assert factor * m == pytest.approx(S**w * b ** (1 - w), rel=1e-3)


# ---- tiled denoising of crop-trained priors ---------------------------------------------------------


class _PointwiseNet(nn.Module):
    """F(x, c_noise, cond, pos) = x * (1 + row) + col + c_noise: pointwise in the pixel and its
    coordinates, so a mosaic of tiles that passes each tile its coordinates must equal the whole."""

    def forward(self, x, c_noise, cond=None, pos=None):
        from mediff.nets import coordinate_grid

        if pos is None:
            pos = coordinate_grid(x.shape[-2], x.shape[-1], x.device, x.dtype)
        pos = pos.expand(x.shape[0], -1, -1, -1)
        shift = 0.0 if cond is None else cond.sum(1).view(-1, 1, 1, 1)
        return x * (1 + pos[:, :1]) + pos[:, 1:] + c_noise.view(-1, 1, 1, 1) + shift


@pytest.mark.parametrize("shape", [(96, 80), (128, 128), (40, 48)])
def test_tiled_denoiser_equals_whole_image_for_a_pointwise_net(shape):
    from mediff.denoiser import tile_edges

    net = _PointwiseNet()
    whole = EDMPrecond(net, 0.3, 0.1)
    tiled = EDMPrecond(net, 0.3, 0.1, tile=32, tile_multiple=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, *shape, generator=g)
    cond = torch.randn(3, 2, generator=g)
    for s in (0.02, 0.7, 5.0):
        sigma = torch.full((3,), s)
        torch.testing.assert_close(tiled(x, sigma, cond), whole(x, sigma, cond))
        if max(shape) > 32:
            assert len(tile_edges(shape[0], 32, 16, s, 0)) > 2  # it did tile


def test_tile_edges_cover_the_axis_and_move_with_sigma():
    from mediff.denoiser import tile_edges

    seen = set()
    for s in torch.logspace(-3, 1.5, 50).tolist():
        e = tile_edges(512, 128, 16, s, 0)
        assert e[0] == 0 and e[-1] == 512 and all(b > a for a, b in zip(e, e[1:]))
        sizes = [b - a for a, b in zip(e, e[1:])]
        assert max(sizes) <= 128 and min(sizes) >= 32 and all(v % 16 == 0 for v in sizes)
        seen.add(e[1])
    assert len(seen) >= 4  # the seams move between noise levels
    assert tile_edges(100, 128, 16, 1.0, 0) == [0, 100]


def test_tiled_denoiser_is_differentiable_in_x():
    net = _PointwiseNet()
    tiled = EDMPrecond(net, 0.3, 0.0, tile=32, tile_multiple=16)
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    tiled(x, torch.full((1,), 0.5)).sum().backward()
    whole_x = x.detach().clone().requires_grad_(True)
    EDMPrecond(net, 0.3, 0.0)(whole_x, torch.full((1,), 0.5)).sum().backward()
    torch.testing.assert_close(x.grad, whole_x.grad)


def _net(den, calls: list | None = None):
    """A (x, sigma, cond) network of a (x, sigma) denoiser, counting its calls."""
    def f(x, sigma, cond=None):
        if calls is not None:
            calls.append(len(x))
        return den(x, sigma)
    return f


def test_two_scale_with_a_coarse_model_that_agrees_is_the_fine_model():
    # iid N(mu, s^2) pixels: the means of f x f blocks are N(mu, s^2 / f^2), their noise sigma / f, so the
    # coarse Gaussian denoiser N(mu, (s / f)^2) gives exactly the block means of the fine one.
    f, mu, s = 4, 0.3, 0.7
    fine, coarse = GaussianDenoiser(mu, s), GaussianDenoiser(mu, s / f)
    two = TwoScale(_net(fine), _net(coarse), f, from_sigma=0.0)
    x, sigma = torch.randn(3, 1, 16, 24, dtype=torch.float64), torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(two(x, sigma), fine(x, sigma))


def test_two_scale_takes_the_coarse_block_means_from_from_sigma_up_per_item():
    f, c = 2, 0.25
    fine = GaussianDenoiser(0.0, 1.0)
    calls: list[int] = []
    biased = _net(lambda x, s: GaussianDenoiser(0.0, 1.0 / f)(x, s) + c, calls)  # block means off by c
    two = TwoScale(_net(fine), biased, f, from_sigma=0.5)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = two(x, torch.tensor([0.1, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out[0], fine(x[:1], torch.tensor([0.1]))[0])  # below from_sigma: the fine model
    torch.testing.assert_close(out[1], fine(x[1:], torch.tensor([2.0]))[0] + c)  # a constant upsamples to itself
    assert calls == [2]
    two(x, torch.tensor([0.1, 0.2]))  # no item at or above from_sigma: the coarse model is not run
    assert calls == [2]
    with pytest.raises(ValueError, match="multiples of 2"):
        two(torch.randn(1, 1, 9, 8), torch.tensor([1.0]))
