"""Posterior solvers for y = A x0 + n: a sampler from ``mediff.samplers`` plus a guidance term.

Two guidance terms, both acting on the denoised estimate D(x, sigma), cover the five solvers. Both
start from the Gaussian approximation x0 | x ~ N(D, r^2 I) and its data-consistent mean

    P = argmin ||y - A z||^2 / sy^2 + ||z - D||^2 / r^2  =  D + r^2 A^H (r^2 A A^H + sy^2 I)^-1 (y - A D),

computed in image space by conjugate gradients on (A^H A + lam I) z = A^H y + lam D, lam = sy^2 / r^2,
started at D (``prox_data_consistency``; lam = 0 for noiseless y gives P = D + A^+ (y - A D)).

- ``prox``: the guided denoiser is P. With a few CG iterations inside DDIM with noise renewal eta
  this is DDS (Chung, Lee & Ye 2023, arXiv 2303.05754); iterated to convergence it is the null-space
  projection of DDNM (Wang, Yu & Zhang 2022, arXiv 2212.00490), which keeps the range of A from the
  data and the null space from the prior.
- ``grad``: D + zeta (sigma^2 / r^2) J^T (P - D), J the Jacobian of D(x, sigma) in x (one
  vector-Jacobian product by autograd). By the identity above this is Tweedie's formula
  D + sigma^2 grad_x log N(y; A D(x), r^2 A A^H + sy^2 I), the pseudoinverse-guided step of PiGDM
  (Song, Vahdat, Mardani & Kautz 2023, "Pseudoinverse-Guided Diffusion Models for Inverse Problems",
  ICLR 2023), for any linear A and noisy or noiseless y. It is solved in image space, never in
  measurement space: for a real image behind complex data (``PhaseModulated``) A A^H is singular.
  ``zeta`` = 1 is the exact weight of the Gaussian approximation. The gradient through the network
  is that of DPS (Chung et al. 2022, arXiv 2209.14687); DPS's own weight (a step zeta / ||y - A D||
  on the residual gradient) is not used.

``r^2 = sigma^2 sd^2 / (sigma^2 + sd^2)`` is the posterior variance of x0 | x for data of standard
deviation sd (the prior's sigma_data), as in PiGDM. For a Gaussian prior of std sd, J = r^2 / sigma^2 I
and both terms give the exact posterior denoiser E[x0 | x, y] (to CG's accuracy), which the tests exploit.

MCG (Chung et al. 2022, arXiv 2206.00941) is ``grad`` plus a data step on each new state, with the
noised measurements y + sigma A z; ``langevin`` is predictor-corrector sampling with that same data
step (Song, Shen, Xing & Ermon 2022, arXiv 2111.08005; score-MRI, Chung & Ye 2022). For noiseless y
the step is the projection onto {A x = y + sigma A z}, which a state of the noised posterior already
satisfies (for a Gaussian prior MCG then samples the posterior, up to discretisation). For noisy y it is a Kalman update
that does not fit the noise outright (``measurement_projection``), but it is not exact: on top of a
guided denoiser that already used y it counts y again at every step, so MCG's samples are
over-confident in the range of A (tests/test_solvers.py measures by how much on a Gaussian prior).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from mediff.denoiser import Denoiser
from mediff.errors import MediffError
from mediff.physics.operators import LinearOperator, conjugate_gradient, inner
from mediff.samplers import SAMPLERS, Project, nfe
from mediff.schedules import karras


@dataclass(frozen=True)
class Problem:
    """Measurements ``y`` of ``op`` with noise std ``noise_sigma`` (same units as y, per real entry
    of a real y or per complex entry of a complex y): one std for every item, or one per item (B,),
    so that problems with different noise levels (the slices of a volume) can share a batch.
    ``diagonal``: where A^H A's diagonal varies over the image (weighted least squares, whose weights
    span orders of magnitude), CG's steps go to that scaling first; dividing the residual by
    diagonal + lam (Jacobi) removes it. None: plain CG."""

    op: LinearOperator
    y: Tensor
    noise_sigma: float | Tensor = 0.0
    diagonal: Tensor | None = None  # positive (B or 1, 1, H, W) ~ diag(A^H A): Jacobi-preconditioned CG

    @cached_property
    def aty(self) -> Tensor:
        """A^H y, computed once per problem: every data-consistency step of a solve reuses it."""
        return self.op.AH(self.y)


def posterior_var(sigma: Tensor, sigma_data: float) -> Tensor:
    """r^2(sigma): variance of x0 | x_sigma for Gaussian data of std ``sigma_data``."""
    return sigma**2 * sigma_data**2 / (sigma**2 + sigma_data**2)


def _noise_var(problem: Problem, x: Tensor) -> Tensor:
    """Likelihood noise variance (B,) float64, per item, on the scale of a real/complex prior variance
    r^2 of ``x`` (B, ...).

    A complex y with E|n|^2 = sy^2 per entry has variance sy^2 / 2 per real component; for a real x
    (e.g. ``PhaseModulated``) the likelihood exp(-|y - A z|^2 / sy^2) pairs with the prior
    exp(-|z - D|^2 / (2 r^2)), so the effective variance is sy^2 / 2. Real y, or complex x and y: sy^2.
    """
    v = torch.as_tensor(problem.noise_sigma, dtype=torch.float64).expand(x.shape[0]) ** 2
    return v / 2 if problem.y.is_complex() and not x.is_complex() else v


def _item(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def prox_data_consistency(problem: Problem, d: Tensor, lam: Tensor, iters: int) -> Tensor:
    """CG on (A^H A + lam I) z = A^H y + lam d from z = d: ``iters`` steps (lam (B,), 0 = projection),
    Jacobi-preconditioned by ``problem.diagonal`` when given."""
    op, diag = problem.op, problem.diagonal
    lam_b = _item(lam, d).to(d.dtype)
    m = None if diag is None else diag.to(d.real.dtype) + lam_b.real  # once per prox, not per CG step
    precondition = None if m is None else (lambda r: r / m)
    return conjugate_gradient(lambda z: op.normal(z) + lam_b * z, problem.aty + lam_b * d, d, iters,
                              precondition=precondition)


def _posterior_prox(problem: Problem, d: Tensor, sigma: Tensor, sigma_data: float,
                    iters: int) -> tuple[Tensor, Tensor]:
    """P = argmin ||y - A z||^2 / sy^2 + ||z - d||^2 / r^2 by ``iters`` CG steps (lam = sy^2 / r^2),
    the mean of x0 | x, y when x0 | x ~ N(d, r^2 I). Returns (P, r^2) with r^2 per item (B,)."""
    r2 = posterior_var(sigma.double(), sigma_data)
    return prox_data_consistency(problem, d, _noise_var(problem, d) / r2, iters), r2


def prox_guidance(denoiser: Denoiser, problem: Problem, sigma_data: float, cg_iters: int) -> Denoiser:
    """DDS/DDNM: the denoised estimate made consistent with y by ``cg_iters`` CG steps."""

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        return _posterior_prox(problem, denoiser(x, sigma), sigma, sigma_data, cg_iters)[0]

    return guided


def grad_guidance(denoiser: Denoiser, problem: Problem, sigma_data: float, zeta: float = 1.0,
                  cg_iters: int = 50) -> Denoiser:
    """PiGDM: D + zeta (sigma^2 / r^2) J^T (P - D), P the image-space prox of ``prox_guidance``
    (``cg_iters`` CG steps from D) and J^T the vector-Jacobian product of the network at x (one
    backward pass).

    P - D = r^2 A^H (r^2 A A^H + sy^2 I)^-1 (y - A D) (push-through identity), so this is
    D + zeta sigma^2 grad_x log N(y; A D(x), r^2 A A^H + sy^2 I), Tweedie's formula for E[x0 | x, y]
    under x0 | x ~ N(D, r^2 I), without ever solving in measurement space.
    """

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            d = denoiser(xg, sigma)
            p, r2 = _posterior_prox(problem, d.detach(), sigma, sigma_data, cg_iters)
            # grad_x Re<P - D, D(x)> with P - D held fixed = J^T (P - D) (J^H for a complex image).
            (vjp,) = torch.autograd.grad(inner((p - d).detach(), d).real.sum(), xg)
        weight = zeta * sigma.double() ** 2 / r2
        return d.detach() + _item(weight, x).to(vjp.dtype) * vjp

    return guided


def measurement_projection(problem: Problem, generator: torch.Generator | None, cg_iters: int) -> Project:
    """Data step of MCG and Langevin on a state x at noise level sigma, with fresh noise z and the
    perturbed observation y_s = y + sigma A z; ``cg_iters`` CG steps from x.

    Noiseless y: project x onto {A u = y_s} (for sigma = 0, onto {A u = y}).

    Noisy y (``noise_sigma`` > 0, noise variance sy^2 as in ``_noise_var``): y_s = A (x0 + sigma z) + n
    observes the state x* = x0 + sigma z at level sigma with error n ~ N(0, sy^2 I). A hard projection
    would set A x = y_s, i.e. fit n. Instead treat x as a forecast of x* with error covariance
    sigma^2 I (the spread of states at level sigma) and take the Gaussian posterior mean of x* given
    x and y_s, the Kalman analysis with perturbed observations (each item one ensemble member):

        x_new = argmin_u ||A u - y_s||^2 / sy^2 + ||u - x||^2 / sigma^2
              = x + sigma^2 A^H (sigma^2 A A^H + sy^2 I)^-1 (y_s - A x)      (gain form)
              = (A^H A + lam I)^-1 (A^H y_s + lam x),   lam = sy^2 / sigma^2,

    solved in the last form by ``prox_data_consistency``. As sy -> 0, lam -> 0 and this is the
    projection above (CG from x stays in x + range(A^H), so it converges to the nearest consistent
    point). At sigma = 0 with noisy y, lam = inf: x is returned unchanged (the guided denoiser has
    already weighed the data). This is a heuristic data step: unlike the guided denoiser it is not
    the exact posterior update even for a Gaussian prior (it does not preserve the noised posterior).
    Each step assimilates the same y again, so after a guided denoiser the samples are over-confident
    in the range of A, the more so the more steps: on the Gaussian prior of tests/test_solvers.py the
    variance of A x is ~10 % / 6 % / 3.5 % of the posterior's at 100 / 200 / 400 MCG steps (0 for the
    hard projection).
    """

    def project(x: Tensor, sigma: float) -> Tensor:
        noise_var = _noise_var(problem, x)
        if sigma == 0:
            noisy = noise_var > 0
            if bool(noisy.all()):
                return x
            # Noiseless items are projected onto {A u = y}; noisy ones (lam = inf) keep x.
            projected = prox_data_consistency(problem, x, torch.zeros_like(noise_var), cg_iters)
            return torch.where(_item(noisy, x), x, projected)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        y_s = problem.y + sigma * problem.op.A(z)
        return prox_data_consistency(replace(problem, y=y_s, noise_sigma=0.0), x, noise_var / sigma**2, cg_iters)

    return project


@dataclass(frozen=True)
class SolverSpec:
    """How a named solver is assembled: its sampler, guidance term and iteration counts."""

    sampler: str
    guidance: str  # "prox" | "grad" | "none"
    cg_iters: int = 0  # CG steps of the guidance's image-space prox (prox and grad)
    project_iters: int = 0  # CG steps of the data step after each update (``measurement_projection``)
    project: bool = False
    backward: bool = False  # needs a backward pass through the network per step
    eta: float | None = None  # DDIM's noise renewal (``samplers.sample_ddim``); None: not a DDIM sampler


SOLVERS: dict[str, SolverSpec] = {
    # DDS: DDIM with noise renewal eta and a few CG steps. eta = 1 beat the paper's 0.85 and the
    # deterministic eta = 0 on held-out CT and MRI (benchmarks/dds_sweep.py). The CG count is the
    # solver's default when called directly; mediff.recon.policy sets it per operator family.
    "dds": SolverSpec("ddim", "prox", cg_iters=20, eta=1.0),
    "ddnm": SolverSpec("ddpm", "prox", cg_iters=50),
    "dps": SolverSpec("ddpm", "grad", cg_iters=50, backward=True),
    "mcg": SolverSpec("ddpm", "grad", cg_iters=50, project_iters=5, project=True, backward=True),
    "langevin": SolverSpec("pc", "none", project_iters=5, project=True),
}


def solve(denoiser: Denoiser, problem: Problem, x_shape: tuple[int, ...], solver: str = "dds", steps: int = 50,
          sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
          generator: torch.Generator | None = None, zeta: float = 1.0, dtype: torch.dtype = torch.float32,
          callback: Callable | None = None, cg_iters: int | None = None) -> tuple[Tensor, int]:
    """Draw one posterior sample per item of ``x_shape`` (B, ...). Returns (x, NFE per item).

    ``cg_iters``: CG steps of the guidance's prox, replacing the solver's ``SolverSpec.cg_iters``
    (how many a problem needs depends on its operator's conditioning; ``recon.policy.DDS_CG_ITERS``).
    For several samples per measurement, repeat the items of y (and of a per-item operator) along B.
    """
    if solver not in SOLVERS:
        raise MediffError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    spec = SOLVERS[solver]
    iters = spec.cg_iters if cg_iters is None else cg_iters
    if iters < 1 and spec.guidance != "none":
        raise MediffError(f"cg_iters must be >= 1 for solver {solver}, got {iters}")
    if spec.guidance == "prox":
        den = prox_guidance(denoiser, problem, sigma_data, iters)
    elif spec.guidance == "grad":
        den = grad_guidance(denoiser, problem, sigma_data, zeta, iters)
    else:
        den = denoiser
    project = measurement_projection(problem, generator, spec.project_iters) if spec.project else None
    sigmas = karras(steps, sigma_min, sigma_max).to(dtype)
    x = torch.randn(x_shape, generator=generator, dtype=dtype) * sigmas[0]
    options = {} if spec.eta is None else {"eta": spec.eta}
    out = SAMPLERS[spec.sampler](den, x, sigmas, generator=generator, project=project, callback=callback, **options)
    return out, nfe(spec.sampler, steps)
