"""fastMRI-style HDF5: k-space (with mask, attributes and ISMRMRD header), the reconstruction_rss image,
and the summary ``describe`` shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mediff.errors import MediffError, one_line
from mediff.io.image import MedicalImage, PathLike, affine_from_spacing, as_path, read_errors


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
    except read_errors() as exc:
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
      single_coil: whether the file holds fastMRI's single-coil target ``reconstruction_esc``, so a
        3D kspace is (slices, H, W) rather than one slice's (coils, H, W).
    slices: read only these slices (HDF5 reads them lazily: full files can be > 1 GB).
    """
    p = as_path(path)
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
            single_coil = "reconstruction_esc" in f
        except MediffError:
            raise
        except read_errors() as exc:
            raise MediffError(f"cannot read HDF5 {p}: {one_line(exc)}") from exc
    return {"kspace": kspace, "mask": mask, "reconstruction_rss": rss, "attrs": attrs, "ismrmrd_header": header,
            "single_coil": single_coil}


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


def read_h5_image(p: Path) -> MedicalImage:
    """The ``reconstruction_rss`` image of a fastMRI file, float32 (slice, row, col); spacing from the
    ISMRMRD header when it matches the image size, else 1 mm."""
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
    return MedicalImage(arr, affine_from_spacing(spacing), spacing, modality, meta)


def summarize_h5(p: Path) -> tuple[dict[str, Any], bool]:
    """What ``describe`` shows of a fastMRI HDF5 file, and whether it holds a ``reconstruction_rss`` image.

    The dict has kspace_shape, kspace_dtype, slices and coils when there is k-space, and always datasets
    and attrs. A file with neither k-space nor an image raises MediffError.
    """
    info: dict[str, Any] = {}
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
        except read_errors() as exc:
            raise MediffError(f"cannot read HDF5 {p}: {one_line(exc)}") from exc
        has_image = "reconstruction_rss" in f
    if not has_image and "kspace" not in info.get("datasets", []):
        raise MediffError(f"HDF5 {p} has neither 'kspace' nor 'reconstruction_rss'")
    return info, has_image
