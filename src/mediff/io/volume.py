"""Splitting a 3D image into 2D slices and stacking slices back, each with its own affine."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mediff.errors import MediffError
from mediff.io.image import MedicalImage


def volume_to_slices(img: MedicalImage, axis: int = 2) -> list[MedicalImage]:
    """Split a 3D image into 2D slices along ``axis`` (0, 1 or 2).

    Slice k has array ``np.take(img.array, k, axis)`` with the remaining axes in their original order
    (u, v), and affine ``A_k = A @ P @ T_k``: columns (u step, v step, axis step, world of voxel
    with index k on ``axis`` and 0 elsewhere). So ``A_k @ (u, v, 0, 1) == A @ (volume voxel)``.
    """
    if img.array.ndim != 3:
        raise MediffError(f"volume_to_slices needs a 3D image, got shape {img.array.shape}")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise MediffError(f"axis must be 0, 1 or 2, got {axis}")
    axis %= 3
    inplane = [a for a in range(3) if a != axis]
    out = []
    for k in range(img.array.shape[axis]):
        aff = np.eye(4)
        aff[:3, 0] = img.affine[:3, inplane[0]]
        aff[:3, 1] = img.affine[:3, inplane[1]]
        aff[:3, 2] = img.affine[:3, axis]
        aff[:3, 3] = img.affine[:3, 3] + k * img.affine[:3, axis]
        meta = dict(img.meta, slice_index=k, slice_axis=axis)
        spacing = (img.spacing[inplane[0]], img.spacing[inplane[1]]) if len(img.spacing) >= 3 else ()
        out.append(MedicalImage(np.take(img.array, k, axis=axis), aff, spacing, img.modality, meta))
    return out


def slices_to_volume(slices: Sequence[MedicalImage], axis: int = 2) -> MedicalImage:
    """Inverse of :func:`volume_to_slices`: stack 2D slices along ``axis``.

    The volume's affine comes from the first slice; slices must be evenly spaced along a line
    (tolerance 1e-3 mm) and share in-plane axes, else MediffError.
    """
    if not slices:
        raise MediffError("slices_to_volume needs at least one slice")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise MediffError(f"axis must be 0, 1 or 2, got {axis}")
    axis %= 3
    shapes = {s.array.shape for s in slices}
    if len(shapes) != 1 or slices[0].array.ndim != 2:
        raise MediffError(f"slices must be 2D and of one shape, got {sorted(shapes)}")
    first = slices[0].affine
    n = len(slices)
    step = (slices[-1].affine[:3, 3] - first[:3, 3]) / (n - 1) if n > 1 else first[:3, 2]
    for k, s in enumerate(slices):
        if not np.allclose(s.affine[:3, :2], first[:3, :2], atol=1e-5) or not np.allclose(
            s.affine[:3, 3], first[:3, 3] + k * step, atol=1e-3
        ):
            raise MediffError(f"slice {k} is not on the evenly spaced stack defined by the first and last slice")
    inplane = [a for a in range(3) if a != axis]
    aff = np.eye(4)
    aff[:3, inplane[0]] = first[:3, 0]
    aff[:3, inplane[1]] = first[:3, 1]
    aff[:3, axis] = step
    aff[:3, 3] = first[:3, 3]
    meta = {k: v for k, v in slices[0].meta.items() if k not in ("slice_index", "slice_axis")}
    return MedicalImage(np.stack([s.array for s in slices], axis=axis), aff, (), slices[0].modality, meta)
