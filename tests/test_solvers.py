"""Posterior solvers against the closed-form Gaussian posterior.

Prior x0 ~ N(MU, S^2 I) with its exact denoiser (``GaussianDenoiser``) and sigma_data = S; data
y = A x0 + n, n ~ N(0, SY^2 I). The posterior is Gaussian:
    C = (I / S^2 + A^T A / SY^2)^-1,   m = C (MU / S^2 + A^T y / SY^2),
and for noiseless y with a row-selection A it is: measured coordinates = y, the others ~ N(MU, S^2).

When the guided denoiser equals the exact posterior denoiser E[x0 | x_sigma, y] (prox/DDS/DDNM and
grad/DPS (PiGDM) with converged CG, for any A; grad checked directly in section 0), the solver is
just its sampler run on the Gaussian N(m, C). Both samplers are then linear in their Gaussian
input, so the moments of their *output* follow exactly from a recursion over the noise levels in C's
eigenbasis (``sampler_moments``, derived from the update formulas, not from the code; ``mcg_moments``
adds MCG's noisy-data step). The tests check:
  (a) the scheme's exact output moments are within a stated discretisation tolerance of (m, C);
  (b) the empirical moments of N solver samples match the scheme's exact moments up to a purely
      statistical 5-sigma bound, i.e. no fudge on top of the maths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mediff.physics.ct import ParallelBeamCT, sparse_view_angles
from mediff.denoiser import GaussianDenoiser
from mediff.errors import MediffError
from mediff.physics.masks import make_mask
from mediff.physics.mri import SingleCoilMRI
from mediff.physics.operators import Matrix, PhaseModulated
from mediff.samplers import nfe as sampler_nfe
from mediff.schedules import karras
from mediff.solvers import SOLVERS, Problem, SolverSpec, grad_guidance, measurement_projection, solve

DT = torch.float64
MU, S = 0.3, 0.5
SY = 0.1
N_DIM, N_MEAS, N_ITEMS = 8, 4, 4096
SMIN, SMAX = 1e-3, 20.0
ORACLE = GaussianDenoiser(MU, S)
# Scheme behind each solver: DDIM's eta (0 = Euler on the probability-flow ODE, 1 = ancestral
# DDPM), or predictor-corrector.
SCHEME = {"dds": 1.0, "ddnm": 1.0, "dps": 1.0, "mcg": 1.0, "langevin": "pc"}


def test_scheme_table_matches_solvers():
    assert set(SCHEME) == set(SOLVERS)
    for name, spec in SOLVERS.items():
        eta = {"ddpm": 1.0, "pc": "pc"}.get(spec.sampler, spec.eta if spec.eta is not None else 0.0)
        assert eta == SCHEME[name], name


# ------------------------------------------------------------------------------------------ helpers


def make_problem(kind: str, sy: float, seed: int = 0, n: int = N_DIM, m: int = N_MEAS):
    """A (m, n), one measurement y (1, m), and the exact posterior mean (n,) and covariance (n, n)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "select":
        A = torch.eye(n, dtype=DT)[:m]
    else:
        A = torch.randn(m, n, generator=g, dtype=DT) / math.sqrt(n)
    x_true = MU + S * torch.randn(1, n, generator=g, dtype=DT)
    y = x_true @ A.T + sy * torch.randn(1, m, generator=g, dtype=DT)
    if sy > 0:
        C = torch.linalg.inv(torch.eye(n, dtype=DT) / S**2 + A.T @ A / sy**2)
        mean = C @ (torch.full((n,), MU / S**2, dtype=DT) + A.T @ y[0] / sy**2)
    else:
        # Noiseless limit, built explicitly for a row selection: range fixed to y, null space = prior.
        assert kind == "select"
        mean = torch.full((n,), MU, dtype=DT)
        mean[:m] = y[0]
        C = torch.diag(torch.tensor([0.0] * m + [S**2] * (n - m), dtype=DT))
    return A, y, mean, C


def run(solver: str, A: torch.Tensor, y: torch.Tensor, sy: float, steps: int, n_items: int = N_ITEMS, seed: int = 1):
    prob = Problem(Matrix(A), y.expand(n_items, -1), sy)
    return solve(ORACLE, prob, (n_items, A.shape[1]), solver, steps=steps, sigma_data=S, sigma_min=SMIN,
                 sigma_max=SMAX, generator=torch.Generator().manual_seed(seed), dtype=DT)


def sampler_moments(mean: torch.Tensor, C: torch.Tensor, sigmas: torch.Tensor, scheme: str | float):
    """Exact output mean and covariance of ``scheme`` ("ddim" = eta 0, "ddpm" = eta 1, or DDIM's eta)
    driven by the exact denoiser of N(mean, C), started (as ``solve`` does) from x ~ N(0, sigma_0^2 I).

    In C's eigenbasis each coordinate is a 1-D Gaussian of variance lam; with c = lam/(lam + s^2) the
    denoiser is D - m = c (x - m), so per step (r = s'/s, n = eta s' sqrt(1 - r^2), q = sqrt(s'^2 - n^2) / s):
      x' = D + q (x - D) + n z  -> x' - m = a (x - m), a = c + q (1 - c), Var' = a^2 Var + n^2
    (eta 0: q = r, n = 0; eta 1: q = r^2, n^2 = s'^2 (1 - r^2)).
    """
    eta = {"ddim": 0.0, "ddpm": 1.0}.get(scheme, scheme)
    lam, V = torch.linalg.eigh(C)
    lam = lam.clamp_min(0)
    sig = sigmas.tolist()
    e = -(V.T @ mean)  # E[x_init] - m in the eigenbasis
    v = torch.full_like(lam, sig[0] ** 2)
    for s, s_next in zip(sig[:-1], sig[1:]):
        c, r = lam / (lam + s**2), s_next / s
        n2 = eta**2 * s_next**2 * (1 - r**2)
        a = c + math.sqrt(max(s_next**2 - n2, 0.0)) / s * (1 - c)
        e, v = a * e, a**2 * v + n2
    return mean + V @ e, V @ torch.diag(v) @ V.T


def check_moments(x: torch.Tensor, mean: torch.Tensor, C: torch.Tensor, steps: int, scheme: str,
                  disc_var: float, disc_mean: float = 0.06, dims: slice = slice(None)):
    """(a) the scheme's exact moments are within ``disc_*`` of the posterior, (b) the samples match the
    scheme's exact moments within 5 standard errors. Returns the measured errors for messages.

    ``disc_mean`` (in posterior std): ``solve`` starts from N(0, smax^2), not from the marginal
    N(m, C + smax^2); the probability-flow ODE (ddim) carries that offset through with gain
    sqrt(C / (C + smax^2)), i.e. |m| / sqrt(C + smax^2) ~ |m| / 20 posterior std (< 0.06 for |m| < 1.2;
    0.048 in the row-selection problem below); the ancestral scheme leaves < 1e-3 std."""
    em, ec = sampler_moments(mean, C, karras(steps, SMIN, SMAX), scheme)
    sd, esd = C.diag().sqrt()[dims], ec.diag().clamp_min(0).sqrt()[dims]
    n = x.shape[0]
    # (a) discretisation: mean offset (the init mean 0, shrunk by the gain product) and variance bias.
    assert ((em - mean)[dims].abs() <= disc_mean * sd + 1e-12).all(), (em - mean)
    var_bias = (ec.diag()[dims] / C.diag()[dims] - 1).abs().max().item()
    assert var_bias <= disc_var, f"scheme's own variance bias {var_bias:.3f} > {disc_var}"
    # (b) statistics: mean within 5 SE; per-coordinate variance within 5 SE of a variance (sqrt(2/(n-1))).
    m_err = (x.mean(0) - em)[dims].abs()
    assert (m_err <= 5 * esd / math.sqrt(n) + 1e-12).all(), (m_err / esd * math.sqrt(n)).max()
    v_rel = (x.var(0)[dims] / ec.diag()[dims] - 1).abs()
    assert (v_rel <= 5 * math.sqrt(2 / (n - 1))).all(), v_rel.max()
    # And directly against the posterior (what a user cares about), with both tolerances added.
    post_m = ((x.mean(0) - mean)[dims].abs() / sd).max().item()
    post_v = (x.var(0)[dims] / C.diag()[dims] - 1).abs().max().item()
    assert post_m <= 5 / math.sqrt(n) + disc_mean
    assert post_v <= 5 * math.sqrt(2 / (n - 1)) + disc_var
    return post_m, post_v


def test_sampler_moments_reproduce_the_prior():
    """The reference recursion itself: with no data it must return the prior to the known DDPM/Euler
    accuracy (cf. tests/test_samplers.py), and a wrong noise term would show up here."""
    mean, C = torch.full((2,), MU, dtype=DT), S**2 * torch.eye(2, dtype=DT)
    for scheme, steps, tol in (("ddim", 512, 0.01), ("ddpm", 512, 0.02), ("ddpm", 200, 0.05)):
        em, ec = sampler_moments(mean, C, karras(steps, 0.002, 20.0), scheme)
        # Start at mean 0: the flow keeps a fraction S / sqrt(S^2 + 20^2) of the offset, DDPM ~none.
        gain = S / math.sqrt(S**2 + 20.0**2) if scheme == "ddim" else 0.0
        assert torch.allclose(em, mean * (1 - gain), atol=1e-3), (scheme, em)
        assert abs(ec[0, 0].item() / S**2 - 1) <= tol
    # Ancestral sampling with a plug-in x0 underestimates the variance, more so at coarse steps.
    v50 = sampler_moments(mean, C, karras(50, SMIN, SMAX), "ddpm")[1][0, 0] / S**2
    v200 = sampler_moments(mean, C, karras(200, SMIN, SMAX), "ddpm")[1][0, 0] / S**2
    assert v50 < v200 < 1


# ------------------------------------------ 0. the grad guided denoiser against E[x0 | x, y] directly


def _real_rows(op, shape):
    """The real matrix of ``op`` on the pixel basis: rows [Re A; Im A] for complex data."""
    n = math.prod(shape)
    cols = op.A(torch.eye(n, dtype=DT).reshape(n, *shape)).reshape(n, -1)
    return (torch.cat([cols.real, cols.imag], 1) if cols.is_complex() else cols).T


def _real_flat(y):
    y = y.reshape(y.shape[0], -1)
    return torch.cat([y.real, y.imag], 1) if y.is_complex() else y


def posterior_denoiser(At, yt, x, sigma, nv):
    """E[x0 | x, y] in closed form for x0 ~ N(MU, S^2 I), x = x0 + sigma eps, yt = At x0 + n with
    variance ``nv`` per real component (nv = 0: the Gaussian x0 | x conditioned on At x0 = yt)."""
    n = At.shape[1]
    out = []
    for xb, yb, s in zip(x.reshape(x.shape[0], -1), yt, sigma.tolist()):
        if nv > 0:
            prec = torch.eye(n, dtype=DT) * (1 / S**2 + 1 / s**2) + At.T @ At / nv
            out.append(torch.linalg.solve(prec, MU / S**2 + xb / s**2 + At.T @ yb / nv))
        else:
            d = (S**2 * xb + s**2 * MU) / (S**2 + s**2)
            out.append(d + torch.linalg.pinv(At) @ (yb - At @ d))
    return torch.stack(out).reshape(x.shape)


def _guidance_case(kind):
    """(op, measurements y (1, ...) of one prior draw, sy, noise variance per real component of y)."""
    if kind == "dense":
        A, y, _, _ = make_problem("dense", SY)
        return Matrix(A), y, SY, SY**2
    if kind == "dense-noiseless":
        A, _, _, _ = make_problem("dense", SY)
        x0 = MU + S * torch.randn(1, N_DIM, generator=torch.Generator().manual_seed(4), dtype=DT)
        return Matrix(A), x0 @ A.T, 0.0, 0.0
    if kind == "ct":
        op = ParallelBeamCT(8, sparse_view_angles(4))
        g = torch.Generator().manual_seed(4)
        y = op.A(MU + S * torch.randn(1, 1, 8, 8, generator=g, dtype=DT))
        return op, y + SY * torch.randn(y.shape, generator=g, dtype=DT), SY, SY**2
    op, y, _ = _mri_problem(SY)
    return op, y, SY, SY**2 / 2  # circular complex noise: sy^2 / 2 per real component


# Measured max |error| with the default 50 CG iterations: dense 5e-15, dense noiseless 3e-15, CT 1e-13,
# MRI 2e-10 (its real-linear normal operator has eigenvalues down to 1e-10; lam = sy^2 / (2 r^2) >= 0.02
# bounds the condition number). At sigma >= 1 the data move the denoiser by more than 0.1 (asserted).
@pytest.mark.parametrize("kind", ["dense", "dense-noiseless", "ct", "mri"])
def test_pigdm_guided_denoiser_is_the_exact_posterior_denoiser(kind):
    """For a Gaussian prior the grad (DPS/MCG) guided denoiser is E[x0 | x, y] for any linear A: a
    dense A with A A^T != I, a CT projector, and a real image behind complex MRI data."""
    op, y, sy, nv = _guidance_case(kind)
    shape = (N_DIM,) if kind.startswith("dense") else (1, op.n, op.n) if kind == "ct" else (1, H, H)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=DT)
    g = torch.Generator().manual_seed(5)
    x = MU + S * torch.randn(4, *shape, generator=g, dtype=DT)
    x = x + sigma.reshape(-1, *[1] * len(shape)) * torch.randn(x.shape, generator=g, dtype=DT)
    yb = y.expand(4, *y.shape[1:])
    prob = Problem(op, yb, sy)
    got = grad_guidance(ORACLE, prob, S, 1.0, SOLVERS["dps"].cg_iters)(x, sigma)
    want = posterior_denoiser(_real_rows(op, shape), _real_flat(yb), x, sigma, nv)
    assert got.dtype == DT and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    d = ORACLE(x, sigma)
    assert (want - d).abs().amax(dim=tuple(range(1, x.dim())))[2:].min() > 0.1  # the data matter here
    # zeta scales the data term linearly.
    half = grad_guidance(ORACLE, prob, S, 0.5, SOLVERS["dps"].cg_iters)(x, sigma)
    torch.testing.assert_close(half, d + 0.5 * (want - d), rtol=0, atol=1e-8)


# ---------------------------------------------------------------------- 1. A A^T = I, noisy y

# Discretisation tolerance on the variance at 200 steps: the scheme's exact output variance
# (``sampler_moments``) is -5.9 % (ddpm) / -2.8 % (ddim) off for the measured coordinates (posterior
# var 0.0096) and -4.7 % / -2.3 % for the unmeasured ones (0.25); 0.07 bounds both. At 40 steps ddpm
# is -25 %. Measured on N = 4096 samples vs the posterior: dds/dps/ddnm max mean error 0.04 std, max
# variance error 6.6 % (the statistical 5-SE band on one variance alone is 11 %); dds (DDIM with eta = 1,
# CG exact here) draws the same samples as ddnm.
@pytest.mark.parametrize("solver", ["dds", "dps", "ddnm"])
def test_selection_noisy_posterior(solver):
    A, y, mean, C = make_problem("select", SY)
    x, n_fe = run(solver, A, y, SY, steps=200)
    assert x.shape == (N_ITEMS, N_DIM) and x.dtype == DT and n_fe == 200
    check_moments(x, mean, C, 200, SCHEME[solver], disc_var=0.07)


def test_selection_coarse_steps_underestimate_variance():
    """At 40 steps the ancestral scheme's exact variance is ~20 % low; the samples follow the scheme."""
    A, y, mean, C = make_problem("select", SY)
    x, _ = run("ddnm", A, y, SY, steps=40)
    _, ec = sampler_moments(mean, C, karras(40, SMIN, SMAX), "ddpm")
    ratio = ec.diag() / C.diag()
    assert (ratio < 0.85).all() and (ratio > 0.7).all(), ratio
    check_moments(x, mean, C, 40, "ddpm", disc_var=0.3)


def test_dps_equals_ddnm_when_A_is_a_selection():
    """Both are the exact posterior denoiser inside the same ancestral sampler: same draws, same output."""
    A, y, _, _ = make_problem("select", SY)
    a, _ = run("dps", A, y, SY, steps=20, n_items=64)
    b, _ = run("ddnm", A, y, SY, steps=20, n_items=64)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


# ------------------------------------------------------------------- 2. A A^T = I, noiseless y

# PC's corrector step is per item, eps = 2 (snr |z| / |score|)^2, so its stationary variance has an
# O(1/d) bias (+50 % at d = 8, see tests/test_samplers.py): the noiseless tests use a row selection of
# 128 of d = 256 coordinates and 256 items (32768 null-space values).
# Measured (null space): mcg(200) mean <= 2.2 SE, variance -4.5 % (scheme's exact: -4.3 %);
# langevin(50) mean <= 2.6 SE, variance +1.3 % on average over coordinates (+3.5 % at 100 steps).
NL_DIM, NL_MEAS, NL_ITEMS = 256, 128, 256


@pytest.mark.parametrize("solver, steps", [("mcg", 200), ("langevin", 50)])
def test_selection_noiseless_hard_consistency(solver, steps):
    A, y, mean, C = make_problem("select", 0.0, n=NL_DIM, m=NL_MEAS)
    x, _ = run(solver, A, y, 0.0, steps=steps, n_items=NL_ITEMS)
    # Measured components equal the data exactly (hard consistency, last projection at sigma = 0).
    torch.testing.assert_close(x[:, :NL_MEAS], y.expand(NL_ITEMS, -1), rtol=0, atol=1e-10)
    null = x[:, NL_MEAS:]
    n = x.shape[0]
    m_err = (null.mean(0) - MU).abs() / S
    assert (m_err <= 5 / math.sqrt(n) + 1e-3).all(), m_err.max() * math.sqrt(n)
    v_ratio = null.var(0) / S**2
    # Average over the 128 null coordinates: 5 SE of the average = 5 sqrt(2/(n-1)/128) ~ 0.04.
    stat = 5 * math.sqrt(2 / (n - 1) / (NL_DIM - NL_MEAS))
    if solver == "mcg":
        # DDPM + exact projection: the null space runs the exact ancestral scheme on N(MU, S^2).
        _, ec = sampler_moments(torch.tensor([MU], dtype=DT), torch.tensor([[S**2]], dtype=DT),
                                karras(steps, SMIN, SMAX), "ddpm")
        exact = ec[0, 0].item() / S**2
        assert abs(exact - 1) <= 0.05
        assert abs(v_ratio.mean().item() - exact) <= stat, (v_ratio.mean(), exact)
    else:
        # PC: no closed form; tolerance = 5 SE + 6 % (PC's O(1/d) bias ~3.4 % at d = 256 plus the
        # remaining discretisation at 50 steps; see tests/test_samplers.py).
        assert abs(v_ratio.mean().item() - 1) <= stat + 0.06, v_ratio.mean()
    # Per coordinate, a loose 5-SE band (sqrt(2/(n-1)) ~ 0.09 per coordinate) around the same target.
    assert ((v_ratio - 1).abs() <= 5 * math.sqrt(2 / (n - 1)) + 0.08).all(), v_ratio


@pytest.mark.parametrize("solver", ["mcg", "langevin"])
def test_projection_targets_noised_measurements(solver):
    """Each projected state at noise level s satisfies A x = y + s A z with fresh z: for a row
    selection the measured coordinates are y + s z, i.e. their spread across items is s (the final
    state, s = 0, equals y). The isotropic prior cannot see this noise in the output, so check it here."""
    A, y, _, _ = make_problem("select", 0.0)
    steps, n_items = 8, 2048
    sigmas = karras(steps, SMIN, SMAX)
    spreads = []

    def cb(i, x, d):
        spreads.append((x[:, :N_MEAS] - y).std().item())

    solve(ORACLE, Problem(Matrix(A), y.expand(n_items, -1), 0.0), (n_items, N_DIM), solver, steps=steps,
          sigma_data=S, sigma_min=SMIN, sigma_max=SMAX, generator=torch.Generator().manual_seed(0), dtype=DT,
          callback=cb)
    assert len(spreads) == steps
    target = sigmas[1:].tolist()
    rel_se = 1 / math.sqrt(2 * (n_items * N_MEAS - 1))  # SE of a sample std, relative
    for got, want in zip(spreads[:-1], target[:-1]):
        assert abs(got / want - 1) <= 5 * rel_se, (spreads, target)
    assert spreads[-1] == 0.0


@pytest.mark.slow
def test_selection_noiseless_small_d():
    """Same as above in the n = 8 setting of the noisy tests (mcg only: PC's bias is O(1/d))."""
    A, y, mean, C = make_problem("select", 0.0)
    x, _ = run("mcg", A, y, 0.0, steps=200)
    torch.testing.assert_close(x[:, :N_MEAS], y.expand(N_ITEMS, -1), rtol=0, atol=1e-10)
    check_moments(x, mean, C, 200, "ddpm", disc_var=0.07, dims=slice(N_MEAS, None))


# ------------------------------------------------------- 2b. noisy y: the Kalman data step of MCG


@pytest.mark.parametrize("kind", ["dense", "mri"])
def test_noisy_data_step_is_the_kalman_update(kind):
    """With noisy y the data step at level s is x + s^2 A^T (s^2 A A^T + sy^2 I)^-1 (y + s A z - A x)
    (the gain form, computed here by a dense solve in measurement space), not the projection onto
    {A x = y + s A z}; with sy = 0 it is that projection; at s = 0 it leaves x alone."""
    op, y, sy, nv = _guidance_case(kind)
    shape = (N_DIM,) if kind == "dense" else (1, H, H)
    # 5 CG steps (mcg's setting) are exact for the 4 x 8 A; the MRI system needs more to converge.
    iters = SOLVERS["mcg"].project_iters if kind == "dense" else 100
    n_items, s = 3, 0.3
    yb = y.expand(n_items, *y.shape[1:])
    x = MU + (S + s) * torch.randn(n_items, *shape, generator=torch.Generator().manual_seed(6), dtype=DT)
    step = measurement_projection(Problem(op, yb, sy), torch.Generator().manual_seed(7), iters)
    got = step(x, s)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=DT)  # the step's fresh noise
    At, xf = _real_rows(op, shape), x.reshape(n_items, -1)
    ys = _real_flat(yb + s * op.A(z))
    gain = s**2 * At.T @ torch.linalg.inv(s**2 * At @ At.T + nv * torch.eye(At.shape[0], dtype=DT))
    want = xf + (ys - xf @ At.T) @ gain.T
    torch.testing.assert_close(got.reshape(n_items, -1), want, rtol=0, atol=1e-9)
    hard = xf + (ys - xf @ At.T) @ torch.linalg.pinv(At).T
    assert (got.reshape(n_items, -1) - hard).abs().max() > 0.05  # not the hard projection
    # At s = 0 a noisy y leaves the state alone.
    assert torch.equal(step(x, 0.0), x)
    if kind == "dense":
        # sy = 0: the same step is the hard projection, onto y + s A z and at s = 0 onto y.
        exact = measurement_projection(Problem(op, yb, 0.0), torch.Generator().manual_seed(7), iters)
        torch.testing.assert_close(exact(x, s).reshape(n_items, -1), hard, rtol=0, atol=1e-10)
        torch.testing.assert_close(op.A(exact(x, 0.0)), yb, rtol=0, atol=1e-10)


def mcg_moments(A, y, sy, mean, C, sigmas):
    """Exact output mean and covariance of MCG (ancestral sampler, exact posterior denoiser of N(m, C),
    noisy-data Kalman step) from x ~ N(0, sigma_0^2 I), derived from the update formulas:
      D = m + K (x - m), K = C (C + s^2 I)^-1;  x' = D + r^2 (x - D) + s' sqrt(1 - r^2) z  (r = s'/s);
      x'' = M^-1 (A^T (y + s' A w) + lam x'), M = A^T A + lam I, lam = sy^2 / s'^2 (none at s' = 0)."""
    n = C.shape[0]
    eye = torch.eye(n, dtype=DT)
    sig = sigmas.tolist()
    e, V = torch.zeros(n, dtype=DT), sig[0] ** 2 * eye
    for s, s_next in zip(sig[:-1], sig[1:]):
        r2 = (s_next / s) ** 2
        T = C @ torch.linalg.inv(C + s**2 * eye)
        T = T + r2 * (eye - T)
        e, V = mean + T @ (e - mean), T @ V @ T.T + s_next**2 * (1 - r2) * eye
        if s_next > 0:
            lam = sy**2 / s_next**2
            Mi = torch.linalg.inv(A.T @ A + lam * eye)
            N = Mi @ A.T @ A
            e, V = lam * Mi @ e + Mi @ A.T @ y[0], lam**2 * Mi @ V @ Mi.T + s_next**2 * N @ N.T
    return e, V


# MCG with noisy y on the Gaussian prior: the guided denoiser is exact, so what the data step does is
# all there is to see. The scheme's exact output (``mcg_moments``) at 200 steps: the variance of the
# predicted data A x is 6.2 % (row selection) / 6.3 - 6.7 % (dense A) of the posterior's, its mean is
# 0.40 / 0.22 posterior std off; at 100 / 400 steps the variance is ~10 % / ~3.5 %: y is assimilated
# again at every step, so the samples collapse onto the data as the steps grow (a hard projection gives
# 0 at any step count; the null space is unaffected). The samples must follow that scheme within 5 SE.
@pytest.mark.parametrize("kind", ["select", "dense"])
def test_mcg_noisy_follows_its_kalman_scheme(kind):
    A, y, mean, C = make_problem(kind, SY)
    steps = 200
    em, ec = mcg_moments(A, y, SY, mean, C, karras(steps, SMIN, SMAX))
    sd = C.diag().sqrt()
    # (a) the scheme itself: over-confident in the range of A, not a hard fit, and near the posterior mean.
    range_ratio = (A @ ec @ A.T).diag() / (A @ C @ A.T).diag()
    assert ((range_ratio > 0.05) & (range_ratio < 0.08)).all(), range_ratio
    assert ((em - mean).abs() / sd).max() < 0.45
    # (b) the samples follow the scheme.
    x, _ = run("mcg", A, y, SY, steps=steps)
    n = x.shape[0]
    esd = ec.diag().sqrt()
    assert ((x.mean(0) - em).abs() <= 5 * esd / math.sqrt(n)).all(), ((x.mean(0) - em) / esd * math.sqrt(n))
    assert ((x.var(0) / ec.diag() - 1).abs() <= 5 * math.sqrt(2 / (n - 1))).all(), x.var(0) / ec.diag()
    ax_var = (x @ A.T).var(0) / (A @ ec @ A.T).diag()
    assert ((ax_var - 1).abs() <= 5 * math.sqrt(2 / (n - 1))).all(), ax_var
    # The data matter: ignoring them (the prior mean) would be > 2 posterior std off.
    assert ((x.mean(0) - mean).abs() / sd).max() < 0.5
    assert ((mean - MU).abs() / sd).max() > 2


# --------------------------------------------------------------------- 3. dense A, A A^T != I

# dds: 20 CG iterations are exact here (A^T A + lam I has 5 distinct eigenvalues); ddnm and dps: 50
# iterations. dps's guided denoiser is the exact posterior denoiser for any A (section 0), so it runs
# the same ancestral scheme as ddnm, and so does dds (eta = 1). Scheme's exact variance bias at 200
# steps: ddpm -4.9 %. Measured vs the posterior (N = 4096, 200 steps): max mean error 0.027 std, max
# variance error 8.7 % for all three (bound: 5 SE 11 % + 7 %). Before PiGDM, DPS's
# r^2 / (r^2 + SY^2) A^T (y - A D) step was 0.44 posterior std off here; the prior mean is 2.2 std off.
@pytest.mark.parametrize("solver", ["dds", "ddnm", "dps"])
def test_dense_guidance_is_exact(solver):
    A, y, mean, C = make_problem("dense", SY)
    assert not torch.allclose(A @ A.T, torch.eye(N_MEAS, dtype=DT), atol=0.1)
    x, _ = run(solver, A, y, SY, steps=200)
    post_m, _ = check_moments(x, mean, C, 200, SCHEME[solver], disc_var=0.07)
    assert post_m < 0.1 and ((mean - MU).abs() / C.diag().sqrt()).max().item() > 2  # the check is informative


def test_dense_dps_equals_ddnm():
    """Both are the exact posterior denoiser inside the same ancestral sampler, for a dense A too."""
    A, y, _, _ = make_problem("dense", SY)
    a, _ = run("dps", A, y, SY, steps=20, n_items=64)
    b, _ = run("ddnm", A, y, SY, steps=20, n_items=64)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- 4. complex MRI

H = 16


def _mri_problem(sy: float, seed: int = 0):
    """16x16 single-coil MRI (random1d x2) behind a random smooth phase; real x; complex y."""
    mask = make_mask("random1d", (H, H), 2.0, 0.125, seed=seed).mask
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H, dtype=DT), torch.linspace(-1, 1, H, dtype=DT), indexing="ij")
    c = torch.randn(5, generator=g, dtype=DT)
    phase = torch.exp(1j * (c[0] + c[1] * xx + c[2] * yy + c[3] * xx * yy + c[4] * xx**2))[None, None]
    op = PhaseModulated(SingleCoilMRI(mask), phase)
    x_true = MU + S * torch.randn(1, 1, H, H, generator=g, dtype=DT)
    y = op.A(x_true)
    # Circular complex noise, E|n|^2 = sy^2 per sampled entry (the convention of Problem and simulate_kspace).
    y = y + sy * torch.randn(y.shape, generator=g, dtype=torch.complex128) * torch.from_numpy(mask.copy())
    return op, y, mask


def _real_linear_posterior(op, y, sy):
    """Closed form with the real-linear operator: rows = [Re A; Im A] applied to the pixel basis;
    each real component of the complex noise has variance sy^2 / 2."""
    n = H * H
    cols = op.A(torch.eye(n, dtype=DT).reshape(n, 1, H, H)).reshape(n, -1)
    At = torch.cat([cols.real, cols.imag], 1).T
    yt = torch.cat([y.reshape(-1).real, y.reshape(-1).imag])
    v = sy**2 / 2
    C = torch.linalg.inv(torch.eye(n, dtype=DT) / S**2 + At.T @ At / v)
    return C @ (torch.full((n,), MU / S**2, dtype=DT) + At.T @ yt / v), C


# The posterior is exact here only if CG converges; DDS runs 20 CG iterations on a spread spectrum
# (the real-linear normal operator has eigenvalues from 1e-10 to 1) but lam = sy^2 / (2 r^2) >= 0.5
# keeps the system well conditioned, so the samples follow DDS's scheme (DDIM, eta = 1) on N(m, C)
# (its exact moments by ``sampler_moments``; mean variance ratio to C 0.822 at 50 steps).
# Measured vs the scheme (N = 256, sampler seeds 1/2/3): max |mean error| 0.18 / 0.20 / 0.16 scheme std
# (5 SE = 0.31), mean variance ratio 0.998 / 1.000 / 0.995. Before the fix in solvers._noise_var
# (complex noise taken as sy^2 per real component instead of sy^2 / 2) the mean error was 0.84
# posterior std and the variance ratio ~0.83 of the scheme's.
def test_mri_phase_modulated_dds_matches_real_linear_posterior():
    sy, n_items, steps = 0.5, 256, 50
    op, y, _ = _mri_problem(sy)
    mean, C = _real_linear_posterior(op, y, sy)
    em, ec = sampler_moments(mean, C, karras(steps, SMIN, SMAX), SCHEME["dds"])
    assert ((em - mean).abs() / C.diag().sqrt()).max() < 0.06  # init offset, as in check_moments
    prob = Problem(op, y.expand(n_items, -1, -1, -1), sy)
    x, _ = solve(ORACLE, prob, (n_items, 1, H, H), "dds", steps=steps, sigma_data=S, sigma_min=SMIN,
                 sigma_max=SMAX, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert x.dtype == DT and not x.is_complex()
    x = x.reshape(n_items, -1)
    err = ((x.mean(0) - em).abs() / ec.diag().sqrt()).max().item()
    # 5 SE + 0.05 for the truncated CG.
    assert err <= 5 / math.sqrt(n_items) + 0.05, err
    # Variance averaged over the 256 pixels: statistical SE ~0.006 (if independent); 0.05 allows for CG.
    ratio = (x.var(0) / ec.diag()).mean().item()
    assert abs(ratio - 1) <= 0.05, ratio


def test_mri_ddnm_noiseless_is_data_consistent():
    op, y, mask = _mri_problem(0.0, seed=1)
    n_items = 8
    x, _ = solve(ORACLE, Problem(op, y.expand(n_items, -1, -1, -1), 0.0), (n_items, 1, H, H), "ddnm", steps=20,
                 sigma_data=S, sigma_min=SMIN, sigma_max=SMAX, generator=torch.Generator().manual_seed(2), dtype=DT)
    resid = (op.A(x) - y).flatten(1).norm(dim=1) / y.flatten().norm()
    # Measured ~2e-4: CG on the nearly singular real-linear normal operator (eigenvalues down to 1e-10).
    assert (resid < 2e-3).all(), resid
    # The samples differ (the prior fills what the data leave open) yet all fit the data.
    assert (x[0] - x[1]).abs().max() > 1e-3
    # Without the data step the residual would be O(1): a sample from the prior does not fit y.
    prior_draw = MU + S * torch.randn(1, 1, H, H, generator=torch.Generator().manual_seed(3), dtype=DT)
    assert ((op.A(prior_draw) - y).norm() / y.norm()).item() > 0.3


# ---------------------------------------------------------------------------------- 5. NFE


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.inner(x, sigma)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("steps", [1, 7])
def test_nfe_counts_denoiser_calls(solver, steps):
    A, y, _, _ = make_problem("dense", SY)
    den = Counting(ORACLE)
    x, n_fe = solve(den, Problem(Matrix(A), y.expand(4, -1), SY), (4, N_DIM), solver, steps=steps, sigma_data=S,
                    sigma_min=SMIN, sigma_max=SMAX, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert n_fe == den.calls == sampler_nfe(SOLVERS[solver].sampler, steps)
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------- 6. reproducibility


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_same_seed_same_output_and_global_rng_untouched(solver):
    A, y, _, _ = make_problem("dense", SY)
    prob = Problem(Matrix(A), y.expand(16, -1), SY)

    def go(seed):
        return solve(ORACLE, prob, (16, N_DIM), solver, steps=6, sigma_data=S, sigma_min=SMIN, sigma_max=SMAX,
                     generator=torch.Generator().manual_seed(seed), dtype=DT)[0]

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a, b, c = go(5), go(5), go(6)
    assert torch.equal(torch.get_rng_state(), state), "solve() must draw only from its generator"
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c), "another seed must give another sample"


def test_cg_iters_override_is_the_spec_with_that_count(monkeypatch):
    """``solve(cg_iters=K)`` runs the solver's scheme with K CG steps, draw for draw; K < 1 is refused."""
    A, y, _, _ = make_problem("dense", SY)
    monkeypatch.setitem(SOLVERS, "dds-cg2", SolverSpec("ddim", "prox", cg_iters=2, eta=SOLVERS["dds"].eta))
    a, _ = solve(ORACLE, Problem(Matrix(A), y.expand(8, -1), 0.0), (8, N_DIM), "dds", steps=5, sigma_data=S,
                 sigma_min=SMIN, sigma_max=SMAX, generator=torch.Generator().manual_seed(3), dtype=DT, cg_iters=2)
    b, _ = run("dds-cg2", A, y, 0.0, steps=5, n_items=8, seed=3)
    c, _ = run("dds", A, y, 0.0, steps=5, n_items=8, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c), "2 CG steps must differ from the default count on this spread spectrum"
    with pytest.raises(MediffError, match="cg_iters"):
        solve(ORACLE, Problem(Matrix(A), y, SY), (1, N_DIM), "ddnm", steps=2, cg_iters=0)


# ------------------------------------------------------------------------------- 7. errors


def test_unknown_solver_raises():
    A, y, _, _ = make_problem("select", SY)
    with pytest.raises(MediffError, match="unknown solver"):
        solve(ORACLE, Problem(Matrix(A), y, SY), (1, N_DIM), "nope", steps=2)
    assert issubclass(MediffError, Exception)


def test_float32_default_runs():
    """The default dtype (float32, as the CLI uses) gives finite samples near the posterior mean."""
    A, y, mean, C = make_problem("select", SY)
    x, _ = solve(ORACLE, Problem(Matrix(A.float()), y.float().expand(512, -1), SY), (512, N_DIM), "dds", steps=30,
                 sigma_data=S, sigma_min=SMIN, sigma_max=SMAX, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert ((x.double().mean(0) - mean).abs() / C.diag().sqrt()).max() < 5 / math.sqrt(512) + 0.05
    np.testing.assert_allclose(x[:, :N_MEAS].double().mean(0).numpy(), mean[:N_MEAS].numpy(), atol=0.02)


def test_per_item_noise_std_matches_one_problem_per_item() -> None:
    """A batch whose items have their own noise std (``Problem.noise_sigma`` (B,)) gets, item by item,
    the data step of a problem of that std alone: the guided denoiser's prox and MCG's projection
    (at sigma = 0 a noiseless item is projected, a noisy one kept)."""
    from mediff.physics.operators import Matrix
    from mediff.solvers import _posterior_prox, measurement_projection

    g = torch.Generator().manual_seed(0)
    op = Matrix(torch.randn(6, 10, generator=g, dtype=torch.float64))
    y = torch.randn(2, 6, generator=g, dtype=torch.float64)
    d = torch.randn(2, 10, generator=g, dtype=torch.float64)
    stds = torch.tensor([0.0, 0.3], dtype=torch.float64)
    sigma = torch.full((2,), 0.7, dtype=torch.float64)
    both, _ = _posterior_prox(Problem(op, y, stds), d, sigma, 0.5, 30)
    project = measurement_projection(Problem(op, y, stds), None, 30)(d, 0.0)
    for i in range(2):
        alone, _ = _posterior_prox(Problem(op, y[i:i + 1], float(stds[i])), d[i:i + 1], sigma[i:i + 1], 0.5, 30)
        torch.testing.assert_close(both[i:i + 1], alone)
    torch.testing.assert_close(project[1], d[1])
    torch.testing.assert_close(op.A(project[:1]), y[:1])
    assert not torch.allclose(both[0], both[1])


def test_preconditioned_cg_solves_in_one_step_with_the_exact_inverse() -> None:
    """PCG with M^-1 = normal^-1 (a diagonal normal, 6 distinct eigenvalues) lands on the solution in
    one step, where plain CG is still far from it; both reach it in the end."""
    from mediff.physics.operators import conjugate_gradient

    d = torch.tensor([[1e-2, 0.1, 1.0, 3.0, 10.0, 100.0]], dtype=DT)
    rhs = torch.tensor([[1.0, -2.0, 0.5, 4.0, 1.0, -1.0]], dtype=DT)
    exact = rhs / d
    one = conjugate_gradient(lambda v: d * v, rhs, torch.zeros_like(rhs), 1, precondition=lambda r: r / d)
    torch.testing.assert_close(one, exact, rtol=1e-12, atol=0)
    plain = conjugate_gradient(lambda v: d * v, rhs, torch.zeros_like(rhs), 1)
    assert (plain - exact).norm() > 0.5 * exact.norm()
    torch.testing.assert_close(conjugate_gradient(lambda v: d * v, rhs, torch.zeros_like(rhs), 50), exact)


def test_jacobi_preconditioned_prox_is_the_same_posterior_and_gets_there_sooner() -> None:
    """Weighted CT as low-dose PWLS has it (bin weights exp(-p/2) of the line integrals p of a
    body, so rays through it weigh less): the DDS guided denoiser with ``Problem.diagonal`` =
    A^T W A 1 is still the exact posterior denoiser (the preconditioner changes CG's path, not its
    answer), and where the data dominate the prior (sigma >= 0.3, small lam) it is closer to it after
    4 CG steps than plain CG."""
    from mediff.physics.operators import Weighted
    from mediff.solvers import prox_guidance

    n, g = 24, torch.Generator().manual_seed(3)
    base = ParallelBeamCT(n, sparse_view_angles(36))
    yy, xx = torch.meshgrid(torch.arange(n, dtype=DT), torch.arange(n, dtype=DT), indexing="ij")
    body = ((yy - (n - 1) / 2) ** 2 / (0.4 * n) ** 2 + (xx - (n - 1) / 2 - 0.1 * n) ** 2 / (0.3 * n) ** 2 < 1)
    p = base.A(body.to(DT)[None, None])
    op = Weighted(base, torch.exp(-1.5 * p / p.max()))
    y = op.A(MU + S * torch.randn(1, 1, n, n, generator=g, dtype=DT))
    y = y + SY * torch.randn(y.shape, generator=g, dtype=DT)
    sigma = torch.tensor([0.3, 1.0], dtype=DT)
    x = MU + S * torch.randn(2, 1, n, n, generator=g, dtype=DT)
    x = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=DT)
    yb = y.expand(2, *y.shape[1:])
    diag = op.normal(torch.ones(1, 1, n, n, dtype=DT))
    want = posterior_denoiser(_real_rows(op, (1, n, n)), _real_flat(yb), x, sigma, SY**2)
    plain, jacobi = Problem(op, yb, SY), Problem(op, yb, SY, diag)
    for prob in (plain, jacobi):
        torch.testing.assert_close(prox_guidance(ORACLE, prob, S, 400)(x, sigma), want, rtol=0, atol=1e-8)
    err = {name: (prox_guidance(ORACLE, prob, S, 4)(x, sigma) - want).flatten(1).norm(dim=1)
           for name, prob in (("plain", plain), ("jacobi", jacobi))}
    assert bool((err["jacobi"] < 0.95 * err["plain"]).all()), err
