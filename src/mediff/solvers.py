"""Posterior solvers for y = A x0 + n: a sampler from ``mediff.samplers`` plus a guidance term.

Two guidance terms, both acting on the denoised estimate D(x, sigma), cover the five solvers:

- ``prox``: E[x0 | x, y] under the Gaussian approximation x0 | x ~ N(D, r^2 I):
  argmin ||y - A z||^2 / sy^2 + ||z - D||^2 / r^2, solved by conjugate gradients started at D.
  With a few CG iterations this is DDS (Chung, Lee & Ye 2023, arXiv 2303.05754); iterated to
  convergence it is the null-space projection of DDNM (Wang, Yu & Zhang 2022, arXiv 2212.00490),
  which keeps the range of A from the data and the null space from the prior.
- ``grad``: D + r^2 / (sy^2 + r^2) * J^T A^H (y - A D), the likelihood gradient through the
  denoiser of DPS (Chung et al. 2022, arXiv 2209.14687), computed by autograd, scaled by ``zeta``.

``r^2 = sigma^2 sd^2 / (sigma^2 + sd^2)`` is the posterior variance of x0 | x for data of standard
deviation sd (the prior's sigma_data), as in PiGDM (Song et al. 2023). For a Gaussian prior of
std sd both terms give the exact posterior denoiser, which the tests exploit.

MCG (Chung et al. 2022, arXiv 2206.00941) is ``grad`` plus a projection of each new state onto the
noised measurements y + sigma A z; ``langevin`` is predictor-corrector sampling with that same
projection (Song, Shen, Xing & Ermon 2022, arXiv 2111.08005; score-MRI, Chung & Ye 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mediff.denoiser import Denoiser
from mediff.errors import MediffError
from mediff.operators.base import LinearOperator, conjugate_gradient
from mediff.samplers import SAMPLERS, Project, nfe
from mediff.schedules import karras


@dataclass(frozen=True)
class Problem:
    """Measurements ``y`` of ``op`` with noise std ``noise_sigma`` (same units as y, per real entry
    of a real y or per complex entry of a complex y)."""

    op: LinearOperator
    y: Tensor
    noise_sigma: float = 0.0


def posterior_var(sigma: Tensor, sigma_data: float) -> Tensor:
    """r^2(sigma): variance of x0 | x_sigma for Gaussian data of std ``sigma_data``."""
    return sigma**2 * sigma_data**2 / (sigma**2 + sigma_data**2)


def _noise_var(problem: Problem, x: Tensor) -> float:
    """Likelihood noise variance on the scale of a real/complex prior variance r^2 of ``x``.

    A complex y with E|n|^2 = sy^2 per entry has variance sy^2 / 2 per real component; for a real x
    (e.g. ``PhaseModulated``) the likelihood exp(-|y - A z|^2 / sy^2) pairs with the prior
    exp(-|z - D|^2 / (2 r^2)), so the effective variance is sy^2 / 2. Real y, or complex x and y: sy^2.
    """
    v = problem.noise_sigma**2
    return v / 2 if problem.y.is_complex() and not x.is_complex() else v


def _item(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def prox_data_consistency(problem: Problem, d: Tensor, lam: Tensor, iters: int) -> Tensor:
    """CG on (A^H A + lam I) z = A^H y + lam d from z = d: ``iters`` steps (lam (B,), 0 = projection)."""
    op, y = problem.op, problem.y
    lam_b = _item(lam, d).to(d.dtype)
    return conjugate_gradient(lambda z: op.normal(z) + lam_b * z, op.AH(y) + lam_b * d, d, iters)


def prox_guidance(denoiser: Denoiser, problem: Problem, sigma_data: float, cg_iters: int) -> Denoiser:
    """DDS/DDNM: the denoised estimate made consistent with y by ``cg_iters`` CG steps."""

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        d = denoiser(x, sigma)
        lam = _noise_var(problem, d) / posterior_var(sigma.double(), sigma_data)
        return prox_data_consistency(problem, d, lam, cg_iters)

    return guided


def grad_guidance(denoiser: Denoiser, problem: Problem, sigma_data: float, zeta: float = 1.0) -> Denoiser:
    """DPS: D + zeta r^2/(sy^2 + r^2) J^T A^H (y - A D), the gradient taken through the network."""

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            d = denoiser(xg, sigma)
            resid = problem.op.A(d) - problem.y
            (vjp,) = torch.autograd.grad(0.5 * resid.abs().pow(2).sum(), xg)
        r2 = posterior_var(sigma.to(x.dtype), sigma_data)
        # d/dx of 0.5||A D(x) - y||^2 is J^T A^H (A D - y); J ~ r^2/sigma^2 for a Gaussian, so sigma^2 * vjp
        # estimates r^2 A^H(A D - y) projected through the network's Jacobian.
        weight = zeta * sigma.to(x.dtype) ** 2 / (_noise_var(problem, x) + r2)
        return d.detach() - _item(weight, x) * vjp

    return guided


def measurement_projection(problem: Problem, generator: torch.Generator | None, cg_iters: int) -> Project:
    """Project a state at noise level sigma onto {A x = y + sigma A z} (z fresh noise), by CG."""

    def project(x: Tensor, sigma: float) -> Tensor:
        if sigma == 0:
            y_s = problem.y
        else:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            y_s = problem.y + sigma * problem.op.A(z)
        lam = torch.zeros(x.shape[0], dtype=torch.float64)
        return prox_data_consistency(Problem(problem.op, y_s), x, lam, cg_iters)

    return project


@dataclass(frozen=True)
class SolverSpec:
    """How a named solver is assembled: its sampler, guidance term and iteration counts."""

    sampler: str
    guidance: str  # "prox" | "grad" | "none"
    cg_iters: int = 0
    project: bool = False
    backward: bool = False  # needs a backward pass through the network per step


SOLVERS: dict[str, SolverSpec] = {
    "dds": SolverSpec("ddim", "prox", cg_iters=5),
    "ddnm": SolverSpec("ddpm", "prox", cg_iters=50),
    "dps": SolverSpec("ddpm", "grad", backward=True),
    "mcg": SolverSpec("ddpm", "grad", cg_iters=5, project=True, backward=True),
    "langevin": SolverSpec("pc", "none", cg_iters=5, project=True),
}


def solve(denoiser: Denoiser, problem: Problem, x_shape: tuple[int, ...], solver: str = "dds", steps: int = 50,
          sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
          generator: torch.Generator | None = None, zeta: float = 1.0, dtype: torch.dtype = torch.float32,
          callback: Callable | None = None) -> tuple[Tensor, int]:
    """Draw one posterior sample per item of ``x_shape`` (B, ...). Returns (x, NFE per item).

    For several samples per measurement, repeat the items of y (and of a per-item operator) along B.
    """
    if solver not in SOLVERS:
        raise MediffError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    spec = SOLVERS[solver]
    if spec.guidance == "prox":
        den = prox_guidance(denoiser, problem, sigma_data, spec.cg_iters)
    elif spec.guidance == "grad":
        den = grad_guidance(denoiser, problem, sigma_data, zeta)
    else:
        den = denoiser
    project = measurement_projection(problem, generator, spec.cg_iters) if spec.project else None
    sigmas = karras(steps, sigma_min, sigma_max).to(dtype)
    x = torch.randn(x_shape, generator=generator, dtype=dtype) * sigmas[0]
    out = SAMPLERS[spec.sampler](den, x, sigmas, generator=generator, project=project, callback=callback)
    return out, nfe(spec.sampler, steps)
