"""Intensity normalisation: a recorded, invertible affine map from physical units (HU, MR signal) to
the roughly [0, 1] range the priors work in, and back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from mediff.errors import MediffError, one_line

__all__ = ["Normalization", "normalize"]

_NORM_KINDS = ("percentile", "minmax", "hu_window", "identity")


@dataclass(frozen=True)
class Normalization:
    """A recorded affine intensity map ``y = (x - offset) / scale`` (then optional clip to ``clip``).

    kind: how offset/scale were chosen ("percentile", "minmax", "hu_window", "identity").
    offset, scale: in input units (e.g. HU); ``invert`` returns to them exactly when unclipped.
    clip: (lo, hi) in normalised units or None (default: no clipping, fully invertible).
    params: how it was computed (e.g. {"percentile": 99.5, "value": 812.0}).
    Works on numpy arrays and torch tensors alike (plain arithmetic and ``.clip``).
    """

    kind: str
    offset: float
    scale: float
    clip: tuple[float, float] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _NORM_KINDS:
            raise MediffError(f"unknown normalisation kind {self.kind!r} (expected one of {', '.join(_NORM_KINDS)})")
        if not (math.isfinite(self.scale) and self.scale != 0 and math.isfinite(self.offset)):
            raise MediffError(f"normalisation needs finite offset and non-zero scale, got {self.offset}, {self.scale}")

    def apply(self, x: Any) -> Any:
        """Input units -> normalised units. numpy in -> float32 out."""
        if isinstance(x, np.ndarray) or np.isscalar(x):
            x = np.asarray(x, dtype=np.float32)
        y = (x - self.offset) / self.scale
        return y.clip(*self.clip) if self.clip is not None else y

    def invert(self, y: Any) -> Any:
        """Normalised units -> input units (exact inverse of ``apply`` where nothing was clipped)."""
        if isinstance(y, np.ndarray) or np.isscalar(y):
            y = np.asarray(y, dtype=np.float32)
        return y * self.scale + self.offset

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "kind": self.kind,
            "offset": float(self.offset),
            "scale": float(self.scale),
            "clip": None if self.clip is None else [float(self.clip[0]), float(self.clip[1])],
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalization":
        try:
            clip = d.get("clip")
            return cls(
                kind=str(d["kind"]),
                offset=float(d["offset"]),
                scale=float(d["scale"]),
                clip=None if clip is None else (float(clip[0]), float(clip[1])),
                params=dict(d.get("params") or {}),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MediffError(f"invalid normalisation record {dict(d)!r}: {one_line(exc)}") from exc


def normalize(
    array: np.ndarray,
    kind: str | None = None,
    *,
    modality: str | None = None,
    percentile: float = 99.5,
    hu_min: float = -1000.0,
    hu_max: float = 1000.0,
    clip: tuple[float, float] | None = None,
) -> tuple[np.ndarray, Normalization]:
    """Map intensities to roughly [0, 1] and record the map.

    kind default: "hu_window" for modality CT, else "percentile".
      percentile: 0 -> 0, the ``percentile``-th percentile of the finite values -> 1 (top not clipped).
      minmax: min -> 0, max -> 1.
      hu_window: hu_min -> 0, hu_max -> 1 (fixed; default (HU + 1000) / 2000).
    Returns (float32 array, Normalization); ``norm.invert(out)`` gives back ``array``.
    """
    if kind is None:
        kind = "hu_window" if (modality or "").upper() == "CT" else "percentile"
    x = np.asarray(array)
    if np.iscomplexobj(x):
        raise MediffError("normalize needs real-valued data (take np.abs first)")
    finite = x[np.isfinite(x)] if x.dtype.kind == "f" else x.ravel()
    if kind == "percentile":
        value = float(np.percentile(finite, percentile)) if finite.size else 0.0
        scale = value
        if scale <= 0:
            # Mostly-zero images (masks, background-heavy slices): fall back to the max, then 1.
            scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        norm = Normalization("percentile", 0.0, scale, clip, {"percentile": float(percentile), "value": value})
    elif kind == "minmax":
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalization("minmax", lo, (hi - lo) if hi > lo else 1.0, clip, {"min": lo, "max": hi})
    elif kind == "hu_window":
        if not hu_max > hu_min:
            raise MediffError(f"hu_max must exceed hu_min, got {hu_min}, {hu_max}")
        norm = Normalization(
            "hu_window", float(hu_min), float(hu_max - hu_min), clip, {"hu_min": float(hu_min), "hu_max": float(hu_max)}
        )
    elif kind == "identity":
        norm = Normalization("identity", 0.0, 1.0, clip)
    else:
        raise MediffError(f"unknown normalisation kind {kind!r} (expected one of {', '.join(_NORM_KINDS)})")
    return norm.apply(x), norm
