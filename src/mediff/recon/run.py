"""Run one reconstruction method on a ``Task``: a diffusion solver with the prior, or a baseline; a
solver also on several tasks at once (``run_batch``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.recon import policy
from mediff.recon.task import Task
from mediff.physics.operators import Stacked
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
    check_method(method)
    if method in ALL_BASELINES:
        t0 = time.perf_counter()
        img = task.image(task.baseline(method, lam))
        return ReconResult(img, None, img[None], 0, time.perf_counter() - t0)
    return run_batch([task], method, prior, steps, seed, samples, progress, cg_iters)[0]


def batchable(a: Task, b: Task) -> bool:
    """Whether two tasks can share one solver run (``run_batch``): one working grid, operator family
    (one CG count) and data shape; each keeps its own noise std."""
    return a.shape == b.shape and a.family == b.family and a.data()[1].shape == b.data()[1].shape


def run_batch(tasks: list[Task], method: str, prior, steps: int = 50, seed: int = 0, samples: int = 1,
              progress: Callable | None = None, cg_iters: int | None = None) -> list[ReconResult]:
    """Diffusion solver ``method`` on several ``batchable`` tasks in one run (the slices of a volume):
    the network denoises all of them, ``samples`` each, as one batch of len(tasks) * samples images,
    each task's data through its own operator (``Stacked``) and with its own noise std. One generator
    from ``seed`` draws the run's noise. Returns one result per task; seconds are the run's wall time
    shared equally."""
    if prior is None:
        raise MediffError(f"solver {method} needs a prior (--model)")
    t0 = time.perf_counter()
    first = tasks[0]
    if not all(batchable(first, t) for t in tasks[1:]):
        raise MediffError("run_batch needs tasks of one grid, operator family and data shape")
    ys = [t.data()[1] for t in tasks]
    op = first.solver_operator() if len(tasks) == 1 else Stacked([t.solver_operator() for t in tasks], samples)
    y = torch.cat([v.expand(samples, *v.shape[1:]) for v in ys])
    sigmas = {t.noise_sigma for t in tasks}
    noise = first.noise_sigma if len(sigmas) == 1 else \
        torch.tensor([t.noise_sigma for t in tasks], dtype=torch.float64).repeat_interleave(samples)
    diags = [t.normal_diagonal() for t in tasks]
    diag = None if any(d is None for d in diags) else torch.cat([d.expand(samples, *d.shape[1:]) for d in diags])
    gen = torch.Generator().manual_seed(seed)
    x, n = solve(prior, Problem(op, y, noise, diag), (len(tasks) * samples, 1, *first.shape), method,
                 steps=steps, sigma_data=prior.meta.sigma_data, sigma_min=prior.sigma_min,
                 sigma_max=prior.sigma_max, generator=gen, callback=progress,
                 cg_iters=policy.cg_iters(first.family, method) if cg_iters is None else cg_iters)
    seconds = (time.perf_counter() - t0) / len(tasks)
    out = []
    for i, task in enumerate(tasks):
        mag = task.image(x[i * samples: (i + 1) * samples].detach())
        std = mag.std(0, keepdim=True) if samples > 1 else None
        out.append(ReconResult(mag.mean(0, keepdim=True), std, mag[:, None], n, seconds))
    return out
