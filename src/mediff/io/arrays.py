"""NumPy files: NPY reading, NPZ reading (image key and optional geometry keys) and writing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mediff.errors import MediffError
from mediff.io.atomic import atomic_write
from mediff.io.image import MedicalImage, PathLike, affine_from_spacing, as_path, path_suffix

# NPZ: the image is the first of these keys present; otherwise the first array in the archive that
# is not one of the metadata keys below (np.savez keeps keyword order, so "first" is well defined).
NPZ_IMAGE_KEYS = ("image", "images", "hu")
NPZ_META_KEYS = ("affine", "spacing", "modality")


def read_npy(p: Path) -> MedicalImage:
    """An .npy array as stored (loaded without pickle); no geometry, so 1 mm spacing."""
    arr = np.load(p, allow_pickle=False)
    spacing = (1.0,) * min(arr.ndim, 3)
    meta = {"format": "npy", "axes": "as stored", "spacing_known": False}
    return MedicalImage(arr, affine_from_spacing(spacing), spacing, None, meta)


def read_npz(p: Path, key: str | None) -> MedicalImage:
    """The image of an .npz (``key``, else by the ``NPZ_IMAGE_KEYS`` rule); geometry from its ``affine`` or
    ``spacing`` key, modality from ``modality`` (CT for a ``hu`` array)."""
    with np.load(p, allow_pickle=False) as z:
        keys = list(z.files)
        if key is not None:
            if key not in keys:
                raise MediffError(f"key '{key}' not in {p} (keys: {', '.join(keys) or 'none'})")
            chosen = key
        else:
            chosen = next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
            if chosen is None:
                chosen = next((k for k in keys if k not in NPZ_META_KEYS), None)
            if chosen is None:
                raise MediffError(
                    f"no image array in {p} (keys: {', '.join(keys) or 'none'}; "
                    f"expected one of {', '.join(NPZ_IMAGE_KEYS)})"
                )
        arr = z[chosen]
        affine = z["affine"] if "affine" in keys else None
        spacing_arr = z["spacing"] if "spacing" in keys else None
        modality_arr = z["modality"] if "modality" in keys else None
    meta: dict[str, Any] = {"format": "npz", "key": chosen, "keys": keys, "axes": "as stored"}
    n_sp = min(arr.ndim, 3)
    if affine is not None and affine.shape == (4, 4) and np.all(np.isfinite(affine)):
        affine = affine.astype(np.float64)
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :n_sp], axis=0))
        meta["spacing_known"] = True
    elif spacing_arr is not None and spacing_arr.ndim == 1 and spacing_arr.size >= 1:
        spacing = tuple(float(v) for v in spacing_arr[:n_sp])
        affine = affine_from_spacing(spacing)
        meta["spacing_known"] = True
    else:
        spacing = (1.0,) * n_sp
        affine = affine_from_spacing(spacing)
        meta["spacing_known"] = False
    modality = None
    if modality_arr is not None and modality_arr.ndim == 0 and modality_arr.dtype.kind == "U":
        modality = str(modality_arr) or None
    elif chosen == "hu":
        modality = "CT"  # Hounsfield units only come from CT
    return MedicalImage(arr, affine, spacing, modality, meta)


def write_npz(path: PathLike, *, overwrite: bool = False, compress: bool = True, **arrays: Any) -> Path:
    """Write arrays to an .npz (compressed by default). Object arrays are refused: read_image loads
    NPZ without pickle. To be read back with geometry, pass ``image=..., affine=(4,4)``."""
    p = as_path(path)
    if path_suffix(p) != ".npz":
        raise MediffError(f"NPZ output must end in .npz: {p}")
    if not arrays:
        raise MediffError(f"no arrays given for {p}")
    clean = {}
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype == object:
            raise MediffError(f"array '{name}' for {p} has dtype object (not loadable without pickle)")
        clean[name] = a
    saver = np.savez_compressed if compress else np.savez

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would append ".npz" to a name
            saver(fh, **clean)

    return atomic_write(p, overwrite, _write)
