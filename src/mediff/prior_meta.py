"""The metadata of a trained prior: what its file says about the model and the data it learnt.

Every prior file (``mediff train``'s checkpoint.safetensors, prior.safetensors and resume.safetensors,
the shipped weights) embeds one JSON object in its safetensors header (:mod:`mediff.checkpoint`).
:class:`PriorMeta` is that object typed and checked once, where the file is read, so a file that
lacks a key or holds one of the wrong type fails at once with one clear MediffError rather than
with a KeyError deep inside sampling or reconstruction.

``PriorMeta.from_dict(d).to_dict()`` gives back ``d``, with its keys in the order mediff writes
them, for every file mediff writes: metadata read and written again (``attach_guide``,
``compact_checkpoint``) is unchanged. Keys this version does not know are kept in ``extra``.

Units: intensities are the prior's normalised units (``normalization``: 1 = the 99.5th percentile
of each MR slice, or u = (HU - hu_min) / (hu_max - hu_min) for CT); noise levels sigma are
standard deviations in those units.
"""

from __future__ import annotations

import copy
import reprlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor

from mediff.checkpoint import load_checkpoint
from mediff.errors import MediffError

FORMAT = "mediff-prior-v1"

_WHAT = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
         list: "a list"}


def _get(d: Mapping[str, Any], key: str, kind: type, where: str = "", nullable: bool = False) -> Any:
    """``d[key]``, checked to be of JSON type ``kind`` (float: any number; None too if ``nullable``)."""
    name = where + key
    if key not in d:
        raise MediffError(f"prior metadata lacks {name!r}")
    value = d[key]
    if value is None and nullable:
        return None
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and kind is not bool):
        null = " or null" if nullable else ""
        raise MediffError(f"prior metadata {name!r} must be {_WHAT[kind]}{null}, got {reprlib.repr(value)}")
    return copy.deepcopy(value) if isinstance(value, (dict, list)) else value


def _extra(d: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in d.items() if k not in known}


def crop_tile(patch_sizes: Sequence[int], full_prob: float) -> int | None:
    """The tile side of a network trained on crops of ``patch_sizes`` with whole images in a fraction
    ``full_prob`` of the steps: its largest crop when it never saw a whole image, else None."""
    return int(max(patch_sizes)) if patch_sizes and full_prob == 0.0 else None


def spacing_text(spacing: tuple[float, float]) -> str:
    """A (smallest, largest) pixel size in mm as text: one value when they agree to 3 digits, else a range."""
    lo, hi = (f"{v:.3g}" for v in spacing)
    return lo if lo == hi else f"{lo}-{hi}"


@dataclass(frozen=True)
class DataMeta:
    """The training data (key ``data``), recorded so a run can tell its own data from other data.

    source: the path the slices were read from, as given to ``mediff train``.
    fingerprint: a hash of the raw slices; resuming a run on data with another fingerprint is refused.
    n_train_slices, n_val_slices: slices of the training and of the held-out subjects.
    val_subjects: the held-out subjects (sorted ids), never seen in training: benchmarks and tests
        evaluate on them.
    pixel_spacing_mm: (smallest, largest) in-plane pixel size of the training slices on the prior's
        grid, in mm, or None when the data did not say (key absent): the scale at which the prior
        learnt anatomy, against which a scan's working-grid pixel is checked.
    extra: keys this version does not know, kept as read.
    """

    source: str
    fingerprint: str
    n_train_slices: int
    n_val_slices: int
    val_subjects: tuple[str, ...]
    pixel_spacing_mm: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("source", "fingerprint", "n_train_slices", "n_val_slices", "val_subjects", "pixel_spacing_mm")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataMeta":
        subjects = _get(d, "val_subjects", list, "data.")
        if not all(isinstance(s, str) for s in subjects):
            raise MediffError(f"prior metadata 'data.val_subjects' must be a list of strings, got "
                              f"{reprlib.repr(subjects)}")
        spacing = None
        if "pixel_spacing_mm" in d:
            sp = _get(d, "pixel_spacing_mm", list, "data.")
            if len(sp) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in sp) or sp[0] > sp[1]:
                raise MediffError(f"prior metadata 'data.pixel_spacing_mm' must be [smallest, largest] in mm, got "
                                  f"{reprlib.repr(sp)}")
            spacing = (float(sp[0]), float(sp[1]))
        return cls(_get(d, "source", str, "data."), _get(d, "fingerprint", str, "data."),
                   _get(d, "n_train_slices", int, "data."), _get(d, "n_val_slices", int, "data."),
                   tuple(subjects), spacing, _extra(d, cls._KEYS))

    def to_dict(self) -> dict[str, Any]:
        d = {"source": self.source, "fingerprint": self.fingerprint, "n_train_slices": self.n_train_slices,
             "n_val_slices": self.n_val_slices, "val_subjects": list(self.val_subjects)}
        if self.pixel_spacing_mm is not None:
            d["pixel_spacing_mm"] = list(self.pixel_spacing_mm)
        return {**d, **copy.deepcopy(self.extra)}


@dataclass(frozen=True)
class GuideMeta:
    """The autoguidance model a prior file may ship (key ``guide``; its weights are the ``guide.``
    tensors): a weaker model of the same data, e.g. an earlier checkpoint of the same run.

    Only what differs from the prior is stored; the data it models (image size, normalisation,
    covariates) are the prior's, checked equal when it is attached.
    net, sigma_data, data_mean, step, images_seen: as in :class:`PriorMeta`, of the guide model.
    weight: the default autoguidance weight w of D_guide + w (D - D_guide) (1 = the prior alone).
    extra: keys this version does not know, kept as read.
    """

    net: dict[str, Any]
    sigma_data: float
    data_mean: float
    step: int
    images_seen: int
    weight: float
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("net", "sigma_data", "data_mean", "step", "images_seen", "weight")

    @classmethod
    def from_prior(cls, meta: "PriorMeta", weight: float) -> "GuideMeta":
        """The guide record of the model described by ``meta``, with default weight ``weight``."""
        return cls(copy.deepcopy(meta.net), meta.sigma_data, meta.data_mean, meta.step, meta.images_seen, weight)

    def as_prior(self, prior: "PriorMeta") -> "PriorMeta":
        """This guide's metadata as a prior of its own: ``prior``'s (which ships it), with the
        guide's network, statistics and step."""
        return replace(prior, net=copy.deepcopy(self.net), sigma_data=self.sigma_data, data_mean=self.data_mean,
                       step=self.step, images_seen=self.images_seen, guide=None, coarse=None)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GuideMeta":
        return cls(_get(d, "net", dict, "guide."), _get(d, "sigma_data", float, "guide."),
                   _get(d, "data_mean", float, "guide."), _get(d, "step", int, "guide."),
                   _get(d, "images_seen", int, "guide."), _get(d, "weight", float, "guide."), _extra(d, cls._KEYS))

    def to_dict(self) -> dict[str, Any]:
        return {"net": copy.deepcopy(self.net), "sigma_data": self.sigma_data, "data_mean": self.data_mean,
                "step": self.step, "images_seen": self.images_seen, "weight": self.weight,
                **copy.deepcopy(self.extra)}


@dataclass(frozen=True)
class CoarseMeta:
    """The whole-image prior on a coarser grid that a prior file may ship (key ``coarse``; its
    weights are the ``coarse.`` tensors), for :class:`mediff.denoiser.TwoScale`: the coarse content of
    the prior's estimates at noise levels from ``from_sigma`` up.

    It models the same images (normalisation, covariates) at ``image_size`` = the prior's image size /
    an integer factor, checked when it is attached.
    net, sigma_data, data_mean, image_size, step, images_seen: as in :class:`PriorMeta`, of the coarse model.
    tile: its ``PriorMeta.tile`` (None: it saw whole images).
    from_sigma: the lowest noise level (normalised units, on the fine grid) at which it is used.
    extra: keys this version does not know, kept as read.
    """

    net: dict[str, Any]
    sigma_data: float
    data_mean: float
    image_size: int
    step: int
    images_seen: int
    tile: int | None
    from_sigma: float
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("net", "sigma_data", "data_mean", "image_size", "step", "images_seen", "tile", "from_sigma")

    @classmethod
    def from_prior(cls, meta: "PriorMeta", from_sigma: float) -> "CoarseMeta":
        """The coarse record of the model described by ``meta``, used from ``from_sigma`` up."""
        return cls(copy.deepcopy(meta.net), meta.sigma_data, meta.data_mean, meta.image_size, meta.step,
                   meta.images_seen, meta.tile, float(from_sigma))

    def factor(self, prior: "PriorMeta") -> int:
        """How many times finer ``prior``'s grid is than this model's."""
        return prior.image_size // self.image_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CoarseMeta":
        return cls(_get(d, "net", dict, "coarse."), _get(d, "sigma_data", float, "coarse."),
                   _get(d, "data_mean", float, "coarse."), _get(d, "image_size", int, "coarse."),
                   _get(d, "step", int, "coarse."), _get(d, "images_seen", int, "coarse."),
                   _get(d, "tile", int, "coarse.", nullable=True), _get(d, "from_sigma", float, "coarse."),
                   _extra(d, cls._KEYS))

    def to_dict(self) -> dict[str, Any]:
        return {"net": copy.deepcopy(self.net), "sigma_data": self.sigma_data, "data_mean": self.data_mean,
                "image_size": self.image_size, "step": self.step, "images_seen": self.images_seen, "tile": self.tile,
                "from_sigma": self.from_sigma, **copy.deepcopy(self.extra)}


@dataclass(frozen=True)
class PriorMeta:
    """The metadata of a prior file (format ``mediff-prior-v1``, written by :mod:`mediff.train`).

    kind: the parametrisation of the denoiser ("edm": Karras et al. 2022 preconditioning).
    net: the network's architecture, ``UNetConfig.to_dict()`` as stored (a file written before a
        field was added lacks it; ``UNetConfig.from_dict`` gives it its default).
    sigma_data: standard deviation of the training images (normalised units): EDM's preconditioning
        and loss weighting are built around it.
    data_mean: mean of the training images (normalised units): the denoiser works on x - data_mean.
    sigma_min, sigma_max: the noise levels (normalised units) a sampler's schedule spans, from
        ``edm_sigma_range(sigma_data)``.
    image_size: side of the square images the network was trained on, in pixels.
    normalization: how input intensities became normalised units: {"kind": "percentile",
        "percentile": 99.5} (per slice) or an ``units.Normalization.to_dict()`` record ("hu_window": a
        fixed HU window, so results map back to HU exactly).
    covariates: the covariate encoding of a conditional prior ({"columns": {name: encoding},
        "dim": K}, ``mediff.data.covariate_spec``), or None for an unconditional one.
    data: the training data (:class:`DataMeta`).
    train: the run's ``TrainConfig`` as a dict: ``--resume`` checks the settings match.
    step: optimiser steps taken; images_seen: training images drawn (batch x steps).
    wall_seconds: time spent in training steps, in seconds (0.1 s resolution; validation and
        checkpointing excluded).
    torch_version: the torch version that trained it (key ``torch``).
    compact: True for a compact resumable state (``train.compact_checkpoint``: 16-bit weights, no
        Adam first moments, so resuming is not bit-exact); the key is written only when true.
    guide: the autoguidance model the file ships (:class:`GuideMeta`), or None.
    coarse: the coarser whole-image model the file ships (:class:`CoarseMeta`), or None.
    extra: keys this version does not know, kept as read and written back after the known ones.
    """

    kind: str
    net: dict[str, Any]
    sigma_data: float
    data_mean: float
    sigma_min: float
    sigma_max: float
    image_size: int
    normalization: dict[str, Any]
    covariates: dict[str, Any] | None
    data: DataMeta
    train: dict[str, Any]
    step: int
    images_seen: int
    wall_seconds: float
    torch_version: str
    compact: bool = False
    guide: GuideMeta | None = None
    coarse: CoarseMeta | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("format", "kind", "net", "sigma_data", "data_mean", "sigma_min", "sigma_max", "image_size",
             "normalization", "covariates", "data", "train", "step", "images_seen", "wall_seconds", "torch",
             "compact", "guide", "coarse")

    @property
    def is_hu(self) -> bool:
        """Whether the prior works in a HU window (a CT prior): its inputs and results are in HU."""
        return self.normalization["kind"] == "hu_window"

    @property
    def tile(self) -> int | None:
        """The tile side at which a prior trained on crops only (patch sizes, no whole-image steps)
        denoises larger images (``EDMPrecond.tile``: its largest crop), or None."""
        return crop_tile(self.train.get("patch_sizes") or (), float(self.train.get("full_prob", 1.0)))

    def data_mismatch(self, other: "PriorMeta") -> str | None:
        """The first of image_size, normalization, covariates where ``other`` models other images
        than this (a guide must model the same data), or None."""
        for name, mine, theirs in (("image_size", self.image_size, other.image_size),
                                   ("normalization", self.normalization, other.normalization),
                                   ("covariates", self.covariates, other.covariates)):
            if mine != theirs:
                return name
        return None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PriorMeta":
        """Check and type the JSON metadata ``d``; MediffError (one line) naming a key that is
        missing or of the wrong type, or if ``d`` is not a mediff prior's metadata."""
        if not isinstance(d, Mapping):
            raise MediffError(f"prior metadata must be a JSON object, got {reprlib.repr(d)}")
        if d.get("format") != FORMAT:
            raise MediffError(f"not a mediff prior (format {d.get('format')!r})")
        normalization = _get(d, "normalization", dict)
        _get(normalization, "kind", str, "normalization.")
        guide = None if "guide" not in d else GuideMeta.from_dict(_get(d, "guide", dict))
        coarse = None if "coarse" not in d else CoarseMeta.from_dict(_get(d, "coarse", dict))
        return cls(
            kind=_get(d, "kind", str), net=_get(d, "net", dict), sigma_data=_get(d, "sigma_data", float),
            data_mean=_get(d, "data_mean", float), sigma_min=_get(d, "sigma_min", float),
            sigma_max=_get(d, "sigma_max", float), image_size=_get(d, "image_size", int),
            normalization=normalization, covariates=_get(d, "covariates", dict, nullable=True),
            data=DataMeta.from_dict(_get(d, "data", dict)), train=_get(d, "train", dict), step=_get(d, "step", int),
            images_seen=_get(d, "images_seen", int), wall_seconds=_get(d, "wall_seconds", float),
            torch_version=_get(d, "torch", str), compact="compact" in d and _get(d, "compact", bool),
            guide=guide, coarse=coarse, extra=_extra(d, cls._KEYS))

    def to_dict(self) -> dict[str, Any]:
        """The JSON metadata (a new dict, sharing nothing with this object)."""
        d = {"format": FORMAT, "kind": self.kind, "net": copy.deepcopy(self.net), "sigma_data": self.sigma_data,
             "data_mean": self.data_mean, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
             "image_size": self.image_size, "normalization": copy.deepcopy(self.normalization),
             "covariates": copy.deepcopy(self.covariates), "data": self.data.to_dict(),
             "train": copy.deepcopy(self.train), "step": self.step, "images_seen": self.images_seen,
             "wall_seconds": self.wall_seconds, "torch": self.torch_version}
        if self.compact:
            d["compact"] = True
        if self.guide is not None:
            d["guide"] = self.guide.to_dict()
        if self.coarse is not None:
            d["coarse"] = self.coarse.to_dict()
        return {**d, **copy.deepcopy(self.extra)}


def read_prior_file(path: Path) -> tuple[dict[str, Tensor], PriorMeta]:
    """Tensors and metadata of a prior file or training checkpoint; MediffError naming ``path`` if
    it is not one or its metadata is incomplete."""
    tensors, meta = load_checkpoint(path)
    try:
        return tensors, PriorMeta.from_dict(meta)
    except MediffError as exc:
        raise MediffError(f"{path}: {exc}") from None
