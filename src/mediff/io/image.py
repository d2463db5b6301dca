"""The image container (:class:`MedicalImage`) and the helpers every reader and writer shares: paths,
affines of formats without geometry, and the exceptions that mean "bad input"."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mediff.errors import MediffError

PathLike = str | os.PathLike


@dataclass
class MedicalImage:
    """An image with its geometry.

    array: pixel/voxel values, spatial axes first in the order of the affine's voxel index
        (see the ``mediff.io`` docstring); physical units (HU for CT) unless read with ``raw=True``.
    affine: (4, 4) float64, voxel index -> world mm, RAS+.
    spacing: voxel size in mm per spatial axis.
    modality: DICOM-style modality ("MR", "CT", ...) or None when unknown.
    meta: free-form, JSON-friendly details (source, format, axes, rescale, series UID, ...).
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    spacing: tuple[float, ...] = ()
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise MediffError(f"affine must be 4x4, got shape {self.affine.shape}")
        if not self.spacing:
            # Column norms of the affine are the voxel sizes; 2D arrays use the first two.
            n = min(self.array.ndim, 3)
            self.spacing = tuple(float(v) for v in np.linalg.norm(self.affine[:3, :n], axis=0))
        self.spacing = tuple(float(s) for s in self.spacing)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def ndim(self) -> int:
        return self.array.ndim


def affine_from_spacing(spacing: Sequence[float]) -> np.ndarray:
    """Axis-aligned affine with the given voxel sizes (mm) and origin 0, for formats without geometry."""
    aff = np.eye(4)
    for i, s in enumerate(list(spacing)[:3]):
        aff[i, i] = float(s)
    return aff


def as_path(path: PathLike) -> Path:
    """``path`` as a Path, ``~`` expanded."""
    return Path(os.fspath(path)).expanduser()


def path_suffix(path: Path) -> str:
    """The lower-case extension that names the format; ``.nii.gz`` counts as one."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def unpack_image(
    image: np.ndarray | MedicalImage, affine: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, MedicalImage | None]:
    """A writer's input as (array, affine or None, the MedicalImage or None); ``affine`` overrides the image's."""
    if isinstance(image, MedicalImage):
        return image.array, (image.affine if affine is None else np.asarray(affine, dtype=np.float64)), image
    return np.asarray(image), (None if affine is None else np.asarray(affine, dtype=np.float64)), None


def check_affine(affine: np.ndarray | None, path: Path) -> None:
    """MediffError unless ``affine`` is None or a finite 4x4 matrix."""
    if affine is not None and (affine.shape != (4, 4) or not np.all(np.isfinite(affine))):
        raise MediffError(f"affine for {path} must be a finite 4x4 matrix, got shape {affine.shape}")


# Exceptions that third-party readers raise on malformed input. Caught around *reading* only and
# re-raised as MediffError; programming errors elsewhere still surface normally.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes gzip.BadGzipFile, FileNotFoundError, PermissionError
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    struct.error,
    zlib.error,
    RuntimeError,  # pydicom: no handler for a compressed transfer syntax
    NotImplementedError,
)


def read_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean malformed input: the built-in ones above plus the readers' own
    (imported lazily: the libraries are heavy to import)."""
    extra: list[type[BaseException]] = []
    try:
        from nibabel.filebasedimages import ImageFileError

        extra.append(ImageFileError)
    except ImportError:  # pragma: no cover - nibabel is a dependency
        pass
    try:
        from pydicom.errors import InvalidDicomError

        extra.append(InvalidDicomError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from PIL import UnidentifiedImageError

        extra.append(UnidentifiedImageError)
    except ImportError:  # pragma: no cover
        pass
    return _READ_ERRORS + tuple(extra)
