"""From the input's grid to the working grid of a prior and back: slice picking in a volume and
2D resampling. Users read results on their own grid, so every map here comes with its inverse."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class InputGrid:
    """Where a 2D slice picked from a volume sits on the input's own voxel grid, so outputs can be
    written there: tools such as FSL, ANTs or nibabel arithmetic compare voxel by voxel, and a slice
    that is right in world coordinates but rotated in voxel order defeats them.

    ``transform``: nibabel orientation transform from the reoriented frame back to the input's axes;
    ``axis``: the slice axis in the reoriented frame; ``affine``: the input's affine moved to the slice
    (for an input with one slice, the input's affine); ``input_axis`` / ``input_index``: the slice's
    axis and index in the input's own voxel order, along which slices stack back into a volume."""

    transform: np.ndarray
    axis: int
    affine: np.ndarray
    input_axis: int
    input_index: int

    def place(self, a: np.ndarray) -> np.ndarray:
        """A slice (H, W) in the reoriented frame -> the input's voxel order, length 1 on its slice axis."""
        import nibabel.orientations as nio

        return np.ascontiguousarray(nio.apply_orientation(np.expand_dims(a, self.axis), self.transform))


def _input_grid(img_affine: np.ndarray, src: np.ndarray, dst: np.ndarray, axis: int, k: int, n: int) -> InputGrid:
    """The ``InputGrid`` of slice ``k`` of ``n`` along ``axis`` of a volume reoriented from the
    nibabel orientation ``src`` (the input's) to ``dst``."""
    import nibabel.orientations as nio

    to_frame = nio.ornt_transform(src, dst)  # row i: (axis of input axis i in the frame, flip)
    src_axis = int(np.flatnonzero(to_frame[:, 0] == axis)[0])  # the input axis that became ``axis``
    k_in = n - 1 - k if to_frame[src_axis, 1] < 0 else k
    shift = np.eye(4)
    shift[src_axis, 3] = k_in
    return InputGrid(transform=nio.ornt_transform(dst, src), axis=axis, affine=img_affine @ shift,
                     input_axis=src_axis, input_index=k_in)


def stack_on_input_grid(grids: list[InputGrid], slices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Slices (H, W) of consecutive slice indices, each with its ``InputGrid``, as one block of the
    input's voxel grid: (array in the input's voxel order, its 4x4 affine at the block's first voxel)."""
    order = sorted(range(len(grids)), key=lambda i: grids[i].input_index)
    first = grids[order[0]]
    return np.concatenate([grids[i].place(slices[i]) for i in order], axis=first.input_axis), first.affine


def slice_count(img: io.MedicalImage, orientation: tuple[str, str, str] = SLICE_ORIENTATION, axis: int = 1) -> int:
    """How many slices ``pick_slice`` can pick from ``img`` along ``axis`` of ``orientation`` (1 for 2D)."""
    import nibabel.orientations as nio

    if np.ndim(img.array) != 3:
        return 1
    to_frame = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(orientation))
    return int(img.array.shape[int(np.flatnonzero(to_frame[:, 0] == axis)[0])])


def pick_slice(img: io.MedicalImage, slice_index: int | None, orientation: tuple[str, str, str] = SLICE_ORIENTATION,
               axis: int = 1) -> tuple[np.ndarray, np.ndarray, str | None, InputGrid | None]:
    """A 2D image as is, or the slice ``slice_index`` (default: middle) along ``axis`` of a volume
    reoriented to ``orientation`` (MRI: P-S-R, axis 1; CT: P-L-S, axis 2).

    Returns (slice (H, W) float32 magnitude, its 4x4 affine, a note or None, where the slice sits on
    the input's voxel grid (None for a 2D input: it is that grid))."""
    import nibabel.orientations as nio

    arr = np.asarray(img.array)
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    if arr.ndim == 2:
        return arr.astype(np.float32), img.affine, None, None
    if arr.ndim != 3:
        raise MediffError(f"expected a 2D image or 3D volume, got shape {arr.shape}")
    src, dst = nio.io_orientation(img.affine), nio.axcodes2ornt(orientation)
    transform = nio.ornt_transform(src, dst)
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
    note = (None if vol.shape[axis] == 1 else
            f"axial slice {k} of {vol.shape[axis]} reconstructed (volume reoriented to {''.join(orientation)})")
    grid = _input_grid(img.affine, src, dst, axis, k, vol.shape[axis])
    return np.ascontiguousarray(np.take(vol, k, axis=axis), dtype=np.float32), affine @ to_vol, note, grid
