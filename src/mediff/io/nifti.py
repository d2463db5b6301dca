"""NIfTI-1 reading (geometry and scl scaling as stored, no reorientation) and writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mediff.errors import MediffError
from mediff.io.atomic import atomic_write
from mediff.io.image import MedicalImage, PathLike, as_path, check_affine, path_suffix, unpack_image


def read_nifti(p: Path, raw: bool) -> MedicalImage:
    """A NIfTI file as stored (no reorientation); scl_slope/scl_inter applied unless ``raw``, spacing in mm."""
    import nibabel as nib

    img = nib.load(str(p))
    dataobj = img.dataobj
    slope = getattr(dataobj, "slope", 1.0)
    inter = getattr(dataobj, "inter", 0.0)
    identity = (slope is None or slope == 1.0) and (inter is None or inter == 0.0)
    if raw or identity:
        # get_unscaled keeps the on-disk dtype (e.g. uint8 for the IXI volumes).
        arr = np.asarray(dataobj.get_unscaled()) if hasattr(dataobj, "get_unscaled") else np.asarray(dataobj)
    else:
        arr = np.asarray(dataobj, dtype=np.float32)  # applies scl_slope/scl_inter
    zooms = tuple(float(z) for z in img.header.get_zooms()[: min(arr.ndim, 3)])
    xyz_unit = img.header.get_xyzt_units()[0]
    if xyz_unit == "meter":
        zooms = tuple(z * 1000.0 for z in zooms)
    elif xyz_unit == "micron":
        zooms = tuple(z / 1000.0 for z in zooms)
    meta = {
        "format": "nifti",
        "axes": "i,j,k" + (",t" if arr.ndim > 3 else ""),
        "stored_dtype": str(img.get_data_dtype()),
        "scl_slope": float(slope) if slope is not None else 1.0,
        "scl_inter": float(inter) if inter is not None else 0.0,
        "sform_code": int(img.header["sform_code"]),
        "qform_code": int(img.header["qform_code"]),
        "spacing_known": True,
    }
    return MedicalImage(arr, np.asarray(img.affine, dtype=np.float64), zooms, None, meta)


def write_nifti(
    path: PathLike, array: np.ndarray | MedicalImage, affine: np.ndarray | None = None, *, overwrite: bool = False
) -> Path:
    """Write a NIfTI-1 file (.nii or .nii.gz); array axes follow the affine (default identity, 1 mm).

    The affine (voxel -> RAS mm) is stored as both sform and qform (code 1, scanner). Dtype is kept,
    except bool -> uint8, float16 -> float32, 64-bit ints -> int32 when the values fit.
    """
    import nibabel as nib

    p = as_path(path)
    if path_suffix(p) not in (".nii", ".nii.gz"):
        raise MediffError(f"NIfTI output must end in .nii or .nii.gz: {p}")
    arr, aff, _ = unpack_image(array, affine)
    aff = np.eye(4) if aff is None else aff
    check_affine(aff, p)
    if arr.ndim < 2 or arr.ndim > 7:
        raise MediffError(f"NIfTI needs a 2D to 7D array, got shape {arr.shape} for {p}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:
        # nibabel refuses 64-bit ints without an explicit on-disk type: downcast when lossless.
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        info = np.iinfo(np.int32)
        arr = arr.astype(np.int32) if info.min <= lo and hi <= info.max else arr.astype(np.float64)
    elif arr.dtype.kind not in "iufc":
        raise MediffError(f"cannot write dtype {arr.dtype} to NIfTI {p}")
    img = nib.Nifti1Image(np.asarray(arr), aff)
    img.header.set_xyzt_units("mm")
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    return atomic_write(p, overwrite, lambda tmp: nib.save(img, str(tmp)))
