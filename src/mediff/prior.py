"""Trained priors: load a checkpoint (a built-in name or a path) as a ready denoiser.

A prior works in normalised intensity units: 0 stays 0 and 1 is the image's 99.5th percentile for
MR (``normalization.kind == "percentile"``), or a fixed HU window for CT. ``normalize`` returns the
parameters it used so ``denormalize`` brings results back to the input's units.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mediff.checkpoint import prefixed, save_checkpoint, split_prefix
from mediff.data import encode_row
from mediff.denoiser import AutoGuidedDenoiser, CFGDenoiser, Denoiser, EDMPrecond, TwoScale
from mediff.errors import MediffError
from mediff.nets import LeanUNet, UNetConfig
from mediff.prior_meta import CoarseMeta, GuideMeta, PriorMeta, read_prior_file
from mediff.units import Normalization, normalize


def builtin_priors() -> dict[str, Path]:
    """Names of the priors shipped inside the package and their files."""
    folder = resources.files("mediff") / "weights"
    if not folder.is_dir():
        return {}
    return {p.name[: -len(".safetensors")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".safetensors")}


class Prior:
    """A trained denoiser D(x, sigma[, cond]) with its metadata; callable as a ``Denoiser``.

    ``guide``, if the file ships one, is a weaker version of the same model for autoguidance
    (:class:`mediff.denoiser.AutoGuidedDenoiser`); ``meta.guide.weight`` is its default weight.
    Reconstruction uses the prior alone. ``model`` is the preconditioned network, or a
    :class:`mediff.denoiser.TwoScale` of it and the coarse model the file ships (``meta.coarse``).
    """

    def __init__(self, model: nn.Module, meta: PriorMeta, name: str, guide: "Prior | None" = None) -> None:
        self.model, self.meta, self.name = model.eval().requires_grad_(False), meta, name
        self.guide = guide

    @property
    def sigma_min(self) -> float:
        return float(self.meta.sigma_min)

    @property
    def sigma_max(self) -> float:
        return float(self.meta.sigma_max)

    @property
    def image_size(self) -> int:
        return self.meta.image_size

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
        spec = self.meta.normalization
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
        spec = self.meta.covariates
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
        if self.guide is not None:
            self.guide.to(device)
        return self

    def check_guide(self, guide: "Prior") -> None:
        """MediffError unless ``guide`` models the same images (size, normalisation, covariates)."""
        _check_same_data(self.meta, guide.meta, self.name, guide.name)

    def autoguided(self, weight: float | None = None, guide: "Prior | None" = None,
                   cond: Tensor | None = None, guidance: float = 1.0) -> tuple[Denoiser, float]:
        """This prior as the denoiser to sample, guided by ``guide`` (default: the shipped one) with
        ``weight`` (default: the shipped weight; 1 = no autoguidance), each side conditioned on
        ``cond`` (n, K) with classifier-free guidance ``guidance``. Returns (denoiser, weight used)."""
        guide = guide or self.guide
        if weight is None:
            weight = float(self.meta.guide.weight) if guide is not None and guide is self.guide else 1.0
        good = _conditioned(self, cond, guidance)
        if weight == 1.0:
            return good, 1.0
        if guide is None:
            raise MediffError(f"prior {self.name} ships no guide model: autoguidance needs --guide NAME|PATH "
                              "(a weaker version of it, e.g. an earlier checkpoint of the same run)")
        self.check_guide(guide)
        return AutoGuidedDenoiser(good, _conditioned(guide, cond, guidance), weight), weight


def _check_same_data(meta: PriorMeta, guide_meta: PriorMeta, name: str, guide_name: str, what: str = "guide") -> None:
    if key := meta.data_mismatch(guide_meta):
        why = "a guide is a weaker model of the same data" if what == "guide" else "it models the same images"
        raise MediffError(f"{what} {guide_name} does not match prior {name}: different {key} ({why})")


def _conditioned(prior: Prior, cond: Tensor | None, guidance: float) -> Denoiser:
    return prior if cond is None else CFGDenoiser(prior.model, cond.to(prior.device), guidance)


PARTS = ("guide", "coarse")  # the other models a prior file may ship, under these tensor prefixes


def _weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's weights in a prior file (none of its PARTS) or a training checkpoint (its EMA)."""
    return split_prefix(tensors, "ema") or {k: v for k, v in tensors.items()
                                            if not k.startswith(tuple(f"{p}." for p in PARTS))}


def _with_part(prior: dict[str, Tensor], part: str, model: dict[str, Tensor]) -> dict[str, Tensor]:
    """A prior file's tensors with its ``part`` (one of PARTS) set to ``model``'s weights (a prior file or
    checkpoint); the prior's other parts are kept."""
    others = tuple(f"{p}." for p in PARTS if p != part)
    return {**_weights(prior), **{k: v for k, v in prior.items() if k.startswith(others)},
            **prefixed(_weights(model), part)}


def _build(state: dict[str, Tensor], meta: PriorMeta | CoarseMeta) -> EDMPrecond:
    cfg = UNetConfig.from_dict(meta.net)
    model = EDMPrecond(LeanUNet(cfg), meta.sigma_data, meta.data_mean, tile=meta.tile, tile_multiple=cfg.multiple)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model


def _model(tensors: dict[str, Tensor], meta: PriorMeta) -> nn.Module:
    """The prior's denoising network, two-scale if the file ships a coarse model."""
    fine = _build(_weights(tensors), meta)
    if meta.coarse is None:
        return fine
    return TwoScale(fine, _build(split_prefix(tensors, "coarse"), meta.coarse), meta.coarse.factor(meta),
                    meta.coarse.from_sigma)


def _resolve(name_or_path: str | Path) -> tuple[Path, dict[str, Path]]:
    builtin = builtin_priors()
    path = builtin.get(str(name_or_path), Path(name_or_path))
    if not path.exists():
        names = ", ".join(sorted(builtin)) or "none installed"
        raise MediffError(f"no prior {name_or_path!r}: not a file and not a built-in prior ({names})")
    return path, builtin


def load_prior(name_or_path: str | Path, device: torch.device | str = "cpu") -> Prior:
    """Load a built-in prior by name (``brain-t1``) or any mediff checkpoint path, with its guide
    model if the file ships one.

    Training checkpoints (``checkpoint.safetensors``) load their EMA weights.
    """
    path, builtin = _resolve(name_or_path)
    tensors, meta = read_prior_file(path)
    name = str(name_or_path) if str(name_or_path) in builtin else path.stem
    guide = None
    if meta.guide is not None:
        gmeta = meta.guide.as_prior(meta)
        guide = Prior(_build(split_prefix(tensors, "guide"), gmeta), gmeta, f"{name}:guide@{gmeta.step}")
    return Prior(_model(tensors, meta), meta, name, guide).to(device)


def attach_guide(prior: str | Path, guide: str | Path, weight: float, out: Path) -> None:
    """Write ``out``: ``prior``'s weights with ``guide``'s as its autoguidance model and ``weight``
    as the default guidance weight (both files are priors or training checkpoints of the same data;
    tensors keep their stored dtypes)."""
    (p_path, _), (g_path, _) = _resolve(prior), _resolve(guide)
    (p_tensors, meta), (g_tensors, g_meta) = read_prior_file(p_path), read_prior_file(g_path)
    _check_same_data(meta, g_meta, p_path.stem, g_path.stem)
    meta = replace(meta, guide=GuideMeta.from_prior(g_meta, float(weight)))
    save_checkpoint(out, _with_part(p_tensors, "guide", g_tensors), meta.to_dict())


def attach_coarse(prior: str | Path, coarse: str | Path, from_sigma: float, out: Path) -> None:
    """Write ``out``: ``prior``'s weights (and its guide, if any) with ``coarse``'s as its coarse
    whole-image model (:class:`mediff.denoiser.TwoScale`), used at noise levels >= ``from_sigma``.
    ``coarse`` models the same images (normalisation, covariates) on a grid an integer factor >= 2
    coarser (e.g. the 128-px ``ct`` for the 512-px ``ct-native``); MediffError otherwise."""
    (p_path, _), (c_path, _) = _resolve(prior), _resolve(coarse)
    (p_tensors, meta), (c_tensors, c_meta) = read_prior_file(p_path), read_prior_file(c_path)
    if c_meta.coarse is not None:
        raise MediffError(f"coarse model {c_path.stem} ships a coarse model of its own: attach a single-scale prior")
    factor = meta.image_size // c_meta.image_size
    if factor < 2 or factor * c_meta.image_size != meta.image_size:
        raise MediffError(f"coarse model {c_path.stem} ({c_meta.image_size} px) is not an integer factor >= 2 coarser "
                          f"than prior {p_path.stem} ({meta.image_size} px)")
    _check_same_data(meta, replace(c_meta, image_size=meta.image_size), p_path.stem, c_path.stem, "coarse model")
    if not from_sigma > 0:
        raise MediffError(f"from_sigma must be > 0, got {from_sigma}")
    meta = replace(meta, coarse=CoarseMeta.from_prior(c_meta, from_sigma))
    save_checkpoint(out, _with_part(p_tensors, "coarse", c_tensors), meta.to_dict())

