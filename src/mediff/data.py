"""Training data: 2D slices with subject labels (for subject-level splits) and optional covariates.

Two intensity units (``intensity``):

- "percentile" (MR and other relative-intensity images): every slice is normalised on its own, 0
  stays 0 and the slice's 99.5th percentile becomes 1.
- "hu" (CT): one fixed window for all slices, u = (HU - hu_min) / (hu_max - hu_min) with
  [hu_min, hu_max] = HU_WINDOW, clipped below at air (u = 0). HU carry physical meaning, so a
  per-slice scale would throw it away; values above hu_max (bone, contrast) stay above 1.

"auto" picks "hu" for an NPZ holding ``hu`` and for data with values below -500 (only CT has
them), else "percentile". The choice is recorded in the prior's metadata (``SliceSet.normalization``).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mediff.errors import MediffError

PERCENTILE = 99.5
HU_WINDOW = (-1000.0, 1000.0)  # u = 0 at air, u = 1 at +1000 HU; the CT metric window of mediff.recon.ct
INTENSITIES = ("auto", "percentile", "hu")


@dataclass
class SliceSet:
    """images (N, 1, S, S) float32 in normalised units; subjects (N,) str; covariates (N, K) or None;
    pixel_spacing_mm (N,) float: each slice's in-plane pixel size on the S x S grid (after any
    downsampling), or None when the data do not say."""

    images: Tensor
    subjects: np.ndarray
    covariates: Tensor | None
    covariate_spec: dict | None
    fingerprint: str
    source: str
    normalization: dict = field(default_factory=lambda: {"kind": "percentile", "percentile": PERCENTILE})
    pixel_spacing_mm: np.ndarray | None = None

    @property
    def is_hu(self) -> bool:
        return self.normalization["kind"] == "hu_window"

    def subset(self, idx: np.ndarray) -> "SliceSet":
        t = torch.as_tensor(idx, dtype=torch.long)
        cov = self.covariates[t] if self.covariates is not None else None
        return SliceSet(self.images[t], self.subjects[idx], cov, self.covariate_spec, self.fingerprint, self.source,
                        self.normalization, None if self.pixel_spacing_mm is None else self.pixel_spacing_mm[idx])


def hu_normalization(hu_min: float = HU_WINDOW[0], hu_max: float = HU_WINDOW[1]) -> dict:
    """The metadata record of the HU window (``units.Normalization`` form, read by ``recon.ct.hu_window``)."""
    return {"kind": "hu_window", "offset": hu_min, "scale": hu_max - hu_min, "clip": None,
            "params": {"hu_min": hu_min, "hu_max": hu_max}}


def percentile_scale(images: np.ndarray) -> np.ndarray:
    """Per-slice 99.5th percentile (N,), floored so empty slices do not blow up noise."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    p = np.percentile(flat, PERCENTILE, axis=1)
    floor = max(float(np.median(p)) * 0.05, 1e-6)
    return np.maximum(p, floor)


def fit_to_size(images: Tensor, size: int) -> Tensor:
    """Zero-pad (centred) or area-downsample (N, 1, H, W) to (N, 1, size, size), keeping aspect ratio."""
    n, _, h, w = images.shape
    if max(h, w) > size:
        f = size / max(h, w)
        images = F.interpolate(images, size=(max(1, round(h * f)), max(1, round(w * f))), mode="area")
        h, w = images.shape[-2:]
    ph, pw = size - h, size - w
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def _fingerprint(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def load_slices(path: Path, size: int, covariates: Path | None = None, min_foreground: float = 0.05,
                intensity: str = "auto", pixel_spacing: float | None = None) -> SliceSet:
    """Load 2D training slices from an NPZ (``images`` or ``hu``, + ``subject_index``/``subject_ids``
    or ``patient_id``, optional ``pixel_spacing_mm`` (N,) or scalar), a folder of NIfTI volumes (axial
    slices), a DICOM series folder, or a folder of PNG/TIFF files, in the units of ``intensity``
    (module docstring). Their pixel size comes from the data (NIfTI / DICOM geometry, the NPZ key),
    else from ``pixel_spacing`` (mm, the user's word for data that carry none), else it is unknown.

    Slices with less than ``min_foreground`` of pixels above 0.1 (10 % of their 99.5th percentile;
    for HU: -800 HU) are dropped (they are mostly background and teach the prior nothing).
    """
    path = Path(path)
    if intensity not in INTENSITIES:
        raise MediffError(f"unknown --intensity {intensity!r}; choose from {', '.join(INTENSITIES)}")
    if not path.exists():
        raise MediffError(f"training data not found: {path}")
    if path.suffix == ".npz":
        raw, subjects, has_hu, spacing = _from_npz(path)
    elif path.is_dir():
        raw, subjects, spacing = _from_folder(path)
        has_hu = False
    else:
        raise MediffError(f"unsupported training data {path}: give an .npz or a folder of NIfTI/DICOM/PNG files")
    if intensity == "auto":
        intensity = "hu" if has_hu or float(raw.min()) < -500 else "percentile"
    if intensity == "hu":
        if float(raw.min()) >= -500:
            raise MediffError(f"{path}: --intensity hu needs CT data in Hounsfield units (air near -1000), "
                              f"but the minimum is {float(raw.min()):g}")
        norm = hu_normalization()
        x = np.clip((raw.astype(np.float32) - norm["offset"]) / norm["scale"], 0.0, None)
    else:
        norm = {"kind": "percentile", "percentile": PERCENTILE}
        raw = np.clip(raw, 0, None)  # MR magnitude: negative values are reconstruction noise
        x = raw.astype(np.float32) / percentile_scale(raw)[:, None, None]
    keep = (x > 0.1).mean(axis=(1, 2)) >= min_foreground
    if not keep.any():
        raise MediffError(f"no usable slices in {path} (all below {min_foreground:.0%} foreground)")
    x, subjects = x[keep], subjects[keep]
    if spacing is None and pixel_spacing is not None:
        if not (np.isfinite(pixel_spacing) and pixel_spacing > 0):
            raise MediffError(f"--pixel-spacing must be a positive size in mm, got {pixel_spacing}")
        spacing = np.full(len(raw), float(pixel_spacing))
    if spacing is not None:  # on the training grid: ``fit_to_size`` downsamples by size / side, or only pads
        spacing = spacing[keep] * max(1.0, max(x.shape[1:]) / size)
    images = fit_to_size(torch.from_numpy(x)[:, None], size)
    cov, spec = (None, None)
    if covariates is not None:
        cov, spec = encode_covariates(covariates, subjects)
    return SliceSet(images, subjects, cov, spec, _fingerprint([raw[keep]]), str(path), norm, spacing)


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray | None]:
    """(images (N, H, W), subjects (N,), whether the array is ``hu``, pixel spacing (N,) mm or None)."""
    try:
        d = np.load(path, allow_pickle=False)
        key = "images" if "images" in d.files else "hu" if "hu" in d.files else None
        if key is None:
            raise MediffError(f"{path} has no 'images' (or CT 'hu') array (found: {', '.join(d.files)})")
        images = d[key]
        if "subject_index" in d.files and "subject_ids" in d.files:
            subjects = d["subject_ids"][d["subject_index"]].astype(str)
        elif "subject_index" in d.files:
            subjects = d["subject_index"].astype(str)
        elif "patient_id" in d.files:
            subjects = d["patient_id"].astype(str)
        else:
            raise MediffError(f"{path} has no 'subject_index' or 'patient_id': a subject-level split is impossible")
    except (OSError, ValueError) as exc:
        raise MediffError(f"cannot read {path}: {exc}") from exc
    if images.ndim != 3:
        raise MediffError(f"{path}: '{key}' must be (N, H, W), got {images.shape}")
    if len(subjects) != len(images):
        raise MediffError(f"{path}: {len(subjects)} subject labels for {len(images)} images")
    spacing = None
    if "pixel_spacing_mm" in d.files:
        sp = np.asarray(d["pixel_spacing_mm"], dtype=np.float64).reshape(-1)
        if sp.size not in (1, len(images)) or not (np.isfinite(sp).all() and (sp > 0).all()):
            raise MediffError(f"{path}: 'pixel_spacing_mm' must be positive, one value or one per image")
        spacing = np.broadcast_to(sp, (len(images),)).copy()
    return images, subjects, key == "hu", spacing


def _from_folder(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Slices from a folder, their subjects, and their pixel spacing (mm, the mean of the two in-plane
    axes; None unless every image carries its geometry). Subjects: each subfolder (a DICOM series, or
    a stack of PNG/TIFF/NPY/DICOM slices), each NIfTI/PNG/TIFF/NPY file at the top level, or the whole
    folder when it holds one DICOM series. Put each patient's 2D slices in a subfolder so the split
    keeps them together."""
    from mediff import io

    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        raise MediffError(f"empty folder: {path}")
    files = [p for p in entries if p.is_file()]
    kinds = {p: _format_or_none(p) for p in files}
    if files and all(k == "dicom" for k in kinds.values()):
        vols = [(path.name, io.read_image(path))]
    else:
        vols = [(p.name.split(".")[0], io.read_image(p)) for p in files if kinds[p] in _SLICE_FORMATS]
        vols += [(p.name, _read_subject_folder(p)) for p in entries if p.is_dir()]
    if not vols:
        raise MediffError(f"no NIfTI, DICOM, PNG/TIFF or NPY images in {path}")
    slices, subjects, spacing = [], [], []
    for name, img in vols:
        arr = np.asarray(img.array, dtype=np.float32)
        stack = arr[None] if arr.ndim == 2 else np.moveaxis(arr, 2, 0)  # volumes: slices along axis 2
        slices.extend(stack)
        subjects.extend([name] * len(stack))
        known = img.meta.get("spacing_known", False) and len(img.spacing) >= 2
        spacing.extend([float(np.mean(img.spacing[:2])) if known else np.nan] * len(stack))
    side = max(max(s.shape) for s in slices)
    # Pad with each slice's minimum: 0 for MR, air for CT in HU (a DICOM CT folder keeps its HU).
    slices = [np.pad(s, [(0, side - s.shape[0]), (0, side - s.shape[1])], constant_values=min(float(s.min()), 0.0))
              for s in slices]
    spacing = np.asarray(spacing)
    return np.stack(slices), np.asarray(subjects), None if np.isnan(spacing).any() else spacing


def _read_subject_folder(folder: Path):
    """One subject's folder: a DICOM series, else its 2D images stacked along a third axis."""
    from mediff import io

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    kinds = [_format_or_none(p) for p in files]
    if files and all(k == "dicom" for k in kinds):
        return io.read_image(folder)
    images = [io.read_image(p).array for p, k in zip(files, kinds) if k in _SLICE_FORMATS]
    if not images or any(np.ndim(a) != 2 for a in images):
        raise MediffError(f"{folder}: expected a DICOM series or 2D images (PNG/TIFF/NPY) in a subject folder")
    side = (max(a.shape[0] for a in images), max(a.shape[1] for a in images))
    return io.MedicalImage(np.stack([np.pad(np.asarray(a, np.float32), [(0, side[0] - a.shape[0]),
                                                                          (0, side[1] - a.shape[1])])
                                     for a in images], axis=2))


_SLICE_FORMATS = {"nifti", "png", "tiff", "npy", "dicom"}


def _format_or_none(p: Path) -> str | None:
    from mediff import io

    try:
        return io.detect_format(p)
    except MediffError:
        return None  # e.g. a README or CSV next to the images


def encode_covariates(csv_path: Path, subjects: np.ndarray) -> tuple[Tensor, dict]:
    """Covariate vectors for each slice from a CSV whose first column is the subject id.

    Layout: [present, numeric columns standardised..., one-hot of categorical columns...]. Subjects
    missing from the CSV get the zero vector, which is also the classifier-free-guidance null token.
    """
    rows = _read_csv(csv_path)
    spec = covariate_spec(rows)
    vecs = {sid: encode_row(row, spec) for sid, row in rows.items()}
    zero = np.zeros(spec["dim"], np.float32)
    mat = np.stack([vecs.get(str(s), zero) for s in subjects])
    return torch.from_numpy(mat), spec


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            key = reader.fieldnames[0] if reader.fieldnames else None
            if key is None:
                raise MediffError(f"{path}: empty CSV")
            return {r[key]: {k: v for k, v in r.items() if k != key} for r in reader}
    except OSError as exc:
        raise MediffError(f"cannot read covariates {path}: {exc}") from exc


def covariate_spec(rows: dict[str, dict[str, str]]) -> dict:
    """Decide per column: numeric (mean/std) or categorical (sorted levels)."""
    columns: dict[str, dict] = {}
    names = next(iter(rows.values())).keys() if rows else []
    for col in names:
        vals = [r[col] for r in rows.values() if r.get(col, "") != ""]
        try:
            num = np.array([float(v) for v in vals])
            columns[col] = {"kind": "numeric", "mean": float(num.mean()), "std": float(num.std() or 1.0)}
        except ValueError:
            columns[col] = {"kind": "categorical", "levels": sorted(set(vals))}
    dim = 1 + sum(1 if c["kind"] == "numeric" else len(c["levels"]) for c in columns.values())
    return {"columns": columns, "dim": dim}


def encode_row(row: dict[str, str], spec: dict) -> np.ndarray:
    """One covariate vector; unknown or empty values encode as 0 in their slots."""
    out = [1.0]
    for col, c in spec["columns"].items():
        v = row.get(col, "")
        if c["kind"] == "numeric":
            out.append((float(v) - c["mean"]) / c["std"] if v != "" else 0.0)
        else:
            out.extend(1.0 if v == lev else 0.0 for lev in c["levels"])
    return np.asarray(out, np.float32)


def split_by_subject(subjects: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with ``n_val`` whole subjects held out, chosen reproducibly from ``seed``."""
    uniq = np.unique(subjects)
    if n_val < 1:
        raise MediffError(f"--val-subjects must be at least 1 (validation needs held-out subjects), got {n_val}")
    if n_val >= len(uniq):
        raise MediffError(f"only {len(uniq)} subjects: cannot hold out {n_val} for validation")
    rng = np.random.default_rng(seed)
    val_subjects = set(rng.choice(uniq, size=n_val, replace=False).tolist())
    is_val = np.array([s in val_subjects for s in subjects])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
