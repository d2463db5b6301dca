"""DICOM writing: a 2D slice as one file, a volume as a series folder; physical values are quantised
to 16-bit integers with RescaleSlope/Intercept."""

from __future__ import annotations

import datetime as _dt
import errno
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mediff.errors import MediffError
from mediff.io.atomic import atomic_write, fsync, temp_path
from mediff.io.dicom_read import LPS_RAS, dcmread
from mediff.io.image import MedicalImage, PathLike, as_path, check_affine, path_suffix, unpack_image

_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
# Patient and study tags copied from write_dicom's reference=, so the output joins that study.
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

# File names of a written series (IM_00001.dcm, ...): the only files rewriting a series may replace.
_DICOM_SERIES_FILE = re.compile(r"IM_\d{5}\.dcm")


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
        return dcmread(as_path(reference), stop_before_pixels=True)
    return reference  # a pydicom Dataset


@dataclass(frozen=True)
class _Series:
    """What every slice of one written series shares."""

    modality: str  # "MR" or "CT"
    slope: float  # RescaleSlope/Intercept of the stored values
    intercept: float
    affine: np.ndarray  # (4, 4) voxel (row, col, slice) -> RAS mm
    n_slices: int
    description: str
    ref: Any  # pydicom Dataset whose patient/study tags are copied, or None
    series_uid: str
    study_uid: str
    frame_uid: str
    number: int


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
    reference: pydicom Dataset or DICOM path whose patient/study tags are copied (same study), and
        its SliceThickness when it has one (images derived from it keep the acquired thickness).
    Returns the written file paths. Atomic: a series is built in a temp folder and renamed.
    """
    p = as_path(path)
    modality = modality.upper()
    arr, aff = _dicom_input(p, array, modality, spacing, affine)
    stored, slope_v, inter_v = _quantise(np.asarray(arr), modality, slope, intercept, p)
    ref = _reference_dataset(reference)

    from pydicom.uid import generate_uid

    series = _Series(
        modality=modality,
        slope=slope_v,
        intercept=inter_v,
        affine=aff,
        n_slices=arr.shape[2] if arr.ndim == 3 else 1,
        description=series_description,
        ref=ref,
        series_uid=generate_uid(),
        study_uid=generate_uid(),
        frame_uid=generate_uid(),
        number=1000 + secrets.randbelow(9000),
    )
    if arr.ndim == 2:
        ds = _build_dicom_slice(stored, 0, series)
        atomic_write(p, overwrite, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
        return [p]
    return _write_dicom_series(p, stored, series, overwrite)


def _dicom_input(
    p: Path,
    array: np.ndarray | MedicalImage,
    modality: str,
    spacing: Sequence[float] | None,
    affine: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """write_dicom's checked input: real (rows, cols) or (rows, cols, slices) values and the RAS affine
    (the default axial one when neither the image nor the caller gives geometry)."""
    if modality not in _SOP_CLASS:
        raise MediffError(f"write_dicom supports modality MR or CT, got {modality!r} (for {p})")
    arr, aff, src = unpack_image(array, affine)
    if src is not None and spacing is None and affine is None and not src.meta.get("spacing_known", True):
        aff = None  # an image without geometry: use the default DICOM orientation below
    if arr.ndim == 3 and arr.shape[-1] == 1 and path_suffix(p) == ".dcm":
        arr = arr[..., 0]
    if arr.ndim == 3 and path_suffix(p) == ".dcm":
        raise MediffError(f"a 3D volume is written as a series folder: give a folder path, not {p}")
    if arr.ndim not in (2, 3):
        raise MediffError(f"write_dicom needs (rows, cols) or (rows, cols, slices), got shape {arr.shape} for {p}")
    if np.iscomplexobj(arr):
        raise MediffError(f"DICOM cannot hold complex data (take np.abs first): {p}")
    if aff is None:
        aff = _default_dicom_affine(spacing if spacing is not None else (1.0, 1.0, 1.0))
    check_affine(aff, p)
    if min(np.linalg.norm(aff[:3, :2], axis=0)) <= 0:
        raise MediffError(f"affine for {p} has a zero pixel spacing")
    return arr, aff


def _build_dicom_slice(stored: np.ndarray, k: int, series: _Series) -> Any:
    """One DICOM dataset for slice ``k`` of ``series`` (stored: (rows, cols) int16/uint16)."""
    ds = _new_dataset(series.modality)
    _set_study_and_series(ds, k, series)
    _set_geometry(ds, k, series.affine, series.n_slices)
    if series.ref is not None and series.ref.get("SliceThickness", None):
        ds.SliceThickness = series.ref.SliceThickness  # the acquired thickness, not the slice spacing
    _set_acquisition(ds, series)
    _set_pixels(ds, stored, series.slope, series.intercept)
    return ds


def _new_dataset(modality: str) -> Any:
    """An empty image dataset of the modality's SOP class, with its file meta and a new SOP instance UID."""
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
    ds.Modality = modality
    return ds


def _set_study_and_series(ds: Any, k: int, series: _Series) -> None:
    """Dates, anonymous patient and study (or the reference's), series and instance numbering."""
    now = _dt.datetime.now()
    ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = now.strftime("%H%M%S")
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
    ds.StudyInstanceUID = series.study_uid
    ds.FrameOfReferenceUID = series.frame_uid
    if series.ref is not None:
        for kw in _REFERENCE_TAGS:
            if kw in series.ref:
                setattr(ds, kw, series.ref[kw].value)
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.ImageComments = "written by mediff"
    ds.BurnedInAnnotation = "NO"


def _set_geometry(ds: Any, k: int, affine: np.ndarray, n_slices: int) -> None:
    """Orientation, position of slice ``k``, pixel spacing and slice spacing from the RAS affine."""
    # RAS affine -> LPS, columns (row step, col step, slice step).
    lps = LPS_RAS @ affine
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


def _set_acquisition(ds: Any, series: _Series) -> None:
    """The modality's required acquisition tags (empty or "research mode": nothing was acquired) and the
    rescale (always for CT, whose values are HU; for MR only when it is not the identity)."""
    if series.modality == "CT":
        ds.KVP = ""
        ds.RescaleType = "HU"
    else:
        ds.ScanningSequence = "RM"  # research mode: no real acquisition behind these pixels
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D" if series.n_slices == 1 else "3D"
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
    if series.modality == "CT" or series.slope != 1.0 or series.intercept != 0.0:
        ds.RescaleSlope = _ds_number(series.slope)
        ds.RescaleIntercept = _ds_number(series.intercept)
        if series.modality != "CT":
            ds.RescaleType = "US"  # unspecified units


def _set_pixels(ds: Any, stored: np.ndarray, slope: float, intercept: float) -> None:
    """16-bit monochrome pixel data and a display window spanning the slice's physical values."""
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


def _write_dicom_series(p: Path, stored: np.ndarray, series: _Series, overwrite: bool) -> list[Path]:
    """Write (rows, cols, slices) as ``p/IM_00001.dcm ...``: built in a temp folder, then moved in."""
    existing = _series_folder_contents(p, overwrite)
    names = [f"IM_{k + 1:05d}.dcm" for k in range(series.n_slices)]
    tmpdir = temp_path(p)
    try:
        tmpdir.mkdir()
        for k, name in enumerate(names):
            _build_dicom_slice(stored[:, :, k], k, series).save_as(tmpdir / name, enforce_file_format=True)
            fsync(tmpdir / name)
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


def _series_folder_contents(p: Path, overwrite: bool) -> list[Path]:
    """The files a series write to folder ``p`` replaces (none for a new or empty folder); refuses a file,
    a non-empty folder without ``overwrite``, and a folder holding files mediff did not write."""
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
    return existing
