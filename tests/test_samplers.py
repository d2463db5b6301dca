"""Samplers against the exact Gaussian oracle.

For the prior N(MU, S^2) per coordinate the exact denoiser is known in closed form
(``GaussianDenoiser``), the marginal at noise level sigma is N(MU, S^2 + sigma^2) and the exact
probability-flow ODE solution is x(0) = MU + S / sqrt(S^2 + sigma_max^2) (x(sigma_max) - MU). So any
sampler started from the exact marginal must return N(MU, S^2) up to its discretisation error, and
deterministic samplers must converge to the exact flow at their nominal order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mediff.denoiser import EpsAdapter, GaussianDenoiser, linear_beta_alphas_cumprod
from mediff.samplers import SAMPLERS, nfe, sample, sample_pc
from mediff.schedules import karras, vp_sigmas

MU, S = 0.3, 0.5
SMIN = 0.002
ORACLE = GaussianDenoiser(MU, S)
DETERMINISTIC = ("euler", "ddim", "heun", "dpmpp2m")
STOCHASTIC = ("ddpm", "pc")


def _marginal(shape, sigma_max: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + math.sqrt(S**2 + sigma_max**2) * torch.randn(shape, generator=g, dtype=torch.float64)


def _ddim_variance(sigmas: torch.Tensor, eta: float = 1.0) -> float:
    """Exact output variance of DDIM with noise renewal ``eta`` (1 = the DDPM plug-in posterior
    sampler) on the Gaussian prior, started from the exact marginal.

    Derived independently of the sampler: with c = S^2/(S^2+s^2) the oracle is D - MU = c (x - MU);
    DDIM draws x' = x0 + q (x - x0) + n z with n^2 = eta^2 s'^2 (1 - r^2), q = sqrt(s'^2 - n^2) / s,
    r = s'/s (eta = 1: q = r^2, the VE posterior q(x_s' | x_s, x0)), so x' - MU = (c + q (1 - c)) (x - MU)
    + noise and Var' = (c + q (1-c))^2 Var + n^2. For eta > 0 it underestimates S^2 because the
    plug-in x0 = E[x0|x] drops the posterior spread of x0.
    """
    sig = sigmas.tolist()
    v = S**2 + sig[0] ** 2
    for s, s_next in zip(sig[:-1], sig[1:]):
        c, r = S**2 / (S**2 + s**2), s_next / s
        n2 = eta**2 * s_next**2 * (1 - r**2)
        v = (c + math.sqrt(s_next**2 - n2) / s * (1 - c)) ** 2 * v + n2
    return v


# name: (steps, (items, dims), discretisation tolerance on the variance as a fraction of S^2).
# All with karras(steps, 0.002, 20). Justification of each tolerance (checked in the test itself):
# - deterministic samplers are affine maps x -> MU + g (x - MU) on this prior, so their exact output
#   variance is g^2 (S^2 + smax^2) with g measured on one input: Euler(512) -0.85 %,
#   Heun(64) +0.43 %, DPM-Solver++(2M)(64) +0.44 %.
# - DDPM(512): the recursion in _ddim_variance gives -1.81 % (first order in the step count).
# - PC(128): the corrector is unadjusted Langevin with per-item step eps = 2 (snr |z|/|score|)^2,
#   eps/v ~ 2 snr^2 on a Gaussian of variance v. Its stationary variance is about
#   v (d+2)/d / (1 - snr^2 (d+2)/d), i.e. +3.4 % at d = 256, snr = 0.16, plus a further O(1/d) from
#   the fluctuation of |score|; measured +3..4 %. PC therefore uses 256 dims per item (its step size
#   is per item, so the bias is O(1/d); d = 16 would give +30 %, an artefact of tiny "images").
ORACLE_CASES = {
    "euler": (512, (4096, 16), 0.010),
    "ddim": (512, (4096, 16), 0.010),
    "heun": (64, (4096, 16), 0.005),
    "dpmpp2m": (64, (4096, 16), 0.005),
    "ddpm": (512, (4096, 16), 0.020),
    "pc": (128, (256, 256), 0.060),
}


def test_oracle_cases_cover_every_sampler():
    assert set(ORACLE_CASES) == set(SAMPLERS)


@pytest.mark.parametrize("name", list(ORACLE_CASES))
def test_gaussian_oracle_mean_and_variance(name):
    steps, shape, tol = ORACLE_CASES[name]
    smax = 20.0
    sigmas = karras(steps, SMIN, smax)
    x0 = _marginal(shape, smax, seed=1234)
    n = x0.numel()
    out = SAMPLERS[name](ORACLE, x0, sigmas, generator=torch.Generator().manual_seed(99))
    assert out.shape == x0.shape and out.dtype == torch.float64
    m, v = out.mean().item(), out.var().item()
    clt_var = 5 * S**2 * math.sqrt(2 / (n - 1))

    # The discretisation tolerance is itself checked against the exact variance of the scheme.
    if name in DETERMINISTIC:
        unit = SAMPLERS[name](ORACLE, torch.full((1, 1), MU + 1.0, dtype=torch.float64), sigmas)
        g = unit.item() - MU
        exact_var = g**2 * (S**2 + smax**2)
        assert abs(exact_var - S**2) <= tol * S**2
        assert torch.allclose(out, MU + g * (x0 - MU), rtol=0, atol=1e-9)  # affine, same gain for all
    elif name == "ddpm":
        exact_var = _ddim_variance(sigmas)
        assert abs(exact_var - S**2) <= tol * S**2
        # Tight check against the scheme's own exact variance: catches small errors in the noise std.
        assert abs(v - exact_var) <= clt_var

    assert abs(m - MU) <= 5 * S / math.sqrt(n), (m, MU)
    assert abs(v - S**2) <= clt_var + tol * S**2, (v, S**2, clt_var, tol)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_follows_its_exact_variance(eta):
    """DDIM with noise renewal: the output variance is the scheme's exact one (within 5 SE), which
    lies between the flow's (eta 0) and DDPM's (eta 1); eta = 1 is the DDPM step, draw for draw."""
    steps, smax = 64, 20.0
    sigmas = karras(steps, SMIN, smax)
    x0 = _marginal((4096, 16), smax, seed=7)
    out = SAMPLERS["ddim"](ORACLE, x0, sigmas, generator=torch.Generator().manual_seed(3), eta=eta)
    n = out.numel()
    exact = _ddim_variance(sigmas, eta)
    assert abs(out.var().item() - exact) <= 5 * exact * math.sqrt(2 / (n - 1))
    assert abs(out.mean().item() - MU) <= 5 * S / math.sqrt(n)
    assert _ddim_variance(sigmas, 1.0) <= exact < _ddim_variance(sigmas, 0.0)
    if eta == 1.0:
        ddpm = SAMPLERS["ddpm"](ORACLE, x0, sigmas, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(out, ddpm, rtol=0, atol=1e-12)


def _flow_reference(x: torch.Tensor, smax: float) -> torch.Tensor:
    """Exact probability flow from smax to SMIN, then the final denoising step x = D(x, SMIN) that
    Euler, Heun (its last step is Euler) and DPM-Solver++(2M) all take to reach sigma = 0.
    The last step's error is independent of the step count, so it is excluded from the measure."""
    x_min = MU + math.sqrt((S**2 + SMIN**2) / (S**2 + smax**2)) * (x - MU)
    return ORACLE(x_min, torch.full((x.shape[0],), SMIN, dtype=torch.float64))


@pytest.mark.parametrize("name, lo, hi", [("euler", 1.6, 2.4), ("heun", 3.0, 5.5), ("dpmpp2m", 3.0, 5.5)])
def test_deterministic_convergence_order(name, lo, hi):
    # Measured (max abs error over 256 values, karras rho=7, 80 -> 0.002): euler 20/40/80 steps
    # ratios 1.98, 1.99; heun 4.47, 4.22; dpmpp2m 4.73, 4.36.
    smax = 80.0
    x = _marginal((64, 4), smax, seed=7)
    ref = _flow_reference(x, smax)
    # Sanity: the reference is within 2e-5 of the closed-form flow all the way to sigma = 0.
    exact = MU + S / math.sqrt(S**2 + smax**2) * (x - MU)
    assert (ref - exact).abs().max() < 2e-5
    errs = [(SAMPLERS[name](ORACLE, x, karras(n, SMIN, smax)) - ref).abs().max().item() for n in (20, 40, 80)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(lo <= r <= hi for r in ratios), (errs, ratios)
    assert errs[-1] < (0.1 if name == "euler" else 0.01)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_global_rng_untouched_and_seeding(name):
    sigmas = karras(6, SMIN, 20.0)
    x = _marginal((8, 3), 20.0, seed=3)
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    a = SAMPLERS[name](ORACLE, x, sigmas, generator=torch.Generator().manual_seed(5))
    b = SAMPLERS[name](ORACLE, x, sigmas, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    g_state = g.get_state()
    c = SAMPLERS[name](ORACLE, x, sigmas, generator=g)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np_after = np.random.get_state()
    assert np_after[0] == np_state[0] and np.array_equal(np_after[1], np_state[1]) and np_after[2:] == np_state[2:]
    assert torch.equal(a, b)
    if name in STOCHASTIC:
        assert not torch.allclose(a, c)
    else:
        assert torch.equal(a, c)
        assert torch.equal(g.get_state(), g_state)  # deterministic samplers draw nothing


def test_sample_entry_point():
    sigmas = karras(8, SMIN, 20.0)
    state = torch.get_rng_state()
    out = sample(ORACLE, (4, 3), sigmas, "ddpm", generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(11)
    x = torch.randn((4, 3), generator=g, dtype=torch.float64) * float(sigmas[0])
    assert torch.equal(out, SAMPLERS["ddpm"](ORACLE, x, sigmas, generator=g))
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(ORACLE, (4, 3), sigmas, "nope")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_project_hook_applied_after_every_update(name):
    steps = 10
    sigmas = karras(steps, SMIN, 20.0)
    x = _marginal((256, 2), 20.0, seed=4)
    seen = []

    def project(z, sigma):
        seen.append(sigma)
        z = z.clone()
        z[:, 0] = z[:, 0].clamp_min(1.0)  # half-space x_0 >= 1 (MU = 0.3 puts most mass outside)
        return z

    free = SAMPLERS[name](ORACLE, x, sigmas, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](ORACLE, x, sigmas, generator=torch.Generator().manual_seed(0), project=project)
    assert (free[:, 0] < 1.0).float().mean() > 0.5  # the constraint is not satisfied for free
    assert (out[:, 0] >= 1.0).all()
    s = sigmas.tolist()
    expected = [v for i in range(steps) for v in (s[i], s[i + 1])] if name == "pc" else s[1:]
    assert seen == expected
    assert all(isinstance(v, float) for v in seen)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_once_per_step(name):
    sigmas = karras(9, SMIN, 20.0)
    x = _marginal((5, 2), 20.0, seed=8)
    calls = []
    out = SAMPLERS[name](ORACLE, x, sigmas, generator=torch.Generator().manual_seed(0),
                         callback=lambda i, xi, d: calls.append((i, xi.clone(), d.clone())))
    assert [c[0] for c in calls] == list(range(9))
    assert torch.equal(calls[-1][1], out)
    assert all(c[2].shape == x.shape for c in calls)


class _Counter:
    def __init__(self, inner):
        self.inner, self.calls, self.sigma_shapes = inner, 0, set()

    def __call__(self, x, sigma):
        self.calls += 1
        self.sigma_shapes.add((tuple(sigma.shape), sigma.dtype))
        return self.inner(x, sigma)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_nfe_matches_denoiser_calls(name, steps):
    den = _Counter(ORACLE)
    x = _marginal((3, 2), 20.0, seed=1)
    SAMPLERS[name](den, x, karras(steps, SMIN, 20.0), generator=torch.Generator().manual_seed(0))
    assert den.calls == nfe(name, steps)
    assert den.sigma_shapes == {((3,), torch.float64)}  # sigma is per item, in x's dtype


@pytest.mark.parametrize("n_corrector", [0, 3])
def test_nfe_pc_correctors(n_corrector):
    den = _Counter(ORACLE)
    x = _marginal((3, 2), 20.0, seed=1)
    sample_pc(den, x, karras(5, SMIN, 20.0), generator=torch.Generator().manual_seed(0), n_corrector=n_corrector)
    assert den.calls == nfe("pc", 5, n_corrector)


def _gaussian_eps_net(alphas_cumprod: torch.Tensor):
    """The exact eps-prediction network of the VP process x_t = sqrt(a) x0 + sqrt(1-a) eps, x0 ~ N(MU, S^2)."""

    def net(x_t, t):
        assert ((t - t.round()).abs() < 1e-9).all(), "DDIM steps must sit on the integer grid"
        a = alphas_cumprod[t.round().long()].reshape(-1, *([1] * (x_t.dim() - 1)))
        sigma = ((1 - a) / a).sqrt()
        x_ve = x_t / a.sqrt()
        return (x_ve - ORACLE(x_ve, sigma.reshape(-1))) / sigma

    return net


def test_euler_on_vp_sigmas_is_ddim():
    """Euler on vp_sigmas with EpsAdapter reproduces deterministic DDIM (Song et al. 2021, Eq. 12,
    eta = 0) run in VP form on the same eps-network and the same timesteps."""
    abar = linear_beta_alphas_cumprod()
    net = _gaussian_eps_net(abar)
    sigmas = vp_sigmas(abar, 12)
    grid = ((1 - abar) / abar).sqrt()
    steps = [int((grid - s).abs().argmin()) for s in sigmas[:-1]]
    x_ve = _marginal((16, 3), float(sigmas[0]), seed=2)

    x_vp = x_ve * abar[steps[0]].sqrt()
    for i, t in enumerate(steps):
        a = abar[t]
        a_next = abar[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64)
        eps = net(x_vp, torch.full((x_vp.shape[0],), float(t), dtype=torch.float64))
        x0 = (x_vp - (1 - a).sqrt() * eps) / a.sqrt()
        x_vp = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    out = SAMPLERS["ddim"](EpsAdapter(net, abar), x_ve, sigmas)
    assert torch.allclose(out, x_vp, rtol=0, atol=1e-9)


def test_ddpm_step_is_the_ve_posterior_draw():
    """One ancestral step is x' = x0 + r^2 (x - x0) + s' sqrt(1 - r^2) z with x0 = D(x, s), r = s'/s
    (the VE form of Ho et al.'s q(x_{t-1} | x_t, x0)), z the generator's first draw."""
    s, s_next = 2.0, 0.7
    x = _marginal((6, 5), s, seed=12)
    seen = []
    SAMPLERS["ddpm"](ORACLE, x, torch.tensor([s, s_next, 0.0], dtype=torch.float64),
                     generator=torch.Generator().manual_seed(21), callback=lambda i, xi, d: seen.append(xi))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    x0 = ORACLE(x, torch.full((6,), s, dtype=torch.float64))
    r = s_next / s
    assert torch.allclose(seen[0], x0 + r**2 * (x - x0) + s_next * math.sqrt(1 - r**2) * z, rtol=0, atol=1e-12)


def test_pc_corrector_is_song_algorithm_4():
    """The corrector (Song et al. 2021, Alg. 4, VE, alpha = 1) with a per-item step size:
    eps = 2 (snr |z| / |score|)^2, x' = x + eps score + sqrt(2 eps) z; observed through ``project``."""
    s, snr = 1.5, 0.3
    x = _marginal((4, 3, 3), s, seed=13)
    seen = []

    def spy(z, sigma):
        seen.append((sigma, z.clone()))
        return z

    sample_pc(ORACLE, x, torch.tensor([s, 0.0], dtype=torch.float64), generator=torch.Generator().manual_seed(8),
              project=spy, snr=snr)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    score = (ORACLE(x, torch.full((4,), s, dtype=torch.float64)) - x) / s**2
    expected = []
    for i in range(4):
        eps = 2 * (snr * z[i].norm() / score[i].norm()) ** 2
        expected.append(x[i] + eps * score[i] + (2 * eps).sqrt() * z[i])
    assert seen[0][0] == s
    assert torch.allclose(seen[0][1], torch.stack(expected), rtol=0, atol=1e-12)


def test_pc_without_corrector_is_ancestral_ddpm():
    sigmas = karras(12, SMIN, 20.0)
    x = _marginal((5, 4), 20.0, seed=14)
    a = sample_pc(ORACLE, x, sigmas, generator=torch.Generator().manual_seed(3), n_corrector=0)
    b = SAMPLERS["ddpm"](ORACLE, x, sigmas, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
