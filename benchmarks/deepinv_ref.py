"""deepinv's DPS with our prior wrapped: an external reference for benchmarks/mri.py (optional).

deepinv 0.5.0 declares torchvision a dependency and imports it at package import (``import torchvision``
in deepinv/__init__.py, plus transforms/datasets/plotting modules), but its DPS sampler, SDEs and
physics never call it. torchvision cannot be installed here (its PyPI wheels pull a CUDA torch), so
``import_deepinv`` puts placeholder ``torchvision`` modules on the import path when the real one is
missing: every name imports, and calling any of them raises. Install the extra without dependencies:

    make bench-deps   # pip install --no-deps deepinv==0.5.0 torchmetrics lightning-utilities tqdm natsort

Nothing of deepinv is vendored; the benchmark only calls its public API.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import time
import types

import torch
from torch import Tensor



class _Missing:
    """Stands for any torchvision attribute; using it says why it is missing."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Missing":
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} needs torchvision, which is not installed")

    def __mro_entries__(self, bases: tuple) -> tuple:  # `class X(torchvision.Y)` still defines X
        return (object,)


class _MissingModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _MissingModule(spec.name)

    def exec_module(self, module) -> None:
        module.__path__ = []


def import_deepinv():
    """Import deepinv, with placeholder torchvision modules if torchvision is absent."""
    if importlib.util.find_spec("deepinv") is None:
        raise SystemExit("deepinv is not installed: run `make bench-deps` (pip install --no-deps deepinv==0.5.0 ...)")
    if importlib.util.find_spec("torchvision") is None and not any(
            isinstance(f, _TorchvisionPlaceholder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionPlaceholder())
    import deepinv

    return deepinv


class _PriorAsDeepinvDenoiser(torch.nn.Module):
    """Our prior as a deepinv denoiser: forward(x, sigma) on [0, 1] images, sigma scalar or (B,)."""

    def __init__(self, prior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return self.prior(x, s)


def deepinv_dps(task, prior, steps: int = 1000, seed: int = 0, weight: float = 1.0) -> tuple[Tensor, int, float]:
    """deepinv's DPS (its defaults: VP schedule, DDPM solver, weight 1, residual-norm guidance) with
    ``steps`` steps on a mediff ``Task``. Returns (image (1, 1, H, W) in normalised units, NFE, seconds).

    The prior's normalised units (1 = the 99.5th percentile) are deepinv's [0, 1] image range; our
    operator (with the task's low-resolution phase for MRI) is deepinv's ``LinearPhysics``.
    """
    dinv = import_deepinv()
    op, y = task.solver_operator(), task.data()[1]
    physics = dinv.physics.LinearPhysics(A=op.A, A_adjoint=op.AH)
    model = dinv.sampling.DPS(_PriorAsDeepinvDenoiser(prior), num_steps=steps, weight=weight,
                              rng=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    x = model(y, physics, x_init=(1, 1, *task.shape), seed=seed)
    return x.detach().float(), steps, time.perf_counter() - t0
