"""DICOM reading: single and multi-frame files, series folders (slices ordered along the normal), and
the Modality of either from headers alone."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mediff.errors import MediffError, one_line
from mediff.io.image import MedicalImage, PathLike, affine_from_spacing, as_path, read_errors

# DICOM stores patient coordinates in LPS, nibabel/NIfTI in RAS: flipping x and y converts both ways.
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _has_dicm_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dcmread(p: Path, stop_before_pixels: bool = False) -> Any:
    """The pydicom Dataset of ``p`` (headers only with ``stop_before_pixels``); MediffError if unreadable."""
    import pydicom

    try:
        # force=True only for files without the standard preamble (old ACR-NEMA style exports).
        return pydicom.dcmread(str(p), force=not _has_dicm_preamble(p), stop_before_pixels=stop_before_pixels)
    except read_errors() as exc:
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
    except (*read_errors(), AttributeError) as exc:
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
    return LPS_RAS @ m


def _slice_normal(iop: Sequence[float]) -> np.ndarray:
    n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:6], float))
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise MediffError("ImageOrientationPatient has parallel row and column directions")
    return n / norm


def _dicom_meta(ds: Any) -> dict[str, Any]:
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


def read_dicom_file(p: Path, raw: bool) -> MedicalImage:
    """One DICOM file: (row, col), or (row, col, frame) when multi-frame; physical units unless ``raw``."""
    ds = dcmread(p)
    if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
        raise MediffError(f"{p} is a DICOMDIR index, not an image: read the folder that holds the images")
    stored = _pixels(ds, p)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    meta = _dicom_meta(ds)
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
        affine = affine_from_spacing((row_sp, col_sp, thickness))
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


def holds_dicom(folder: PathLike) -> bool:
    """Whether ``folder`` directly holds DICOM files (by preamble or extension): it is then one series."""
    p = as_path(folder)
    return p.is_dir() and any(f.is_file() and not f.name.startswith(".") and (
        f.suffix.lower() in (".dcm", ".dicom", ".ima") or _has_dicm_preamble(f)) for f in p.iterdir())


def first_dicom(path: PathLike) -> Path:
    """A DICOM file itself, or the first DICOM file (by name) of a series folder: whose patient and
    study tags a derived series copies, and whose header tells what the input is."""
    p = as_path(path)
    return _series_files(p)[0] if p.is_dir() else p


def dicom_modality(path: PathLike) -> str:
    """The Modality tag ("CT", "MR", ...) of a DICOM file, or of the first file of a series folder.

    Reads headers only, so deciding how to treat an input costs no pixel decoding. Returns "" when
    the tag is absent; raises ``MediffError`` when the file or folder holds no readable DICOM.
    """
    return str(dcmread(first_dicom(path), stop_before_pixels=True).get("Modality", "") or "").strip().upper()


# (file, header-only Dataset) of each file of one series.
_Members = list[tuple[Path, Any]]


def read_dicom_series(folder: Path, raw: bool, series_uid: str | None) -> MedicalImage:
    """A series folder as (row, col, slice), slices ascending along the normal; the series is ``series_uid``,
    else the only or the largest one (a tie raises). Physical units unless ``raw``."""
    by_series = _headers_by_series(_series_files(folder))
    meta: dict[str, Any] = {"format": "dicom-series"}
    members = by_series[_choose_series(by_series, series_uid, folder, meta)]
    for f, ds in members:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 and len(members) > 1:
            raise MediffError(f"series of multi-frame DICOM files is not supported: {f} (read the file itself)")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise MediffError(f"colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}) is not supported: {f}")
    if len(members) == 1:
        return _read_one_file_series(members[0][0], raw, meta)

    # Order slices by position along the normal; filenames and InstanceNumber are unreliable.
    geometry = _series_geometry(members)
    if geometry is None:
        # No geometry: fall back to InstanceNumber and say so.
        order = np.argsort([int(ds.get("InstanceNumber", 0) or 0) for _, ds in members], kind="stable")
        meta["geometry_note"] = "missing ImagePositionPatient/ImageOrientationPatient: ordered by InstanceNumber"
    else:
        order = _order_by_position(members, *geometry, folder)
    ordered = [members[i][0] for i in order]
    stored, slopes, inters, ps0 = _read_slice_pixels(ordered)
    arr = _apply_rescale(stored, slopes, inters, raw, axis=2)

    ref_ds = members[0][1]
    ps = ps0 or [1.0, 1.0]
    if geometry is None:
        thickness = (_floats(ref_ds.get("SpacingBetweenSlices")) or _floats(ref_ds.get("SliceThickness")) or [1.0])[0]
        affine = affine_from_spacing((ps[0], ps[1], thickness))
        meta["spacing_known"] = False
    else:
        iop, positions = geometry
        affine = _stack_affine(iop, [positions[i] for i in order], ps, folder, meta)
        meta["spacing_known"] = bool(ps0)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))

    meta.update(_dicom_meta(ref_ds))
    meta["axes"] = "row,col,slice"
    meta["n_files"] = len(ordered)
    meta["files"] = [str(f) for f in ordered]
    same = len(set(slopes)) == 1 and len(set(inters)) == 1
    meta["RescaleSlope"] = slopes[0] if same else slopes
    meta["RescaleIntercept"] = inters[0] if same else inters
    modality = str(ref_ds.Modality) if "Modality" in ref_ds else None
    return MedicalImage(arr, affine, spacing, modality, meta)


def _headers_by_series(files: list[Path]) -> dict[str, _Members]:
    """The files grouped by SeriesInstanceUID, each with its header.

    Headers only: choosing the series needs no pixel data, and skipping pixels is much faster.
    """
    by_series: dict[str, _Members] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or "Rows" not in ds:
            raise MediffError(f"not a DICOM image (no SeriesInstanceUID/Rows): {f}")
        by_series.setdefault(uid, []).append((f, ds))
    return by_series


def _choose_series(by_series: dict[str, _Members], series_uid: str | None, folder: Path, meta: dict[str, Any]) -> str:
    """The UID to read: ``series_uid``, the only series, or the one with most files (noted in ``meta``)."""
    if series_uid is not None:
        if series_uid not in by_series:
            raise MediffError(f"series {series_uid} not in {folder} (found: {', '.join(sorted(by_series))})")
        return series_uid
    if len(by_series) == 1:
        return next(iter(by_series))
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
    return chosen


def _read_one_file_series(f: Path, raw: bool, meta: dict[str, Any]) -> MedicalImage:
    """A series of one file, read as that file; a folder is always a volume, so one slice is (rows, cols, 1)."""
    img = read_dicom_file(f, raw)
    if img.array.ndim == 2:
        # The affine already has the slice-normal step in its third column.
        img.array = img.array[:, :, None]
        img.spacing = tuple(float(v) for v in np.linalg.norm(img.affine[:3, :3], axis=0))
        img.meta["axes"] = "row,col,slice"
    img.meta.update(meta, format="dicom-series", n_files=1, files=[str(f)])
    return img


def _series_geometry(members: _Members) -> tuple[list[float], list[list[float]]] | None:
    """(ImageOrientationPatient of the first file, ImagePositionPatient of each), or None if any is missing."""
    iop = _floats(members[0][1].get("ImageOrientationPatient"))
    positions = [_floats(ds.get("ImagePositionPatient")) for _, ds in members]
    if iop and len(iop) == 6 and all(pos and len(pos) == 3 for pos in positions):
        return iop, positions
    return None


def _order_by_position(
    members: _Members, iop: Sequence[float], positions: Sequence[Sequence[float]], folder: Path
) -> np.ndarray:
    """Indices of ``members`` by ascending position along the normal ``row_cos x col_cos``.

    All slices must share the orientation, and no two a position (a multi-echo or temporal series
    stacks several images at each position: one stack cannot hold it).
    """
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
    return order


def _read_slice_pixels(ordered: list[Path]) -> tuple[np.ndarray, list[float], list[float], list[float] | None]:
    """Stored pixels of the slices stacked as (rows, cols, slices), their rescale slopes and intercepts,
    and the PixelSpacing of the first (every slice must match its size and spacing)."""
    slices, slopes, inters = [], [], []
    shape0 = None
    ps0 = None
    for f in ordered:
        ds = dcmread(f)
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
    return np.stack(slices, axis=-1), slopes, inters, ps0


def _stack_affine(
    iop: Sequence[float], positions: Sequence[Sequence[float]], ps: Sequence[float], folder: Path, meta: dict[str, Any]
) -> np.ndarray:
    """RAS affine of slices at ``positions`` (in slice order), stepping by the mean gap; uneven gaps are
    recorded in ``meta`` and warned about."""
    first = np.asarray(positions[0])
    last = np.asarray(positions[-1])
    # Mean step between first and last slice: also right for tilted-gantry CT (sheared affine).
    step = (last - first) / (len(positions) - 1)
    normal = _slice_normal(iop)
    gaps = np.diff([np.dot(normal, pos) for pos in positions])
    if np.max(np.abs(gaps - gaps.mean())) > max(1e-3, 0.01 * gaps.mean()):
        meta["slice_spacing_nonuniform"] = {"min": float(gaps.min()), "max": float(gaps.max())}
        warnings.warn(
            f"{folder}: slice gaps vary from {gaps.min():.3f} to {gaps.max():.3f} mm; the affine uses the mean",
            stacklevel=4,  # attributed to read_image: _stack_affine < read_dicom_series < its reader lambda
        )
    return _dicom_affine(iop, first, ps, step)
