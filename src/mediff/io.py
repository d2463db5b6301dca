"""Reading and writing medical images: NIfTI, DICOM (file or series folder), PNG/TIFF, NPY/NPZ, fastMRI HDF5.

Conventions (every reader follows them, every writer expects them):

* ``MedicalImage.affine`` is a 4x4 float64 matrix mapping a voxel index ``(i, j, k, 1)`` to world
  millimetres in RAS+ as nibabel uses it: +x towards the patient's Right, +y Anterior, +z Superior
  (DICOM's LPS+ with x and y negated). A 2D array ``(H, W)`` uses the same matrix with ``k = 0``;
  its third column is the slice-normal step (slice thickness).
* Axis order is the order of the affine's voxel index, and depends on where the data came from
  (``meta["axes"]`` says it in words):
    - NIfTI: exactly as stored (no reorientation), ``(i, j, k[, t])``.
    - DICOM: ``(row, col)`` for one slice, ``(row, col, slice)`` for a series or multi-frame file,
      i.e. an axial slice displays upright with ``array[:, :, k]``. Series slices are ordered by
      ascending position along the slice normal ``row_cosine x col_cosine``.
    - PNG/TIFF: ``(row, col)`` (multi-page TIFF: ``(row, col, page)``); geometry unknown.
    - NPY/NPZ: as stored; geometry from NPZ keys ``affine``/``spacing`` when present.
    - fastMRI HDF5: ``(slice, row, col)`` as fastMRI stores it, so images line up with k-space.
* ``spacing`` is the voxel size in mm for each spatial axis (length = number of spatial axes).
  ``meta["spacing_known"]`` is False when the format carries no geometry (then spacing is 1 mm).
* Values: stored values are converted to physical units (DICOM RescaleSlope/Intercept, so CT is in
  HU; NIfTI scl_slope/scl_inter). The array keeps its stored dtype when that conversion is the
  identity and becomes float32 otherwise. ``raw=True`` skips the conversion.
* ``meta`` never contains patient-identifying DICOM tags (names, IDs, birth dates).

Every problem caused by the input (missing/corrupt/unsupported file, bad options) raises
:class:`mediff.errors.MediffError` with a one-line message naming the file.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import re
import secrets
import shutil
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mediff.errors import MediffError, one_line

PathLike = str | os.PathLike

__all__ = [
    "MedicalImage",
    "read_image",
    "read_kspace_h5",
    "write_image",
    "write_nifti",
    "write_png",
    "write_npz",
    "write_dicom",
    "volume_to_slices",
    "slices_to_volume",
    "describe",
    "detect_format",
    "dicom_modality",
]

# DICOM stores patient coordinates in LPS, nibabel/NIfTI in RAS: flipping x and y converts both ways.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# NPZ: the image is the first of these keys present; otherwise the first array in the archive that
# is not one of the metadata keys below (np.savez keeps keyword order, so "first" is well defined).
NPZ_IMAGE_KEYS = ("image", "images", "hu")
NPZ_META_KEYS = ("affine", "spacing", "modality")

_DICOM_SERIES_FILE = re.compile(r"IM_\d{5}\.dcm")

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


def _extra_read_errors() -> tuple[type[BaseException], ...]:
    """Library-specific exception types (imported lazily: the libraries are heavy to import)."""
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


# --------------------------------------------------------------------------------------------------
# The image container
# --------------------------------------------------------------------------------------------------


@dataclass
class MedicalImage:
    """An image with its geometry.

    array: pixel/voxel values, spatial axes first in the order of the affine's voxel index
        (see module docstring); physical units (HU for CT) unless read with ``raw=True``.
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


def _affine_from_spacing(spacing: Sequence[float]) -> np.ndarray:
    """Axis-aligned affine with the given voxel sizes (mm) and origin 0, for formats without geometry."""
    aff = np.eye(4)
    for i, s in enumerate(list(spacing)[:3]):
        aff[i, i] = float(s)
    return aff


def _as_path(path: PathLike) -> Path:
    return Path(os.fspath(path)).expanduser()


# --------------------------------------------------------------------------------------------------
# Format detection and the reader entry point
# --------------------------------------------------------------------------------------------------

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


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def detect_format(path: PathLike) -> str:
    """Format name of ``path``: "dicom-series" for a folder, else from the extension or magic bytes.

    Returns one of nifti, dicom, dicom-series, png, tiff, npy, npz, hdf5. Raises MediffError for a
    missing path or an unsupported file.
    """
    p = _as_path(path)
    if not p.exists():
        raise MediffError(f"file not found: {p}")
    if p.is_dir():
        return "dicom-series"
    fmt = _SUFFIX_FORMATS.get(_suffix(p))
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
    p = _as_path(path)
    fmt = detect_format(p)
    if key is not None and fmt != "npz":
        raise MediffError(f"key= only applies to .npz files, not {p}")
    if series_uid is not None and fmt != "dicom-series":
        raise MediffError(f"series_uid= only applies to DICOM folders, not {p}")
    readers: dict[str, Callable[[], MedicalImage]] = {
        "nifti": lambda: _read_nifti(p, raw),
        "dicom": lambda: _read_dicom_file(p, raw),
        "dicom-series": lambda: _read_dicom_series(p, raw, series_uid),
        "png": lambda: _read_pil(p, "png"),
        "tiff": lambda: _read_pil(p, "tiff"),
        "npy": lambda: _read_npy(p),
        "npz": lambda: _read_npz(p, key),
        "hdf5": lambda: _read_h5_image(p),
    }
    try:
        img = readers[fmt]()
    except MediffError:
        raise
    except _extra_read_errors() as exc:
        raise MediffError(f"cannot read {fmt} {p}: {one_line(exc)}") from exc
    img.meta.setdefault("source", str(p))
    img.meta.setdefault("format", fmt)
    return img


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------


def _read_nifti(p: Path, raw: bool) -> MedicalImage:
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


# --------------------------------------------------------------------------------------------------
# DICOM reading
# --------------------------------------------------------------------------------------------------


def _has_dicm_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dcmread(p: Path, stop_before_pixels: bool = False) -> Any:
    import pydicom

    try:
        # force=True only for files without the standard preamble (old ACR-NEMA style exports).
        return pydicom.dcmread(str(p), force=not _has_dicm_preamble(p), stop_before_pixels=stop_before_pixels)
    except _extra_read_errors() as exc:
        raise MediffError(f"cannot read DICOM {p}: {one_line(exc)}") from exc


def _lookup(ds: Any, keyword: str, frame: int = 0) -> Any:
    """A tag from the top level, else from the (per-frame / shared) functional groups of enhanced DICOM."""
    if keyword in ds:
        return ds[keyword].value
    for groups_kw, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_kw)
        if groups is None or len(groups) <= idx:
            continue
        for elem in groups[idx]:
            if elem.VR == "SQ" and len(elem.value) and keyword in elem.value[0]:
                return elem.value[0][keyword].value
    return None


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            return [float(value)]
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _pixels(ds: Any, p: Path) -> np.ndarray:
    """Stored pixel values, shape (rows, cols) or (frames, rows, cols)."""
    if "PixelData" not in ds:
        raise MediffError(f"DICOM has no pixel data (truncated or not an image): {p}")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise MediffError(f"colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}) is not supported: {p}")
    try:
        arr = ds.pixel_array
    except (*_extra_read_errors(), AttributeError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise MediffError(f"cannot decode DICOM pixel data of {p} (transfer syntax {ts}): {one_line(exc)}") from exc
    return np.asarray(arr)


def _rescale(ds: Any, frame: int = 0) -> tuple[float, float]:
    slope = _floats(_lookup(ds, "RescaleSlope", frame))
    inter = _floats(_lookup(ds, "RescaleIntercept", frame))
    return (slope[0] if slope else 1.0), (inter[0] if inter else 0.0)


def _dicom_affine(
    iop: Sequence[float], ipp: Sequence[float], pixel_spacing: Sequence[float], step_lps: np.ndarray
) -> np.ndarray:
    """RAS affine for axes (row, col, slice).

    DICOM: IOP[:3] is the direction in which the *column index* grows, IOP[3:] the direction in which
    the *row index* grows; PixelSpacing = (distance between rows, distance between columns).
    """
    row_cos = np.asarray(iop[:3], dtype=np.float64)
    col_cos = np.asarray(iop[3:6], dtype=np.float64)
    m = np.eye(4)
    m[:3, 0] = col_cos * float(pixel_spacing[0])
    m[:3, 1] = row_cos * float(pixel_spacing[1])
    m[:3, 2] = step_lps
    m[:3, 3] = np.asarray(ipp, dtype=np.float64)
    return _LPS_RAS @ m


def _slice_normal(iop: Sequence[float]) -> np.ndarray:
    n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:6], float))
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise MediffError("ImageOrientationPatient has parallel row and column directions")
    return n / norm


def _dicom_meta(ds: Any, p: Path) -> dict[str, Any]:
    """Non-identifying tags worth keeping."""
    meta: dict[str, Any] = {}
    for kw in (
        "Modality",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "FrameOfReferenceUID",
        "SeriesDescription",
        "SeriesNumber",
        "PatientPosition",
        "Manufacturer",
        "PhotometricInterpretation",
        "BodyPartExamined",
        "SOPClassUID",
    ):
        if kw in ds and ds[kw].value not in (None, ""):
            meta[kw] = str(ds[kw].value)
    for kw in ("SliceThickness", "SpacingBetweenSlices", "KVP", "EchoTime", "RepetitionTime", "MagneticFieldStrength"):
        v = _floats(_lookup(ds, kw))
        if v:
            meta[kw] = v[0]
    for kw in ("WindowCenter", "WindowWidth"):
        v = _floats(_lookup(ds, kw))
        if v:
            meta[kw] = v[0] if len(v) == 1 else v
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None:
        meta["TransferSyntaxUID"] = str(ts)
    return meta


def _apply_rescale(
    stored: np.ndarray, slopes: Sequence[float], inters: Sequence[float], raw: bool, axis: int
) -> np.ndarray:
    """stored * slope + intercept, per slice along ``axis``; dtype kept when the rescale is the identity."""
    if raw or all(s == 1.0 for s in slopes) and all(i == 0.0 for i in inters):
        return stored
    shape = [1] * stored.ndim
    shape[axis] = len(slopes)
    s = np.asarray(slopes, dtype=np.float64).reshape(shape)
    b = np.asarray(inters, dtype=np.float64).reshape(shape)
    # float64 intermediate so large stored values with fractional slopes are exact before the cast.
    return (stored.astype(np.float64) * s + b).astype(np.float32)


def _read_dicom_file(p: Path, raw: bool) -> MedicalImage:
    ds = _dcmread(p)
    if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
        raise MediffError(f"{p} is a DICOMDIR index, not an image: read the folder that holds the images")
    stored = _pixels(ds, p)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    meta = _dicom_meta(ds, p)
    meta["format"] = "dicom"
    iop = _floats(_lookup(ds, "ImageOrientationPatient"))
    ipp = _floats(_lookup(ds, "ImagePositionPatient"))
    ps = _floats(_lookup(ds, "PixelSpacing")) or _floats(_lookup(ds, "ImagerPixelSpacing"))
    thickness = (_floats(_lookup(ds, "SpacingBetweenSlices")) or _floats(_lookup(ds, "SliceThickness")) or [1.0])[0]

    if nframes > 1 and stored.ndim == 3:
        arr = np.moveaxis(stored, 0, -1)  # (frames, rows, cols) -> (rows, cols, frames)
        rescales = [_rescale(ds, f) for f in range(nframes)]  # enhanced DICOM: per-frame rescale
        arr = _apply_rescale(arr, [r[0] for r in rescales], [r[1] for r in rescales], raw, axis=2)
        meta["axes"] = "row,col,frame"
    else:
        rescales = [_rescale(ds)]
        arr = _apply_rescale(stored, [rescales[0][0]], [rescales[0][1]], raw, axis=0)
        meta["axes"] = "row,col"
    meta["RescaleSlope"], meta["RescaleIntercept"] = rescales[0]

    if iop and len(iop) == 6 and ipp and len(ipp) == 3 and ps and len(ps) >= 2:
        normal = _slice_normal(iop)
        step = normal * thickness
        if nframes > 1:
            last = _floats(_lookup(ds, "ImagePositionPatient", nframes - 1))
            if last and len(last) == 3 and np.linalg.norm(np.subtract(last, ipp)) > 1e-6:
                step = (np.asarray(last) - np.asarray(ipp)) / (nframes - 1)
        affine = _dicom_affine(iop, ipp, ps, step)
        meta["spacing_known"] = True
    else:
        row_sp, col_sp = (ps[0], ps[1]) if ps and len(ps) >= 2 else (1.0, 1.0)
        affine = _affine_from_spacing((row_sp, col_sp, thickness))
        meta["spacing_known"] = bool(ps)
        meta["geometry_note"] = "no ImageOrientationPatient/ImagePositionPatient: axis-aligned affine"
    n_sp = min(arr.ndim, 3)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :n_sp], axis=0))
    modality = str(ds.Modality) if "Modality" in ds else None
    return MedicalImage(arr, affine, spacing, modality, meta)


def _series_files(folder: Path) -> list[Path]:
    """The files of a series folder that look like DICOM (preamble or extension), sorted by name."""
    entries = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
    files = [e for e in entries if e.is_file() and e.name.upper() != "DICOMDIR"]
    if not files:
        hint = " (subfolders are not searched)" if any(e.is_dir() for e in entries) else ""
        raise MediffError(f"empty folder, no DICOM files in {folder}{hint}")
    candidates = [f for f in files if _has_dicm_preamble(f) or f.suffix.lower() in (".dcm", ".dicom", ".ima")]
    if not candidates:
        raise MediffError(f"no DICOM files (no 'DICM' preamble or .dcm extension) in {folder}")
    return candidates


def dicom_modality(path: PathLike) -> str:
    """The Modality tag ("CT", "MR", ...) of a DICOM file, or of the first file of a series folder.

    Reads headers only, so deciding how to treat an input costs no pixel decoding. Returns "" when
    the tag is absent; raises ``MediffError`` when the file or folder holds no readable DICOM.
    """
    p = _as_path(path)
    first = _series_files(p)[0] if p.is_dir() else p
    return str(_dcmread(first, stop_before_pixels=True).get("Modality", "") or "").strip().upper()


def _read_dicom_series(folder: Path, raw: bool, series_uid: str | None) -> MedicalImage:
    candidates = _series_files(folder)
    # Read headers first: choosing the series needs no pixel data, and skipping pixels is much faster.
    by_series: dict[str, list[tuple[Path, Any]]] = {}
    for f in candidates:
        ds = _dcmread(f, stop_before_pixels=True)
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or "Rows" not in ds:
            raise MediffError(f"not a DICOM image (no SeriesInstanceUID/Rows): {f}")
        by_series.setdefault(uid, []).append((f, ds))

    meta: dict[str, Any] = {"format": "dicom-series"}
    if series_uid is not None:
        if series_uid not in by_series:
            raise MediffError(f"series {series_uid} not in {folder} (found: {', '.join(sorted(by_series))})")
        chosen = series_uid
    elif len(by_series) == 1:
        chosen = next(iter(by_series))
    else:
        counts = {uid: len(v) for uid, v in by_series.items()}
        largest = max(counts.values())
        tied = [uid for uid, n in counts.items() if n == largest]
        if len(tied) > 1:
            raise MediffError(
                f"{folder} holds {len(counts)} DICOM series, {len(tied)} of them with {largest} files: "
                "pass series_uid= to choose one"
            )
        chosen = tied[0]
        meta["series_note"] = f"folder holds {len(counts)} series; read the largest ({largest} files)"
        meta["other_series"] = {uid: n for uid, n in counts.items() if uid != chosen}
    members = by_series[chosen]

    for f, ds in members:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 and len(members) > 1:
            raise MediffError(f"series of multi-frame DICOM files is not supported: {f} (read the file itself)")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise MediffError(f"colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}) is not supported: {f}")
    if len(members) == 1:
        img = _read_dicom_file(members[0][0], raw)
        if img.array.ndim == 2:
            # A folder is always a volume: one slice becomes (rows, cols, 1); the affine already has
            # the slice-normal step in its third column.
            img.array = img.array[:, :, None]
            img.spacing = tuple(float(v) for v in np.linalg.norm(img.affine[:3, :3], axis=0))
            img.meta["axes"] = "row,col,slice"
        img.meta.update(meta, format="dicom-series", n_files=1, files=[str(members[0][0])])
        return img

    # Order slices by position along the normal; filenames and InstanceNumber are unreliable.
    ref_ds = members[0][1]
    iop = _floats(ref_ds.get("ImageOrientationPatient"))
    positions = [_floats(ds.get("ImagePositionPatient")) for _, ds in members]
    geometry = bool(iop) and len(iop) == 6 and all(pos and len(pos) == 3 for pos in positions)
    if geometry:
        for f, ds in members:
            other = _floats(ds.get("ImageOrientationPatient"))
            if other is None or len(other) != 6 or np.max(np.abs(np.subtract(other, iop))) > 1e-4:
                raise MediffError(f"slices of one series have different orientations ({f}): cannot stack {folder}")
        normal = _slice_normal(iop)
        dist = np.array([np.dot(normal, pos) for pos in positions])
        order = np.argsort(dist, kind="stable")
        gaps = np.diff(dist[order])
        if np.any(gaps < 1e-3):
            k = int(np.argmin(gaps))
            raise MediffError(
                f"two slices share a position ({members[order[k]][0].name}, {members[order[k + 1]][0].name}) in "
                f"{folder}: multi-echo/temporal series are not supported, pass series_uid= or split the folder"
            )
    else:
        # No geometry: fall back to InstanceNumber and say so.
        order = np.argsort([int(ds.get("InstanceNumber", 0) or 0) for _, ds in members], kind="stable")
        meta["geometry_note"] = "missing ImagePositionPatient/ImageOrientationPatient: ordered by InstanceNumber"

    ordered = [members[i][0] for i in order]
    slices, slopes, inters = [], [], []
    shape0 = None
    ps0 = None
    for f in ordered:
        ds = _dcmread(f)
        px = _pixels(ds, f)
        if shape0 is None:
            shape0, ps0 = px.shape, _floats(ds.get("PixelSpacing"))
        elif px.shape != shape0:
            raise MediffError(f"slice size {px.shape} differs from {shape0}: {f}")
        elif (
            ps0
            and _floats(ds.get("PixelSpacing"))
            and np.max(np.abs(np.subtract(_floats(ds.get("PixelSpacing")), ps0))) > 1e-4
        ):
            raise MediffError(f"PixelSpacing differs between slices: {f}")
        slices.append(px)
        s, b = _rescale(ds)
        slopes.append(s)
        inters.append(b)
    stored = np.stack(slices, axis=-1)  # (rows, cols, slices)
    arr = _apply_rescale(stored, slopes, inters, raw, axis=2)

    thickness = (_floats(ref_ds.get("SpacingBetweenSlices")) or _floats(ref_ds.get("SliceThickness")) or [1.0])[0]
    ps = ps0 or [1.0, 1.0]
    if geometry:
        first = np.asarray(positions[order[0]])
        last = np.asarray(positions[order[-1]])
        # Mean step between first and last slice: also right for tilted-gantry CT (sheared affine).
        step = (last - first) / (len(ordered) - 1)
        gaps = np.diff(dist[order])
        if np.max(np.abs(gaps - gaps.mean())) > max(1e-3, 0.01 * gaps.mean()):
            meta["slice_spacing_nonuniform"] = {"min": float(gaps.min()), "max": float(gaps.max())}
            warnings.warn(
                f"{folder}: slice gaps vary from {gaps.min():.3f} to {gaps.max():.3f} mm; the affine uses the mean",
                stacklevel=3,
            )
        affine = _dicom_affine(iop, first, ps, step)
        meta["spacing_known"] = bool(ps0)
    else:
        affine = _affine_from_spacing((ps[0], ps[1], thickness))
        meta["spacing_known"] = False
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))

    meta.update(_dicom_meta(ref_ds, folder))
    meta["axes"] = "row,col,slice"
    meta["n_files"] = len(ordered)
    meta["files"] = [str(f) for f in ordered]
    same = len(set(slopes)) == 1 and len(set(inters)) == 1
    meta["RescaleSlope"] = slopes[0] if same else slopes
    meta["RescaleIntercept"] = inters[0] if same else inters
    modality = str(ref_ds.Modality) if "Modality" in ref_ds else None
    return MedicalImage(arr, affine, spacing, modality, meta)


# --------------------------------------------------------------------------------------------------
# PNG / TIFF, NPY / NPZ
# --------------------------------------------------------------------------------------------------


def _read_pil(p: Path, fmt: str) -> MedicalImage:
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
    return MedicalImage(arr, _affine_from_spacing(spacing), spacing, None, meta)


def _read_npy(p: Path) -> MedicalImage:
    arr = np.load(p, allow_pickle=False)
    spacing = (1.0,) * min(arr.ndim, 3)
    meta = {"format": "npy", "axes": "as stored", "spacing_known": False}
    return MedicalImage(arr, _affine_from_spacing(spacing), spacing, None, meta)


def _read_npz(p: Path, key: str | None) -> MedicalImage:
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
        affine = _affine_from_spacing(spacing)
        meta["spacing_known"] = True
    else:
        spacing = (1.0,) * n_sp
        affine = _affine_from_spacing(spacing)
        meta["spacing_known"] = False
    modality = None
    if modality_arr is not None and modality_arr.ndim == 0 and modality_arr.dtype.kind == "U":
        modality = str(modality_arr) or None
    elif chosen == "hu":
        modality = "CT"  # Hounsfield units only come from CT
    return MedicalImage(arr, affine, spacing, modality, meta)


# --------------------------------------------------------------------------------------------------
# fastMRI HDF5
# --------------------------------------------------------------------------------------------------


def _h5_attr(value: Any) -> Any:
    """HDF5 attribute -> plain Python (JSON-friendly)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_h5_attr(v) for v in value.tolist()] if value.dtype.kind in "SO" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_h5(p: Path) -> Any:
    import h5py

    try:
        return h5py.File(p, "r")
    except _extra_read_errors() as exc:
        raise MediffError(f"cannot open HDF5 {p}: {one_line(exc)}") from exc


def _as_complex64(data: np.ndarray, p: Path) -> np.ndarray:
    if data.dtype.kind == "c":
        return data.astype(np.complex64, copy=False)
    names = data.dtype.names or ()
    # Some converters store complex as a compound (r, i) or (real, imag) type.
    for re_name, im_name in (("r", "i"), ("real", "imag")):
        if re_name in names and im_name in names:
            return (data[re_name] + 1j * data[im_name]).astype(np.complex64)
    raise MediffError(f"'kspace' in {p} is not complex (dtype {data.dtype})")


def read_kspace_h5(path: PathLike, slices: int | slice | None = None) -> dict[str, Any]:
    """Read a fastMRI-style HDF5 file.

    Returns a dict:
      kspace: complex64, (slices, coils, H, W) multi-coil or (slices, H, W) single-coil
        (the slice axis is dropped when ``slices`` is an int, as in numpy indexing).
      mask: float32 sampling mask (fastMRI test files: (W,)) or None.
      reconstruction_rss: float32 (slices, H, W) or None.
      attrs: file attributes as plain Python values (acquisition, max, norm, ...).
      ismrmrd_header: the XML header as str, or None.
    slices: read only these slices (HDF5 reads them lazily: full files can be > 1 GB).
    """
    p = _as_path(path)
    if not p.exists():
        raise MediffError(f"file not found: {p}")
    sel: Any = slice(None) if slices is None else slices
    with _open_h5(p) as f:
        try:
            if "kspace" not in f:
                raise MediffError(f"no 'kspace' dataset in {p} (datasets: {', '.join(f.keys()) or 'none'})")
            kspace = _as_complex64(np.asarray(f["kspace"][sel]), p)
            mask = np.asarray(f["mask"][()], dtype=np.float32) if "mask" in f else None
            rss = np.asarray(f["reconstruction_rss"][sel], dtype=np.float32) if "reconstruction_rss" in f else None
            header = _h5_attr(f["ismrmrd_header"][()]) if "ismrmrd_header" in f else None
            attrs = {k: _h5_attr(v) for k, v in f.attrs.items()}
        except MediffError:
            raise
        except _extra_read_errors() as exc:
            raise MediffError(f"cannot read HDF5 {p}: {one_line(exc)}") from exc
    return {"kspace": kspace, "mask": mask, "reconstruction_rss": rss, "attrs": attrs, "ismrmrd_header": header}


def _ismrmrd_spacing(header: str | None, hw: tuple[int, int]) -> tuple[float, float, float] | None:
    """(slice, row, col) spacing in mm from the ISMRMRD reconSpace, when it matches the image size."""
    if not header:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(header)
        ns = {"m": "http://www.ismrm.org/ISMRMRD"}
        rs = root.find("m:encoding/m:reconSpace", ns)
        mat = [float(rs.find(f"m:matrixSize/m:{a}", ns).text) for a in "xyz"]
        fov = [float(rs.find(f"m:fieldOfView_mm/m:{a}", ns).text) for a in "xyz"]
    except (ET.ParseError, AttributeError, TypeError, ValueError):
        return None
    if (int(mat[1]), int(mat[0])) != tuple(hw) or min(mat) <= 0:
        return None
    return (fov[2] / mat[2], fov[1] / mat[1], fov[0] / mat[0])


def _read_h5_image(p: Path) -> MedicalImage:
    with _open_h5(p) as f:
        if "reconstruction_rss" not in f:
            raise MediffError(
                f"no 'reconstruction_rss' image in {p} (datasets: {', '.join(f.keys())}); "
                "use read_kspace_h5 for k-space"
            )
        arr = np.asarray(f["reconstruction_rss"][()], dtype=np.float32)
        header = _h5_attr(f["ismrmrd_header"][()]) if "ismrmrd_header" in f else None
        attrs = {k: _h5_attr(v) for k, v in f.attrs.items()}
    spacing = _ismrmrd_spacing(header, arr.shape[-2:]) if arr.ndim == 3 else None
    meta = {
        "format": "hdf5",
        "dataset": "reconstruction_rss",
        "axes": "slice,row,col",
        "attrs": attrs,
        "spacing_known": spacing is not None,
    }
    spacing = spacing or (1.0,) * min(arr.ndim, 3)
    modality = "MR"  # fastMRI files are MRI raw data
    return MedicalImage(arr, _affine_from_spacing(spacing), spacing, modality, meta)


# --------------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------------


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise MediffError(f"output path is a folder, expected a file: {path}")
    if path.exists() and not overwrite:
        raise MediffError(f"refusing to overwrite existing {path} (pass overwrite=True)")
    if not path.parent.is_dir():
        raise MediffError(f"output folder does not exist: {path.parent} (for {path})")


def _temp_sibling(path: Path) -> Path:
    """A new empty file next to ``path`` whose name keeps path's extension (nibabel picks gzip by it).

    Opened with O_EXCL and mode 0o666 so the final file gets normal umask permissions (mkstemp's
    0o600 would survive the rename).
    """
    for _ in range(100):
        tmp = path.with_name(f".mediff-tmp-{secrets.token_hex(6)}-{path.name}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise MediffError(f"cannot create a temporary file next to {path}")  # pragma: no cover


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temp file to ``path`` in one step."""
    if overwrite:
        os.replace(tmp, path)
        return
    # os.link fails if ``path`` appeared meanwhile: a no-clobber rename without a check-then-act race.
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise MediffError(f"refusing to overwrite existing {path} (pass overwrite=True)") from exc
    except OSError:
        # Filesystems without hard links: best effort.
        if path.exists():
            raise MediffError(f"refusing to overwrite existing {path} (pass overwrite=True)") from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def atomic_write(path: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temp file in path's folder, then move it to ``path``; never leaves the temp.

    The one atomic writer of the package (images, checkpoints, reports all go through it)."""
    _check_target(path, overwrite)
    tmp = _temp_sibling(path)
    try:
        write(tmp)
        _fsync(tmp)
        _commit(tmp, path, overwrite)
    except OSError as exc:
        raise MediffError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _unpack(
    image: np.ndarray | MedicalImage, affine: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, MedicalImage | None]:
    if isinstance(image, MedicalImage):
        return image.array, (image.affine if affine is None else np.asarray(affine, dtype=np.float64)), image
    return np.asarray(image), (None if affine is None else np.asarray(affine, dtype=np.float64)), None


def _check_affine(affine: np.ndarray | None, path: Path) -> None:
    if affine is not None and (affine.shape != (4, 4) or not np.all(np.isfinite(affine))):
        raise MediffError(f"affine for {path} must be a finite 4x4 matrix, got shape {affine.shape}")


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def write_nifti(
    path: PathLike, array: np.ndarray | MedicalImage, affine: np.ndarray | None = None, *, overwrite: bool = False
) -> Path:
    """Write a NIfTI-1 file (.nii or .nii.gz); array axes follow the affine (default identity, 1 mm).

    The affine (voxel -> RAS mm) is stored as both sform and qform (code 1, scanner). Dtype is kept,
    except bool -> uint8, float16 -> float32, 64-bit ints -> int32 when the values fit.
    """
    import nibabel as nib

    p = _as_path(path)
    if _suffix(p) not in (".nii", ".nii.gz"):
        raise MediffError(f"NIfTI output must end in .nii or .nii.gz: {p}")
    arr, aff, _ = _unpack(array, affine)
    aff = np.eye(4) if aff is None else aff
    _check_affine(aff, p)
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

    p = _as_path(path)
    if _suffix(p) != ".png":
        raise MediffError(f"PNG output must end in .png: {p}")
    if bits not in (8, 16):
        raise MediffError(f"bits must be 8 or 16, got {bits}")
    arr, _, _ = _unpack(array, None)
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


def write_npz(path: PathLike, *, overwrite: bool = False, compress: bool = True, **arrays: Any) -> Path:
    """Write arrays to an .npz (compressed by default). Object arrays are refused: read_image loads
    NPZ without pickle. To be read back with geometry, pass ``image=..., affine=(4,4)``."""
    p = _as_path(path)
    if _suffix(p) != ".npz":
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


def write_image(path: PathLike, image: MedicalImage | np.ndarray, *, overwrite: bool = False) -> Path | list[Path]:
    """Write by extension: .nii/.nii.gz, .png (2D, windowed), .npz (image + affine + spacing), .dcm
    (2D) or a path without extension (a DICOM series folder for 3D)."""
    p = _as_path(path)
    img = image if isinstance(image, MedicalImage) else MedicalImage(np.asarray(image))
    suffix = _suffix(p)
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


# ----- DICOM writing -------------------------------------------------------------------------------

_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_REFERENCE_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientPosition",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "BodyPartExamined",
    "Manufacturer",
)


def _ds_number(x: float) -> Any:
    """A Decimal String value within DICOM's 16-character limit."""
    from pydicom.valuerep import DSfloat

    return DSfloat(float(x), auto_format=True)


def _default_dicom_affine(spacing: Sequence[float]) -> np.ndarray:
    """Axial, DICOM-standard orientation (IOP = 1,0,0,0,1,0 in LPS): rows go posterior, columns go left,
    slices go superior. Right-handed in DICOM's sense, so a written series reads back in the same order."""
    dr, dc, ds = (list(spacing) + [1.0, 1.0, 1.0])[:3]
    aff = np.zeros((4, 4))
    aff[:3, 0] = [0.0, -dr, 0.0]  # RAS: posterior is -y
    aff[:3, 1] = [-dc, 0.0, 0.0]  # RAS: left is -x
    aff[:3, 2] = [0.0, 0.0, ds]
    aff[3, 3] = 1.0
    return aff


def _quantise(
    x: np.ndarray, modality: str, slope: float | None, intercept: float | None, p: Path
) -> tuple[np.ndarray, float, float]:
    """Physical values -> (stored int16/uint16 values, slope, intercept) with x ~= stored*slope + intercept."""
    if not np.all(np.isfinite(x)):
        raise MediffError(f"array for {p} contains NaN or inf")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    integer_valued = bool(np.all(x == np.rint(x)))
    if slope is None and intercept is None and modality == "CT":
        slope, intercept = 1.0, -1024.0  # the usual CT convention: stored = HU + 1024
    elif slope is None and intercept is None:
        if integer_valued and lo >= 0 and hi <= 65535:
            slope, intercept = 1.0, 0.0
        elif integer_valued and lo >= -32768 and hi <= 32767:
            slope, intercept = 1.0, 0.0
        else:
            # Real-valued data: spread over the integer range, intercept 0 so that 0 stays exactly 0.
            peak = max(abs(lo), abs(hi)) or 1.0
            slope, intercept = peak / (65535.0 if lo >= 0 else 32767.0), 0.0
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    if slope == 0:
        raise MediffError(f"RescaleSlope must be non-zero for {p}")
    # Quantise with the values exactly as they will be written (DS strings are rounded).
    slope, intercept = float(_ds_number(slope)), float(_ds_number(intercept))
    stored = np.rint((x.astype(np.float64) - intercept) / slope)
    smin, smax = (float(stored.min()), float(stored.max())) if stored.size else (0.0, 0.0)
    fits_int16 = smin >= -32768 and smax <= 32767
    if fits_int16 and (modality == "CT" or smin < 0):
        return stored.astype("<i2"), slope, intercept
    # CT stays signed 16 bit (what scanners and viewers expect); MR may use the unsigned range.
    if modality != "CT" and smin >= 0 and smax <= 65535:
        return stored.astype("<u2"), slope, intercept
    raise MediffError(
        f"values {lo:g}..{hi:g} do not fit 16-bit DICOM with slope {slope:g}, intercept {intercept:g} for {p}: "
        "pass slope=/intercept="
    )


def _reference_dataset(reference: Any) -> Any:
    if reference is None:
        return None
    if isinstance(reference, (str, os.PathLike)):
        return _dcmread(_as_path(reference), stop_before_pixels=True)
    return reference  # a pydicom Dataset


def _build_dicom_slice(
    stored: np.ndarray,
    *,
    modality: str,
    slope: float,
    intercept: float,
    affine: np.ndarray,
    k: int,
    n_slices: int,
    series: dict[str, Any],
    ref: Any,
) -> Any:
    """One DICOM dataset for slice ``k`` (stored: (rows, cols) int16/uint16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    sop_uid = generate_uid()
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=fm, preamble=b"\x00" * 128)

    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, in case descriptions are not ASCII
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["DERIVED", "SECONDARY"]  # these images are computed, not acquired
    now = _dt.datetime.now()
    ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = now.strftime("%H%M%S")
    ds.Modality = modality
    ds.PatientName = "Anonymous^Mediff"
    ds.PatientID = "MEDIFF"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.PatientPosition = ""
    ds.PositionReferenceIndicator = ""
    ds.StudyInstanceUID = series["study_uid"]
    ds.FrameOfReferenceUID = series["frame_uid"]
    if ref is not None:
        for kw in _REFERENCE_TAGS:
            if kw in ref:
                setattr(ds, kw, ref[kw].value)
    ds.SeriesInstanceUID = series["series_uid"]
    ds.SeriesNumber = series["series_number"]
    ds.SeriesDescription = series["description"]
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.ImageComments = "written by mediff"
    ds.BurnedInAnnotation = "NO"

    # Geometry: RAS affine -> LPS, columns (row step, col step, slice step).
    lps = _LPS_RAS @ affine
    row_step, col_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    d_row, d_col = float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))
    row_cos, col_cos = col_step / d_col, row_step / d_row  # DICOM "row cosine" = direction along a row
    ipp = lps[:3, 3] + k * slice_step
    normal = np.cross(row_cos, col_cos)
    thickness = float(np.linalg.norm(slice_step))
    ds.ImageOrientationPatient = [_ds_number(round(v, 8)) for v in (*row_cos, *col_cos)]
    ds.ImagePositionPatient = [_ds_number(v) for v in ipp]
    ds.PixelSpacing = [_ds_number(d_row), _ds_number(d_col)]
    ds.SliceThickness = _ds_number(thickness)
    if n_slices > 1:
        ds.SpacingBetweenSlices = _ds_number(abs(float(np.dot(slice_step, normal))))
    ds.SliceLocation = _ds_number(float(np.dot(ipp, normal)))

    if modality == "CT":
        ds.KVP = ""
        ds.RescaleType = "HU"
    else:
        ds.ScanningSequence = "RM"  # research mode: no real acquisition behind these pixels
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D" if n_slices == 1 else "3D"
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
    if modality == "CT" or slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = _ds_number(slope)
        ds.RescaleIntercept = _ds_number(intercept)
        if modality != "CT":
            ds.RescaleType = "US"  # unspecified units

    signed = stored.dtype.kind == "i"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    phys = stored.astype(np.float64) * slope + intercept
    if phys.size:
        lo, hi = float(phys.min()), float(phys.max())
        ds.WindowCenter = _ds_number((lo + hi) / 2)
        ds.WindowWidth = _ds_number(max(hi - lo, 1.0))
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def write_dicom(
    path: PathLike,
    array: np.ndarray | MedicalImage,
    *,
    modality: str = "MR",
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    reference: Any = None,
    series_description: str = "mediff",
    overwrite: bool = False,
) -> list[Path]:
    """Write a 2D slice (rows, cols) as one DICOM file, or a volume (rows, cols, slices) as a series
    folder ``path/IM_00001.dcm ...`` (one SeriesInstanceUID, IPP advancing along the affine's slice axis).

    array: physical values (HU for CT). Stored as 16-bit ints with RescaleSlope/Intercept: CT defaults
        to slope 1, intercept -1024 (int16); MR integers are stored as is, MR reals are scaled.
    spacing: (row, col[, slice]) mm when no affine is given (default 1 mm, axial DICOM orientation).
    affine: voxel (row, col, slice) -> RAS mm. If its slice axis points against row x col
        (det(affine[:3,:3]) > 0), read_image returns the slices in reverse order (same geometry).
    reference: pydicom Dataset or DICOM path whose patient/study tags are copied (same study).
    Returns the written file paths. Atomic: a series is built in a temp folder and renamed.
    """
    p = _as_path(path)
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise MediffError(f"write_dicom supports modality MR or CT, got {modality!r} (for {p})")
    arr, aff, src = _unpack(array, affine)
    if src is not None and spacing is None and affine is None and not src.meta.get("spacing_known", True):
        aff = None  # an image without geometry: use the default DICOM orientation below
    if arr.ndim == 3 and arr.shape[-1] == 1 and _suffix(p) == ".dcm":
        arr = arr[..., 0]
    if arr.ndim == 3 and _suffix(p) == ".dcm":
        raise MediffError(f"a 3D volume is written as a series folder: give a folder path, not {p}")
    if arr.ndim not in (2, 3):
        raise MediffError(f"write_dicom needs (rows, cols) or (rows, cols, slices), got shape {arr.shape} for {p}")
    if np.iscomplexobj(arr):
        raise MediffError(f"DICOM cannot hold complex data (take np.abs first): {p}")
    if aff is None:
        aff = _default_dicom_affine(spacing if spacing is not None else (1.0, 1.0, 1.0))
    _check_affine(aff, p)
    if min(np.linalg.norm(aff[:3, :2], axis=0)) <= 0:
        raise MediffError(f"affine for {p} has a zero pixel spacing")
    stored, slope_v, inter_v = _quantise(np.asarray(arr), modality, slope, intercept, p)
    ref = _reference_dataset(reference)

    from pydicom.uid import generate_uid

    series = {
        "series_uid": generate_uid(),
        "study_uid": generate_uid(),
        "frame_uid": generate_uid(),
        "series_number": 1000 + secrets.randbelow(9000),
        "description": series_description,
    }
    if arr.ndim == 2:
        ds = _build_dicom_slice(
            stored,
            modality=modality,
            slope=slope_v,
            intercept=inter_v,
            affine=aff,
            k=0,
            n_slices=1,
            series=series,
            ref=ref,
        )
        atomic_write(p, overwrite, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
        return [p]
    return _write_dicom_series(p, stored, modality, slope_v, inter_v, aff, series, ref, overwrite)


def _write_dicom_series(
    p: Path,
    stored: np.ndarray,
    modality: str,
    slope: float,
    intercept: float,
    aff: np.ndarray,
    series: dict[str, Any],
    ref: Any,
    overwrite: bool,
) -> list[Path]:
    if p.exists() and not p.is_dir():
        raise MediffError(f"a 3D DICOM series is written to a folder, but {p} is a file")
    existing = [e for e in p.iterdir()] if p.is_dir() else []
    if existing and not overwrite:
        raise MediffError(f"refusing to write a series into non-empty folder {p} (pass overwrite=True)")
    foreign = [e.name for e in existing if not _DICOM_SERIES_FILE.fullmatch(e.name)]
    if foreign:
        # Never delete files we did not write; mixing series in one folder breaks reading.
        raise MediffError(f"folder {p} holds files not written by mediff ({foreign[0]}, ...): choose an empty folder")
    if not p.parent.is_dir():
        raise MediffError(f"output folder does not exist: {p.parent} (for {p})")

    n = stored.shape[2]
    names = [f"IM_{k + 1:05d}.dcm" for k in range(n)]
    tmpdir = p.with_name(f".mediff-tmp-{secrets.token_hex(6)}-{p.name}")
    try:
        tmpdir.mkdir()
        for k in range(n):
            ds = _build_dicom_slice(
                stored[:, :, k],
                modality=modality,
                slope=slope,
                intercept=intercept,
                affine=aff,
                k=k,
                n_slices=n,
                series=series,
                ref=ref,
            )
            ds.save_as(tmpdir / names[k], enforce_file_format=True)
            _fsync(tmpdir / names[k])
        if not existing:
            # POSIX rename() replaces a missing or empty folder in one step: no one sees half a series.
            os.rename(tmpdir, p)
        else:
            for e in existing:
                e.unlink()
            for name in names:
                os.replace(tmpdir / name, p / name)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise MediffError(f"{p} was created by someone else while writing; nothing written") from exc
        raise MediffError(f"cannot write DICOM series {p}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return [p / name for name in names]


# --------------------------------------------------------------------------------------------------
# Slices <-> volumes
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# describe (for `mediff info`)
# --------------------------------------------------------------------------------------------------


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
    p = _as_path(path)
    fmt = detect_format(p)
    info: dict[str, Any] = {"path": str(p), "format": fmt}
    if fmt == "hdf5":
        with _open_h5(p) as f:
            try:
                if "kspace" in f:
                    ks = f["kspace"]
                    info["kspace_shape"] = list(ks.shape)
                    info["kspace_dtype"] = str(ks.dtype)
                    info["slices"] = int(ks.shape[0]) if ks.ndim >= 3 else 1
                    # fastMRI: (slices, coils, H, W) is multi-coil, (slices, H, W) single-coil.
                    info["coils"] = int(ks.shape[1]) if ks.ndim == 4 else 1
                info["datasets"] = sorted(f.keys())
                info["attrs"] = {k: _h5_attr(v) for k, v in f.attrs.items()}
            except _extra_read_errors() as exc:
                raise MediffError(f"cannot read HDF5 {p}: {one_line(exc)}") from exc
            has_image = "reconstruction_rss" in f
        if not has_image:
            if "kspace" not in info.get("datasets", []):
                raise MediffError(f"HDF5 {p} has neither 'kspace' nor 'reconstruction_rss'")
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
