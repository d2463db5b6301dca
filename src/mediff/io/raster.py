"""PNG and TIFF through PIL: grayscale reading (multi-page TIFF as a stack) and windowed PNG writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mediff.errors import MediffError
from mediff.io.atomic import atomic_write
from mediff.io.image import MedicalImage, PathLike, affine_from_spacing, as_path, path_suffix, unpack_image


def read_raster(p: Path, fmt: str) -> MedicalImage:
    """A PNG or TIFF (``fmt``) as grayscale (row, col), a multi-page TIFF as (row, col, page); no geometry."""
    from PIL import Image

    frames = []
    modes = set()
    with Image.open(p) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            mode = im.mode
            modes.add(mode)
            if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F", "1"):
                frame = np.asarray(im)
            else:
                # Colour/palette/alpha images: grayscale luminance (ITU-R 601), 8 bit.
                frame = np.asarray(im.convert("L"))
            if frame.dtype == bool:
                frame = frame.astype(np.uint8)
            frames.append(np.array(frame))  # copy: the PIL buffer dies with the file
    arr = frames[0] if len(frames) == 1 else np.stack(frames, axis=-1)
    meta = {
        "format": fmt,
        "axes": "row,col" if arr.ndim == 2 else "row,col,page",
        "mode": sorted(modes),
        "spacing_known": False,
    }
    spacing = (1.0,) * min(arr.ndim, 3)
    return MedicalImage(arr, affine_from_spacing(spacing), spacing, None, meta)


def write_png(
    path: PathLike,
    array: np.ndarray | MedicalImage,
    vmin: float | None = None,
    vmax: float | None = None,
    *,
    bits: int = 8,
    overwrite: bool = False,
) -> Path:
    """Write a 2D image (H, W) as grayscale PNG, 8 or 16 bit.

    Without vmin/vmax, uint8 data (and uint16 data for bits=16) are written unchanged; anything else
    is windowed linearly from [vmin, vmax] (default: the finite min/max) to [0, 2**bits - 1], clipped.
    NaN becomes 0.
    """
    from PIL import Image

    p = as_path(path)
    if path_suffix(p) != ".png":
        raise MediffError(f"PNG output must end in .png: {p}")
    if bits not in (8, 16):
        raise MediffError(f"bits must be 8 or 16, got {bits}")
    arr, _, _ = unpack_image(array, None)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise MediffError(f"PNG needs a 2D array, got shape {arr.shape} for {p} (use volume_to_slices)")
    if np.iscomplexobj(arr):
        raise MediffError(f"PNG cannot hold complex data (take np.abs first): {p}")
    top = 255 if bits == 8 else 65535
    out_dtype = np.uint8 if bits == 8 else np.uint16
    passthrough = vmin is None and vmax is None and (arr.dtype == np.uint8 or (bits == 16 and arr.dtype == np.uint16))
    if passthrough:
        out = arr.astype(out_dtype)
    else:
        data = arr.astype(np.float64)
        finite = data[np.isfinite(data)]
        lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
        hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        if hi <= lo:
            # Constant image (or bad window): avoid dividing by zero; everything maps to 0.
            scaled = np.zeros_like(data)
        else:
            scaled = (data - lo) / (hi - lo) * top
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=top, neginf=0.0)
        out = np.clip(np.rint(scaled), 0, top).astype(out_dtype)
    pil = Image.fromarray(out)  # uint8 -> "L", uint16 -> "I;16"
    return atomic_write(p, overwrite, lambda tmp: pil.save(tmp, format="PNG"))
