"""From the input's grid to the working grid of a prior and back: slice picking in a volume and
2D resampling. Users read results on their own grid, so every map here comes with its inverse."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mediff import io
from mediff.errors import MediffError

# Training slices are axial cuts of volumes in P-S-R voxel order (rows posterior, columns right), as
# in the IXI data; volumes are reoriented to that order so a prior sees anatomy the way it learnt it.
SLICE_ORIENTATION = ("P", "S", "R")

GridMap = Callable[[np.ndarray], np.ndarray]


def fit_to_grid(image: np.ndarray, size: int) -> tuple[np.ndarray, GridMap, str | None]:
    """Resample a 2D image (H, W) onto a size x size grid (area downsampling, centred zero pad).

    Returns (image (size, size), the map of a working-grid image back onto (H, W), a note for the
    user or None when the grid already fits)."""
    h, w = image.shape
    if (h, w) == (size, size):
        return image, lambda a: a, None
    f = min(1.0, size / max(h, w))
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    small = F.interpolate(t, size=(nh, nw), mode="area") if f < 1 else t
    top, left = (size - nh) // 2, (size - nw) // 2
    out = F.pad(small, (left, size - nw - left, top, size - nh - top))[0, 0].numpy()

    def back(a: np.ndarray) -> np.ndarray:
        crop = torch.from_numpy(np.ascontiguousarray(a[top: top + nh, left: left + nw], dtype=np.float32))[None, None]
        return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy() if f < 1 else \
            crop[0, 0].numpy()

    note = f"image {h}x{w} resampled to the prior's {size}x{size} grid" + (" (area downsampling)" if f < 1 else "") + \
        " and back for the output"
    return out, back, note


def pick_slice(img: io.MedicalImage, slice_index: int | None, orientation: tuple[str, str, str] = SLICE_ORIENTATION,
               axis: int = 1) -> tuple[np.ndarray, np.ndarray, str | None]:
    """A 2D image as is, or the slice ``slice_index`` (default: middle) along ``axis`` of a volume
    reoriented to ``orientation`` (MRI: P-S-R, axis 1; CT: P-L-S, axis 2).

    Returns (slice (H, W) float32 magnitude, its 4x4 affine, a note or None)."""
    import nibabel.orientations as nio

    arr = np.asarray(img.array)
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    if arr.ndim == 2:
        return arr.astype(np.float32), img.affine, None
    if arr.ndim != 3:
        raise MediffError(f"expected a 2D image or 3D volume, got shape {arr.shape}")
    transform = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(orientation))
    vol = nio.apply_orientation(arr, transform)
    affine = img.affine @ nio.inv_ornt_aff(transform, arr.shape)
    k = vol.shape[axis] // 2 if slice_index is None else slice_index
    if not 0 <= k < vol.shape[axis]:
        raise MediffError(f"--slice {k} out of range: the volume has {vol.shape[axis]} axial slices")
    # The 2D voxel (i, j, 0) is the volume voxel with (i, j) on the two other axes and k on ``axis``;
    # the third column steps along ``axis``.
    rows, cols = (a for a in range(3) if a != axis)
    to_vol = np.zeros((4, 4))
    to_vol[rows, 0] = to_vol[cols, 1] = to_vol[axis, 2] = to_vol[3, 3] = 1.0
    to_vol[axis, 3] = k
    note = f"axial slice {k} of {vol.shape[axis]} reconstructed (volume reoriented to {''.join(orientation)})"
    return np.ascontiguousarray(np.take(vol, k, axis=axis), dtype=np.float32), affine @ to_vol, note
