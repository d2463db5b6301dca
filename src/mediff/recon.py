"""MRI reconstruction from files: prepare the inverse problem, run a solver or baseline, write results.

Inputs: a fully-sampled image (k-space is simulated: single-coil, or ``coils`` simulated coil maps),
fastMRI-style HDF5 (``kspace`` (C, H, W) or (S, C, H, W), optional ``mask``), or NPZ with ``kspace``
and ``mask``. Everything is solved in the prior's normalised units: the scale is the 99.5th
percentile of the zero-filled magnitude, known from the data alone, and undone on output.

Phase: the priors model magnitude images. The complex image is written x * phase with the phase of
a low-resolution image from the fully-sampled k-space centre (``mri.lowres_phase``), so solvers work
on a real x through ``PhaseModulated``. Classical baselines reconstruct the complex image directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mediff import baselines, io, metrics
from mediff.errors import MediffError
from mediff.masks import make_mask
from mediff.mri import MultiCoilMRI, SingleCoilMRI, check_kspace, estimate_coil_maps, lowres_phase, simulate_coil_maps, \
    simulate_kspace
from mediff.operators.base import CenterCrop, LinearOperator, PhaseModulated
from mediff.solvers import SOLVERS, Problem, solve

BASELINES = ("zero-filled", "tv", "l1wavelet")
# Regularisation weights in normalised units, tuned on validation subjects (never on evaluation
# ones) by `python benchmarks/mri.py --tune`; see the README's benchmark section.
DEFAULT_LAMBDA = {"tv": 2e-3, "l1wavelet": 2e-3}
BASELINE_ITERS = 200


@dataclass
class MRITask:
    """An MRI inverse problem on the working grid, in the prior's normalised units."""

    op: LinearOperator  # complex image (1, 1, H, W) -> k-space (1, C, H, W)
    y: Tensor  # (1, C, H, W) normalised k-space
    phase: Tensor  # (1, 1, H, W) unit-modulus
    noise_sigma: float  # normalised units, per complex entry
    scale: float  # input units per normalised unit
    reference: Tensor | None  # (1, 1, H, W) magnitude, normalised, or None
    mask: np.ndarray  # (H, W) bool
    to_input: Callable[[np.ndarray], np.ndarray]  # working-grid magnitude -> input shape and grid
    affine: np.ndarray
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.y.shape[-2:])


def _fit(image: np.ndarray, size: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], str | None]:
    """Resample a 2D image onto the prior's size x size grid (area downsampling, centred zero pad) and
    return the inverse map back onto the original grid."""
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


# Training slices are axial cuts of volumes in P-S-R voxel order (rows posterior, columns right), as
# in the IXI data; volumes are reoriented to that order so a prior sees anatomy the way it learnt it.
SLICE_ORIENTATION = ("P", "S", "R")


def _pick_slice(img: io.MedicalImage, slice_index: int | None) -> tuple[np.ndarray, np.ndarray, str | None]:
    """A 2D image as is, or the axial slice of a volume (reoriented to P-S-R) with its affine."""
    import nibabel.orientations as nio

    arr = np.asarray(img.array)
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    if arr.ndim == 2:
        return arr.astype(np.float32), img.affine, None
    if arr.ndim != 3:
        raise MediffError(f"expected a 2D image or 3D volume, got shape {arr.shape}")
    transform = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(SLICE_ORIENTATION))
    vol = nio.apply_orientation(arr, transform)
    affine = img.affine @ nio.inv_ornt_aff(transform, arr.shape)
    k = vol.shape[1] // 2 if slice_index is None else slice_index
    if not 0 <= k < vol.shape[1]:
        raise MediffError(f"--slice {k} out of range: the volume has {vol.shape[1]} axial slices")
    # Slice k along axis 1: the 2D voxel (i, j, 0) is volume voxel (i, k, j); the third column steps along S.
    to_vol = np.array([[1, 0, 0, 0], [0, 0, 1, k], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    note = f"axial slice {k} of {vol.shape[1]} reconstructed (volume reoriented to {''.join(SLICE_ORIENTATION)})"
    return np.ascontiguousarray(vol[:, k, :], dtype=np.float32), affine @ to_vol, note


def _scale_of(op: LinearOperator, y: Tensor) -> float:
    """The 99.5th percentile of the (coil-combined) zero-filled magnitude: the problem's intensity unit."""
    s = float(torch.quantile(op.AH(y).abs().flatten().float(), 0.995))
    if not np.isfinite(s) or s <= 0:
        raise MediffError("k-space gives an all-zero image: nothing to reconstruct")
    return s


def prepare_mri(path: Path, size: int, accel: float, mask_kind: str = "random1d", center_fraction: float = 0.08,
                seed: int = 0, coils: int = 1, noise: float = 0.0, slice_index: int | None = None) -> MRITask:
    """Read ``path`` and build the MRI inverse problem (see module docstring)."""
    fmt = io.detect_format(path)
    if fmt == "hdf5" or (fmt == "npz" and "kspace" in np.load(path).files):
        return _prepare_kspace(path, fmt, accel, mask_kind, center_fraction, seed, slice_index)
    img = io.read_image(path)
    image, affine, note = _pick_slice(img, slice_index)
    if not np.isfinite(image).all():
        raise MediffError(f"{path} contains NaN or infinite values")
    work, back, fit_note = _fit(np.clip(image, 0, None), size)
    task = simulate_task(work, accel, mask_kind, center_fraction, seed, coils, noise)
    task.to_input, task.affine = back, affine
    task.notes[:0] = [n for n in (note, fit_note) if n]
    return task


def simulate_task(image: np.ndarray, accel: float, mask_kind: str = "random1d", center_fraction: float = 0.08,
                  seed: int = 0, coils: int = 1, noise: float = 0.0) -> MRITask:
    """The MRI problem of a fully-sampled magnitude image (H, W) on the working grid: mask, optional
    simulated coils (maps then re-estimated from the data by ESPIRiT) and noise, all from ``seed``."""
    m = make_mask(mask_kind, image.shape, accel, center_fraction, seed)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(torch.complex64)
    calib = max(4, round(image.shape[1] * center_fraction))
    ref_scale = float(np.percentile(image, 99.5)) or 1.0
    gen = torch.Generator().manual_seed(seed)
    maps = simulate_coil_maps(image.shape, coils) if coils > 1 else None
    k = simulate_kspace(x, m.mask, coil_maps=maps, noise_sigma=noise * ref_scale, generator=gen)
    notes = ["k-space simulated from a magnitude image (retrospective undersampling)"]
    if coils > 1:
        notes.append(f"{coils} coils simulated; sensitivities estimated from the data by ESPIRiT ({calib} calibration lines)")
        op: LinearOperator = MultiCoilMRI(m.mask, coil_maps_1d(k[0], calib))
    else:
        op = SingleCoilMRI(m.mask)
    scale = _scale_of(op, k)
    ref = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None] / scale
    info = {"source": "simulated from image", "accel": m.accel, "mask": mask_kind, "center_fraction": center_fraction,
            "coils": coils, "noise": noise}
    return MRITask(op, k / scale, lowres_phase(k, op, calib), noise * ref_scale / scale, scale, ref, m.mask,
                   lambda a: a, np.eye(4), notes, info)


def _prepare_kspace(path: Path, fmt: str, accel: float, mask_kind: str, center_fraction: float, seed: int,
                    slice_index: int | None) -> MRITask:
    notes: list[str] = []
    if fmt == "hdf5":
        d = io.read_kspace_h5(path)
        ksp, mask, ref_img = d["kspace"], d.get("mask"), d.get("reconstruction_rss")
    else:
        d = np.load(path)
        if "mask" not in d.files:
            raise MediffError(f"{path}: NPZ k-space needs a 'mask' array next to 'kspace'")
        ksp, mask, ref_img = d["kspace"], d["mask"], d["reference"] if "reference" in d.files else None
    ksp = np.asarray(ksp)
    if ksp.ndim == 4:
        k_i = ksp.shape[0] // 2 if slice_index is None else slice_index
        if not 0 <= k_i < ksp.shape[0]:
            raise MediffError(f"--slice {k_i} out of range ({ksp.shape[0]} slices)")
        ksp = ksp[k_i]
        ref_img = ref_img[k_i] if ref_img is not None and np.ndim(ref_img) == 3 else ref_img
        notes.append(f"slice {k_i} of {d['kspace'].shape[0] if fmt == 'npz' else 'the file'}")
    if ksp.ndim == 2:
        ksp = ksp[None]
    if ksp.ndim != 3:
        raise MediffError(f"{path}: kspace must be (C, H, W) or (S, C, H, W), got {ksp.shape}")
    full = torch.from_numpy(ksp.astype(np.complex64))[None]
    h, w = ksp.shape[-2:]
    if mask is None:
        if np.all(np.abs(ksp).sum(axis=(0, 1)) > 0):
            m = make_mask(mask_kind, (h, w), accel, center_fraction, seed)
            mask = m.mask
            notes.append(f"fully-sampled k-space undersampled retrospectively ({mask_kind}, x{m.accel:.2f})")
        else:
            mask = np.abs(ksp).sum(axis=0) > 0
            notes.append("mask taken from the non-zero k-space entries")
    mask = np.broadcast_to(np.asarray(mask).astype(bool), (h, w)) if np.ndim(mask) == 1 else np.asarray(mask).astype(bool)
    check_kspace(full, mask)
    y = full * torch.from_numpy(mask)
    calib = _calib_width(mask)
    if calib < 4:
        raise MediffError("the mask has no fully-sampled centre: phase and coil maps cannot be calibrated")
    c = y.shape[1]
    op: LinearOperator = MultiCoilMRI(mask, coil_maps_1d(y[0], calib)) if c > 1 else SingleCoilMRI(mask)
    if c > 1:
        notes.append(f"{c}-coil data; sensitivities estimated by ESPIRiT from {calib} calibration lines")
    # A reference exists only when the file holds fully-sampled k-space (retrospective undersampling).
    ref = _rss_from_full(full) if bool(np.all(np.abs(ksp).sum(axis=(0, 1)) > 0)) else None
    notes.append("real k-space data; phase from the low-resolution calibration image")
    # The prior needs a grid divisible by 16: embed the image in a padded grid and crop inside A.
    mult = 16
    ph, pw = -(-h // mult) * mult, -(-w // mult) * mult
    phase = lowres_phase(y, op, calib)
    scale = _scale_of(op, y)
    if (ph, pw) != (h, w):
        crop = CenterCrop((ph, pw), (h, w))
        op = op @ crop
        phase = crop.AH(phase)
        phase = torch.where(phase.abs() > 0, phase, torch.ones_like(phase))
        if ref is not None:
            ref = crop.AH(ref)
        notes.append(f"image grid {h}x{w} padded to {ph}x{pw} for the network; A crops it back")

    def back(a: np.ndarray) -> np.ndarray:
        top, left = (ph - h) // 2, (pw - w) // 2
        return a[top: top + h, left: left + w]

    info = {"source": "k-space file", "accel": float(mask.size / mask.sum()), "coils": c}
    return MRITask(op, y / scale, phase, 0.0, scale, None if ref is None else ref / scale, mask, back, np.eye(4),
                   notes, info)


def coil_maps_1d(kspace: Tensor, calib_cols: int) -> Tensor:
    """ESPIRiT maps (C, H, W) from k-space whose ``calib_cols`` centre columns are fully sampled: the
    calibration block is every row of those columns, with a kernel that fits their width (a square
    10 x 10 block with a 6 x 6 kernel leaves too few patches and the support collapses)."""
    return estimate_coil_maps(kspace, calib_size=(kspace.shape[-2], calib_cols),
                              kernel_size=max(3, min(6, calib_cols // 2 - 1)))


def _rss_from_full(full: Tensor) -> Tensor:
    from mediff.mri import ifft2c, rss

    return rss(ifft2c(full))


def _calib_width(mask: np.ndarray) -> int:
    """Width of the fully-sampled block of columns around the k-space centre."""
    cols = mask.all(axis=0)
    c = mask.shape[1] // 2
    lo = hi = c
    while lo - 1 >= 0 and cols[lo - 1]:
        lo -= 1
    while hi + 1 < len(cols) and cols[hi + 1]:
        hi += 1
    return hi - lo + 1 if cols[c] else 0


@dataclass
class ReconResult:
    """Magnitude images on the working grid, normalised units: mean (1,1,H,W), std or None, samples."""

    mean: Tensor
    std: Tensor | None
    samples: Tensor
    nfe: int
    seconds: float


def run_solver(task: MRITask, method: str, prior=None, steps: int = 50, seed: int = 0, samples: int = 1,
               lam: float | None = None, progress: Callable | None = None) -> ReconResult:
    """Reconstruct with a diffusion solver (needs ``prior``) or a classical baseline."""
    t0 = time.perf_counter()
    if method in BASELINES:
        if method == "zero-filled":
            x = task.op.AH(task.y)
        else:
            lam = DEFAULT_LAMBDA[method] if lam is None else lam
            fn = baselines.tv_reconstruct if method == "tv" else baselines.l1_wavelet_reconstruct
            x = fn(task.op, task.y, lam, iters=BASELINE_ITERS)
        mag = x.abs().float()
        return ReconResult(mag, None, mag[None], 0, time.perf_counter() - t0)
    if method not in SOLVERS:
        raise MediffError(f"unknown solver {method!r}; choose from {', '.join([*SOLVERS, *BASELINES])}")
    if prior is None:
        raise MediffError(f"solver {method} needs a prior (--model)")
    op = PhaseModulated(task.op, task.phase)
    k = samples
    problem = Problem(op, task.y.expand(k, *task.y.shape[1:]), task.noise_sigma)
    gen = torch.Generator().manual_seed(seed)
    x, n = solve(prior, problem, (k, 1, *task.shape), method, steps=steps, sigma_data=prior.meta["sigma_data"],
                 sigma_min=prior.sigma_min, sigma_max=prior.sigma_max, generator=gen, callback=progress)
    mag = x.detach().abs()
    std = mag.std(0, keepdim=True) if k > 1 else None
    return ReconResult(mag.mean(0, keepdim=True), std, mag[:, None], n, time.perf_counter() - t0)


def score(task: MRITask, image: Tensor) -> dict[str, float]:
    """PSNR / SSIM / NMSE of a magnitude image vs the reference (data_range = reference maximum)."""
    if task.reference is None:
        return {}
    ref = task.reference.float()
    rng = float(ref.max())
    return {"PSNR": float(metrics.psnr(image, ref, rng)[0]), "SSIM": float(metrics.ssim(image, ref, rng)[0]),
            "NMSE": float(metrics.nmse(image, ref)[0])}


def reconstruct_file(input_path: Path, out_dir: Path, model: str | None, solver: str = "dds", accel: float = 4.0,
                     mask_kind: str = "random1d", center_fraction: float = 0.08, steps: int = 50, seed: int = 0,
                     samples: int = 1, noise: float = 0.0, coils: int = 1, slice_index: int | None = None,
                     compare: tuple[str, ...] = ("zero-filled",), lam: float | None = None,
                     command: str = "") -> dict:
    """The ``mediff reconstruct`` job: writes recon/zero-filled NIfTI, metrics.json and report.html
    into ``out_dir`` (which the caller creates atomically). Returns the metrics record."""
    import json

    from mediff import __version__
    from mediff.prior import load_prior
    from mediff.synthesis import progress_callback

    if samples < 1 or steps < 1:
        raise MediffError("--samples and --steps must be positive")
    if solver not in SOLVERS and solver not in BASELINES:
        raise MediffError(f"unknown solver {solver!r}; choose from {', '.join([*SOLVERS, *BASELINES])}")
    prior = load_prior(model) if solver in SOLVERS else None
    size = prior.image_size if prior is not None else 128
    task = prepare_mri(Path(input_path), size, accel, mask_kind, center_fraction, seed, coils, noise, slice_index)
    with progress_callback(steps, f"{solver} x{task.info['accel']:.1f}") as cb:
        res = run_solver(task, solver, prior, steps, seed, samples, lam, progress=cb if solver in SOLVERS else None)
    rows = [{"method": solver, **score(task, res.mean), "NFE": res.nfe, "seconds": round(res.seconds, 2)}]
    others = {}
    for name in compare:
        if name != solver:
            r = run_solver(task, name, lam=None)
            others[name] = r
            rows.append({"method": name, **score(task, r.mean), "NFE": 0, "seconds": round(r.seconds, 2)})
    zf = others["zero-filled"] if "zero-filled" in others else (res if solver == "zero-filled" else run_solver(task, "zero-filled"))
    record = {"solver": solver, "model": None if prior is None else prior.name, "nfe": res.nfe,
              "seconds": round(res.seconds, 3), "metrics": rows, "notes": task.notes, "problem": task.info,
              "units": "PSNR/SSIM/NMSE on the working grid in normalised units, data_range = reference max",
              "seed": seed, "samples": samples, "steps": steps, "mediff": __version__, "command": command}
    if res.std is not None and task.reference is not None:
        record["coverage90"] = float(metrics.coverage(res.samples, task.reference, level=0.9)[0])
    _write_mri_outputs(Path(out_dir), task, res, zf, record)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(record, indent=2))
    return record


def _write_mri_outputs(out: Path, task: MRITask, res: ReconResult, zf: ReconResult, record: dict) -> None:
    from mediff.report import Panel, write_report

    def to_input(x: Tensor) -> np.ndarray:
        return task.to_input((x[0, 0].float() * task.scale).cpu().numpy())

    io.write_nifti(out / "recon.nii.gz", to_input(res.mean), task.affine)
    io.write_nifti(out / "zero_filled.nii.gz", to_input(zf.mean), task.affine)
    if res.std is not None:
        io.write_nifti(out / "std.nii.gz", to_input(res.std), task.affine)
    vmax = float(torch.quantile((task.reference if task.reference is not None else res.mean).flatten(), 0.995))
    panels = []
    if task.reference is not None:
        panels.append(Panel("reference", task.reference[0, 0].numpy(), vmin=0, vmax=vmax))
    panels += [Panel(f"{record['solver']} (NFE {res.nfe})", res.mean[0, 0].numpy(), vmin=0, vmax=vmax),
               Panel("zero-filled", zf.mean[0, 0].numpy(), vmin=0, vmax=vmax),
               Panel(f"mask (x{task.info['accel']:.2f})", task.mask.astype(np.float32), kind="mask")]
    if task.reference is not None:
        ref = task.reference[0, 0].numpy()
        panels += [Panel(f"|error| {record['solver']}", np.abs(res.mean[0, 0].numpy() - ref), kind="error", vmin=0,
                         vmax=0.2 * vmax),
                   Panel("|error| zero-filled", np.abs(zf.mean[0, 0].numpy() - ref), kind="error", vmin=0,
                         vmax=0.2 * vmax)]
    if res.std is not None:
        panels.append(Panel(f"posterior std ({record['samples']} samples)", res.std[0, 0].numpy(), kind="uncertainty",
                            caption=f"90% interval coverage {record.get('coverage90', float('nan')):.3f}"))
    meta = {"command": record["command"], "model": record["model"], "seed": record["seed"], "steps": record["steps"],
            "mediff": record["mediff"]}
    write_report(out / "report.html", "mediff MRI reconstruction", panels, record["metrics"], task.notes, meta)
