"""Samplers of the reverse diffusion in the variance-exploding sigma parameterisation.

Each is a plain function ``(denoiser, x, sigmas, *, generator, project, callback) -> x`` where ``x``
starts at noise level ``sigmas[0]`` and ``sigmas`` descends to 0 (see ``mediff.schedules``). The
denoiser may itself carry guidance (posterior solvers wrap it); ``project(x, sigma)`` is an optional
map applied after every update to the new state at noise level ``sigma`` (data-consistency
projections). ``callback(i, x, denoised)`` observes progress. Random draws use only ``generator``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mediff.denoiser import Denoiser

Project = Callable[[Tensor, float], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


def _denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    return denoiser(x, sigma.to(x.dtype).expand(x.shape[0]))


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _finish(x: Tensor, sigma: Tensor, project: Project | None) -> Tensor:
    return project(x, float(sigma)) if project is not None else x


def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                project: Project | None = None, callback: Callback | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, arXiv 2010.02502, Eq. 12) in VE form: x_next = D + sqrt(s_next^2 - c^2)
    (x - D) / s + c z with c = eta s_next sqrt(1 - (s_next / s)^2). eta = 0 is Euler on the
    probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al. 2022, EDM, Sec. 3); eta = 1 is
    the ancestral DDPM step (``sample_ddpm``); in between, part of the noise is renewed each step."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _denoise(denoiser, x, s)
        if eta == 0:  # the flow draws nothing: the generator stays untouched (deterministic samplers)
            x = d + (s_next / s) * (x - d)
        else:
            c = eta * s_next * (1 - (s_next / s) ** 2).clamp_min(0).sqrt()
            x = d + (s_next**2 - c**2).clamp_min(0).sqrt() / s * (x - d) + c * _noise(x, generator)
        x = _finish(x, s_next, project)
        if callback:
            callback(i, x, d)
    return x


def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                project: Project | None = None, callback: Callback | None = None) -> Tensor:
    """Heun's 2nd-order method, EDM Algorithm 2 (deterministic, S_churn = 0): 2 NFE per step
    except the last (to sigma = 0), which is an Euler step."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _denoise(denoiser, x, s)
        slope = (x - d) / s
        x_next = x + (s_next - s) * slope
        if s_next > 0:
            d2 = _denoise(denoiser, x_next, s_next)
            x_next = x + (s_next - s) * 0.5 * (slope + (x_next - d2) / s_next)
        x = _finish(x_next, s_next, project)
        if callback:
            callback(i, x, d)
    return x


def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                project: Project | None = None, callback: Callback | None = None) -> Tensor:
    """Ancestral sampling, the DDPM posterior step (Ho et al. 2020) in VE form: x_next is drawn from
    q(x_next | x, x0 = D) = N(D + (s_next/s)^2 (x - D), s_next^2 (s^2 - s_next^2) / s^2), i.e. DDIM
    with eta = 1."""
    return sample_ddim(denoiser, x, sigmas, generator=generator, project=project, callback=callback, eta=1.0)


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                    project: Project | None = None, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv 2211.01095) Alg. 2, data prediction, in lambda = -log sigma.
    First and last steps are first order (the last lands on sigma = 0, i.e. x = D)."""
    d_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _denoise(denoiser, x, s)
        if s_next == 0:
            x_next = d
        else:
            h = (s / s_next).log()
            d_hat = d if d_prev is None else d + (h / (2 * h_prev)) * (d - d_prev)
            x_next = (s_next / s) * x - torch.expm1(-h) * d_hat
            h_prev = h
        d_prev = d
        x = _finish(x_next, s_next, project)
        if callback:
            callback(i, x, d)
    return x


def sample_pc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
              project: Project | None = None, callback: Callback | None = None, n_corrector: int = 1,
              snr: float = 0.16) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, arXiv 2011.13456, Alg. 2, VE SDE): a reverse-
    diffusion predictor and ``n_corrector`` annealed Langevin steps whose size follows the target
    signal-to-noise ratio ``snr``. With ``project`` this is score-MRI / HGGDP-style reconstruction."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        for _ in range(n_corrector):
            d = _denoise(denoiser, x, s)
            score = (d - x) / s**2
            z = _noise(x, generator)
            eps = 2 * (snr * z.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp_min(1e-12)) ** 2
            eps = eps.view(-1, *([1] * (x.dim() - 1)))
            x = _finish(x + eps * score + (2 * eps).sqrt() * z, s, project)
        d = _denoise(denoiser, x, s)
        # Reverse-diffusion predictor: an ancestral step of the VE SDE from s to s_next.
        x = d + (s_next / s) ** 2 * (x - d) + s_next * (1 - (s_next / s) ** 2).clamp_min(0).sqrt() * _noise(x, generator)
        x = _finish(x, s_next, project)
        if callback:
            callback(i, x, d)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_ddim,
    "ddim": sample_ddim,
    "heun": sample_heun,
    "ddpm": sample_ddpm,
    "dpmpp2m": sample_dpmpp_2m,
    "pc": sample_pc,
}


def nfe(sampler: str, n_steps: int, n_corrector: int = 1) -> int:
    """Network evaluations a sampler spends on ``n_steps`` steps (the last step lands on sigma = 0)."""
    return {"heun": 2 * n_steps - 1, "pc": n_steps * (n_corrector + 1)}.get(sampler, n_steps)


def sample(denoiser: Denoiser, shape: tuple[int, ...], sigmas: Tensor, sampler: str = "heun",
           generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu", **kwargs) -> Tensor:
    """Draw samples from pure noise x ~ N(0, sigmas[0]^2 I) with the named sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device) * float(sigmas[0])
    return SAMPLERS[sampler](denoiser, x, sigmas.to(dtype=dtype, device=device), generator=generator, **kwargs)
