"""Trained priors: load a checkpoint (a built-in name or a path) as a ready denoiser.

A prior works in normalised intensity units: 0 stays 0 and 1 is the image's 99.5th percentile for
MR (``normalization.kind == "percentile"``), or a fixed HU window for CT. ``normalize`` returns the
parameters it used so ``denormalize`` brings results back to the input's units.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mediff.checkpoint import load_checkpoint, split_prefix
from mediff.data import encode_row
from mediff.denoiser import EDMPrecond
from mediff.errors import MediffError
from mediff.io import Normalization, normalize
from mediff.nets import LeanUNet, UNetConfig


def builtin_priors() -> dict[str, Path]:
    """Names of the priors shipped inside the package and their files."""
    folder = resources.files("mediff") / "weights"
    if not folder.is_dir():
        return {}
    return {p.name[: -len(".safetensors")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".safetensors")}


class Prior:
    """A trained denoiser D(x, sigma[, cond]) with its metadata; callable as a ``Denoiser``."""

    def __init__(self, model: EDMPrecond, meta: dict, name: str) -> None:
        self.model, self.meta, self.name = model.eval().requires_grad_(False), meta, name

    @property
    def sigma_min(self) -> float:
        return float(self.meta["sigma_min"])

    @property
    def sigma_max(self) -> float:
        return float(self.meta["sigma_max"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """E[x0 | x] for x (B, 1, H, W) in normalised units and sigma (B,). Differentiable in x."""
        return self.model(x, sigma.to(x.device), cond)

    __call__ = denoise

    def normalize(self, image: np.ndarray | Tensor) -> tuple[Tensor, Normalization]:
        """Image in input units -> (tensor in the prior's units, the Normalization used)."""
        arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
        spec = self.meta["normalization"]
        if spec["kind"] == "percentile":
            x, norm = normalize(arr, "percentile", percentile=spec["percentile"])
        else:
            norm = Normalization.from_dict(spec)
            x = norm.apply(arr.astype(np.float32))
        return torch.as_tensor(np.asarray(x, dtype=np.float32)), norm

    @staticmethod
    def denormalize(x: Tensor, norm: Normalization) -> Tensor:
        """Back to the input's units."""
        return norm.invert(x)

    def covariates(self, n: int = 1, **values: object) -> Tensor | None:
        """Covariate vectors (n, K) for conditional sampling, e.g. ``covariates(4, Age=60, Sex="F")``;
        None for an unconditional prior. Unknown names raise MediffError."""
        spec = self.meta.get("covariates")
        if spec is None:
            if values:
                raise MediffError(f"prior {self.name} is unconditional: it takes no covariates")
            return None
        unknown = set(values) - set(spec["columns"])
        if unknown:
            raise MediffError(f"unknown covariate(s) {', '.join(sorted(unknown))}; "
                              f"this prior knows {', '.join(spec['columns'])}")
        row = encode_row({k: str(v) for k, v in values.items()}, spec) if values else np.zeros(spec["dim"], np.float32)
        return torch.from_numpy(row).expand(n, -1).clone().to(self.device)

    def to(self, device: torch.device | str) -> "Prior":
        self.model.to(device)
        return self


def load_prior(name_or_path: str | Path, device: torch.device | str = "cpu") -> Prior:
    """Load a built-in prior by name (``brain-t1``) or any mediff checkpoint path.

    Training checkpoints (``checkpoint.safetensors``) load their EMA weights.
    """
    builtin = builtin_priors()
    path = builtin.get(str(name_or_path), Path(name_or_path))
    if not path.exists():
        names = ", ".join(sorted(builtin)) or "none installed"
        raise MediffError(f"no prior {name_or_path!r}: not a file and not a built-in prior ({names})")
    tensors, meta = load_checkpoint(path)
    if meta.get("format") != "mediff-prior-v1":
        raise MediffError(f"{path} is not a mediff prior (format {meta.get('format')!r})")
    state = split_prefix(tensors, "ema") or tensors
    model = EDMPrecond(LeanUNet(UNetConfig.from_dict(meta["net"])), meta["sigma_data"], meta["data_mean"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    name = str(name_or_path) if str(name_or_path) in builtin else path.stem
    return Prior(model, meta, name).to(device)
