"""The entry points that pick a format: :func:`detect_format`, :func:`read_image`, :func:`write_image`
and :func:`describe` (for ``mediff info``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from mediff.errors import MediffError, one_line
from mediff.io.arrays import read_npy, read_npz, write_npz
from mediff.io.dicom_read import read_dicom_file, read_dicom_series
from mediff.io.dicom_write import write_dicom
from mediff.io.hdf5 import read_h5_image, summarize_h5
from mediff.io.image import MedicalImage, PathLike, as_path, path_suffix, read_errors
from mediff.io.nifti import read_nifti, write_nifti
from mediff.io.raster import read_raster, write_png

_SUFFIX_FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
    ".png": "png",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".npy": "npy",
    ".npz": "npz",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
}


def detect_format(path: PathLike) -> str:
    """Format name of ``path``: "dicom-series" for a folder, else from the extension or magic bytes.

    Returns one of nifti, dicom, dicom-series, png, tiff, npy, npz, hdf5. Raises MediffError for a
    missing path or an unsupported file.
    """
    p = as_path(path)
    if not p.exists():
        raise MediffError(f"file not found: {p}")
    if p.is_dir():
        return "dicom-series"
    fmt = _SUFFIX_FORMATS.get(path_suffix(p))
    if fmt is not None:
        return fmt
    # No known extension: sniff magic bytes (DICOM files often have no extension at all).
    try:
        with open(p, "rb") as fh:
            head = fh.read(352)
    except OSError as exc:
        raise MediffError(f"cannot open {p}: {exc.strerror or exc}") from exc
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    supported = ", ".join(sorted(set(_SUFFIX_FORMATS)))
    raise MediffError(f"unsupported file type: {p} (supported: {supported}, or a DICOM folder)")


def read_image(
    path: PathLike,
    *,
    raw: bool = False,
    key: str | None = None,
    series_uid: str | None = None,
) -> MedicalImage:
    """Read any supported image into a :class:`MedicalImage`.

    path: NIfTI, DICOM file, DICOM series folder, PNG/TIFF, NPY, NPZ, or fastMRI HDF5 (returns
        ``reconstruction_rss``, shape (slices, H, W)).
    raw: keep stored values (skip DICOM rescale / NIfTI scl scaling).
    key: NPZ array to read (default: see ``NPZ_IMAGE_KEYS`` rule).
    series_uid: DICOM folder: the SeriesInstanceUID to read (default: the series with most files).
    """
    p = as_path(path)
    fmt = detect_format(p)
    if key is not None and fmt != "npz":
        raise MediffError(f"key= only applies to .npz files, not {p}")
    if series_uid is not None and fmt != "dicom-series":
        raise MediffError(f"series_uid= only applies to DICOM folders, not {p}")
    readers: dict[str, Callable[[], MedicalImage]] = {
        "nifti": lambda: read_nifti(p, raw),
        "dicom": lambda: read_dicom_file(p, raw),
        "dicom-series": lambda: read_dicom_series(p, raw, series_uid),
        "png": lambda: read_raster(p, "png"),
        "tiff": lambda: read_raster(p, "tiff"),
        "npy": lambda: read_npy(p),
        "npz": lambda: read_npz(p, key),
        "hdf5": lambda: read_h5_image(p),
    }
    try:
        img = readers[fmt]()
    except MediffError:
        raise
    except read_errors() as exc:
        raise MediffError(f"cannot read {fmt} {p}: {one_line(exc)}") from exc
    img.meta.setdefault("source", str(p))
    img.meta.setdefault("format", fmt)
    return img


def write_image(path: PathLike, image: MedicalImage | np.ndarray, *, overwrite: bool = False) -> Path | list[Path]:
    """Write by extension: .nii/.nii.gz, .png (2D, windowed), .npz (image + affine + spacing), .dcm
    (2D) or a path without extension (a DICOM series folder for 3D)."""
    p = as_path(path)
    img = image if isinstance(image, MedicalImage) else MedicalImage(np.asarray(image))
    suffix = path_suffix(p)
    if suffix in (".nii", ".nii.gz"):
        return write_nifti(p, img, overwrite=overwrite)
    if suffix == ".png":
        return write_png(p, img, overwrite=overwrite)
    if suffix == ".npz":
        extra = {"modality": np.array(img.modality)} if img.modality else {}
        return write_npz(
            p, overwrite=overwrite, image=img.array, affine=img.affine, spacing=np.asarray(img.spacing), **extra
        )
    if suffix in (".dcm", ""):
        # 2D -> one file; 3D -> a series folder (write_dicom refuses a 3D volume to "x.dcm").
        return write_dicom(p, img, modality=img.modality or "MR", overwrite=overwrite)
    raise MediffError(f"cannot tell the output format from {p} (use .nii.gz, .png, .npz, .dcm or a folder)")


def _axcodes(affine: np.ndarray) -> str | None:
    try:
        import nibabel as nib

        codes = nib.aff2axcodes(affine)
    except (ValueError, np.linalg.LinAlgError):
        return None
    return "".join(c or "?" for c in codes)


def describe(path: PathLike) -> dict[str, Any]:
    """JSON-friendly summary of a file or DICOM folder for ``mediff info``.

    Keys: path, format, shape, dtype, spacing (mm), modality, min, max, axes, orientation (axis codes
    like "RAS" when geometry is known); HDF5 adds kspace_shape, kspace_dtype, coils, slices, attrs.
    """
    p = as_path(path)
    fmt = detect_format(p)
    info: dict[str, Any] = {"path": str(p), "format": fmt}
    if fmt == "hdf5":
        summary, has_image = summarize_h5(p)
        info.update(summary)
        if not has_image:
            return info
    img = read_image(p)
    a = img.array
    info.update(
        shape=list(a.shape),
        dtype=str(a.dtype),
        spacing=[round(s, 6) for s in img.spacing],
        modality=img.modality,
        axes=img.meta.get("axes"),
    )
    if a.size:
        vals = np.abs(a) if np.iscomplexobj(a) else a
        info["min"] = float(np.nanmin(vals))
        info["max"] = float(np.nanmax(vals))
    if img.meta.get("spacing_known"):
        info["orientation"] = _axcodes(img.affine)
    for k in (
        "n_files",
        "SeriesInstanceUID",
        "SeriesDescription",
        "series_note",
        "key",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        if k in img.meta:
            info[k] = img.meta[k]
    return info
