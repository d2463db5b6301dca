"""Run one reconstruction method on a ``Task``: a diffusion solver with the prior, or a baseline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.recon import policy
from mediff.recon.task import Task
from mediff.solvers import SOLVERS, Problem, solve

ALL_BASELINES = ("zero-filled", "tv", "l1wavelet", "fbp")  # MRI: zero-filled, tv, l1wavelet; CT: fbp, tv


@dataclass
class ReconResult:
    """Images on the working grid, normalised units: mean (1, 1, H, W), std (1, 1, H, W) or None (one
    sample), samples (K, 1, 1, H, W); nfe per sample; seconds of wall time."""

    mean: Tensor
    std: Tensor | None
    samples: Tensor
    nfe: int
    seconds: float


def check_method(method: str) -> None:
    """Raise MediffError unless ``method`` is a diffusion solver or a baseline."""
    if method not in SOLVERS and method not in ALL_BASELINES:
        raise MediffError(f"unknown solver {method!r}; choose from {', '.join(dict.fromkeys([*SOLVERS, *ALL_BASELINES]))}")


def default_cg_iters(task: Task, method: str) -> int:
    """CG steps per update of diffusion solver ``method`` on ``task`` (``policy.cg_iters``)."""
    return policy.cg_iters(task.family, method)


def run_solver(task: Task, method: str, prior=None, steps: int = 50, seed: int = 0, samples: int = 1,
               lam: float | None = None, progress: Callable | None = None,
               cg_iters: int | None = None) -> ReconResult:
    """Reconstruct ``task`` with a diffusion solver (needs ``prior``; ``samples`` posterior samples in one
    batch from ``seed``) or one of the task's baselines (weight ``lam``, None: the tuned one).
    ``cg_iters``: CG steps per data-consistency update instead of the policy's (fewer: faster, less
    accurate)."""
    t0 = time.perf_counter()
    check_method(method)
    if method in ALL_BASELINES:
        img = task.image(task.baseline(method, lam))
        return ReconResult(img, None, img[None], 0, time.perf_counter() - t0)
    if prior is None:
        raise MediffError(f"solver {method} needs a prior (--model)")
    _, y = task.data()
    problem = Problem(task.solver_operator(), y.expand(samples, *y.shape[1:]), task.noise_sigma)
    gen = torch.Generator().manual_seed(seed)
    x, n = solve(prior, problem, (samples, 1, *task.shape), method, steps=steps, sigma_data=prior.meta.sigma_data,
                 sigma_min=prior.sigma_min, sigma_max=prior.sigma_max, generator=gen, callback=progress,
                 cg_iters=policy.cg_iters(task.family, method) if cg_iters is None else cg_iters)
    mag = task.image(x.detach())
    std = mag.std(0, keepdim=True) if samples > 1 else None
    return ReconResult(mag.mean(0, keepdim=True), std, mag[:, None], n, time.perf_counter() - t0)
