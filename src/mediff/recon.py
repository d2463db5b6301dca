"""Reconstruction from files: prepare the inverse problem, run a solver or baseline, write results.

One pipeline serves MRI (this module prepares its problems) and CT (``mediff.recon_ct.prepare_ct``):
both build a ``Task`` in the prior's normalised units; ``run_solver``, ``score`` and the writers
are shared and branch only where the modalities differ (phase, baselines, metric window, panels).

MRI:

Inputs: a fully-sampled image (k-space is simulated: single-coil, or ``coils`` simulated coil maps),
fastMRI-style HDF5 (``kspace`` (C, H, W) or (S, C, H, W), optional ``mask``), or NPZ with ``kspace``
and ``mask``. Everything is solved in the prior's normalised units: the scale is the 99.5th
percentile of the zero-filled magnitude, known from the data alone, and undone on output.

Phase: the priors model magnitude images. The complex image is written x * phase with the phase of
a low-resolution image from the fully-sampled k-space centre (``mri.lowres_phase`` on the whole
``calib_region``: for 1D masks all rows of the centre columns, so the phase has full resolution along
the rows), so solvers work on a real x through ``mri.MagnitudeMRI`` (a ``PhaseModulated``).
Classical baselines reconstruct the complex image directly.

Noise: simulated k-space knows its noise (``--noise``); for measured k-space the noise std per complex
entry is estimated from the outer k-space (``mri.estimate_noise_sigma``) and handed to the solvers.
Multi-coil data also carry the error of the estimated coil maps: the solvers' likelihood std is the
larger of the noise std and the SENSE least-squares residual std (``mri.sense_residual_sigma``), so
solvers that enforce the data to convergence do not fit the maps' miss as image detail.
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
from mediff.physics.masks import make_mask
from mediff.physics.mri import MagnitudeMRI, MultiCoilMRI, SingleCoilMRI, check_kspace, estimate_coil_maps, estimate_noise_sigma, \
    lowres_phase, sense_residual_sigma, simulate_coil_maps, simulate_kspace
from mediff.physics.operators import CenterCrop, LinearOperator, Weighted
from mediff.solvers import SOLVERS, Problem, solve

BASELINES = ("zero-filled", "tv", "l1wavelet")  # MRI baselines
CT_BASELINES = ("fbp", "tv")
# Regularisation weights in normalised units, tuned on validation subjects (never on evaluation
# ones) by `python benchmarks/mri.py --tune`; see the README's benchmark section.
DEFAULT_LAMBDA = {"tv": 1.6e-2, "l1wavelet": 1e-3}  # results/mri_lambda.json: x4, single-coil, 5 subjects
# CT TV weight relative to ||A||^2 (the weight passed to tv_reconstruct is lam * ||A||^2), so that it
# does not depend on the number of views or the pixel size; tuned on held-out patients by
# `python benchmarks/ct.py` (results/ct_lambda.json).
DEFAULT_LAMBDA_CT = {"tv": 1e-4}  # best at 60 views (the CLI default) on 3 TCGA-LUAD patients, 128 px
BASELINE_ITERS = 200
# PDHG converges slowly on the ill-conditioned CT operator: more iterations, started at FBP.
BASELINE_ITERS_CT = 500
# Output name and report title of the classical reconstruction written next to every result.
COMPANION = {"mri": "zero-filled", "ct": "fbp"}


@dataclass
class Task:
    """An inverse problem on the working grid, in the prior's normalised units (MRI or CT).

    Input units (MRI: the file's intensities; CT: HU) are ``x * scale + offset`` of normalised x.
    """

    op: LinearOperator  # MRI: complex image (1,1,H,W) -> k-space (1,C,H,W); CT: u image (1,1,N,N) -> (1,1,V,D)
    y: Tensor  # MRI: (1, C, H, W) normalised k-space; CT: (1, 1, V, D) sinogram in u units (recon_ct)
    phase: Tensor | None  # MRI: (1, 1, H, W) unit-modulus; None (CT): solvers use ``op`` directly
    noise_sigma: float  # normalised units, per complex (MRI) / real (CT) entry of y
    scale: float  # input units per normalised unit
    reference: Tensor | None  # (1, 1, H, W) real image, normalised, or None
    display: np.ndarray | None  # shown in the report: MRI sampling mask (H, W) bool; CT sinogram (V, D)
    to_input: Callable[[np.ndarray], np.ndarray]  # working-grid image -> input shape and grid
    affine: np.ndarray
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    kind: str = "mri"  # "mri" | "ct"
    offset: float = 0.0  # input units at normalised 0 (CT: hu_min)
    window: tuple[float, float] | None = None  # metric window in input units (CT: (-1000, 1000) HU)
    weights: Tensor | None = None  # like y: noise_sigma / std per entry (heteroscedastic data, CT low dose)
    # MRI with estimated coil maps: (1, 1, H, W), 1 inside the maps' support, 0 outside. A is blind outside
    # (the maps vanish), so whatever a solver leaves there is the prior's invention: images are zeroed there.
    support: Tensor | None = None

    def data(self) -> tuple[LinearOperator, Tensor]:
        """(op, y) of the likelihood the solvers use: whitened by ``weights`` when the noise varies per
        entry (weighted least squares), the noise std then being ``noise_sigma`` everywhere."""
        if self.weights is None:
            return self.op, self.y
        return Weighted(self.op, self.weights), self.weights * self.y

    @property
    def shape(self) -> tuple[int, int]:
        """Working-grid image shape (H, W) (MRI: that of k-space; CT: the operator's N x N grid)."""
        return (self.op.n, self.op.n) if self.kind == "ct" else tuple(self.y.shape[-2:])

    @property
    def mask(self) -> np.ndarray | None:
        """The MRI sampling mask (H, W) bool (former field name; None for CT)."""
        return self.display if self.kind == "mri" else None

    def input_units(self, x: Tensor, shift: bool = True) -> np.ndarray:
        """A working-grid image (1, 1, H, W) in normalised units -> input units on the input grid;
        ``shift=False`` for differences such as a posterior std (scaled, no offset)."""
        a = x[0, 0].detach().float().cpu().numpy() * self.scale + (self.offset if shift else 0.0)
        return self.to_input(a)


MRITask = Task  # former name, kept for existing callers


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


def _pick_slice(img: io.MedicalImage, slice_index: int | None, orientation: tuple[str, str, str] = SLICE_ORIENTATION,
                axis: int = 1) -> tuple[np.ndarray, np.ndarray, str | None]:
    """A 2D image as is, or the slice ``slice_index`` (default: middle) along ``axis`` of a volume
    reoriented to ``orientation`` (MRI: P-S-R, axis 1; CT: P-L-S, axis 2), with its 2D affine."""
    import nibabel.orientations as nio

    arr = np.asarray(img.array)
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    if arr.ndim == 2:
        return arr.astype(np.float32), img.affine, None
    if arr.ndim != 3:
        raise MediffError(f"expected a 2D image or 3D volume, got shape {arr.shape}")
    transform = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(orientation))
    vol = nio.apply_orientation(arr, transform)
    affine = img.affine @ nio.inv_ornt_aff(transform, arr.shape)
    k = vol.shape[axis] // 2 if slice_index is None else slice_index
    if not 0 <= k < vol.shape[axis]:
        raise MediffError(f"--slice {k} out of range: the volume has {vol.shape[axis]} axial slices")
    # The 2D voxel (i, j, 0) is the volume voxel with (i, j) on the two other axes and k on ``axis``;
    # the third column steps along ``axis``.
    rows, cols = (a for a in range(3) if a != axis)
    to_vol = np.zeros((4, 4))
    to_vol[rows, 0] = to_vol[cols, 1] = to_vol[axis, 2] = to_vol[3, 3] = 1.0
    to_vol[axis, 3] = k
    note = f"axial slice {k} of {vol.shape[axis]} reconstructed (volume reoriented to {''.join(orientation)})"
    return np.ascontiguousarray(np.take(vol, k, axis=axis), dtype=np.float32), affine @ to_vol, note


def _scale_of(op: LinearOperator, y: Tensor) -> float:
    """The 99.5th percentile of the (coil-combined) zero-filled magnitude: the problem's intensity unit."""
    s = float(torch.quantile(op.AH(y).abs().flatten().float(), 0.995))
    if not np.isfinite(s) or s <= 0:
        raise MediffError("k-space gives an all-zero image: nothing to reconstruct")
    return s


def prepare_mri(path: Path, size: int, accel: float, mask_kind: str = "random1d", center_fraction: float = 0.08,
                seed: int = 0, coils: int = 1, noise: float = 0.0, slice_index: int | None = None) -> Task:
    """Read ``path`` and build the MRI inverse problem (see module docstring)."""
    fmt = io.detect_format(path)
    if fmt == "hdf5" or (fmt == "npz" and "kspace" in np.load(path).files):
        task = _prepare_kspace(path, fmt, accel, mask_kind, center_fraction, seed, slice_index)
        # --noise and --coils simulate k-space from an image; measured k-space has its own coils and
        # noise (estimated from the data), so they do not apply: say so rather than ignore them.
        ignored = [name for name, given in (("--noise", noise != 0.0), ("--coils", coils != 1)) if given]
        if ignored:
            task.notes.append(f"{' and '.join(ignored)} ignored: they simulate k-space from an image; this file "
                              f"holds measured k-space ({task.info['coils']} coil(s), noise estimated from the data)")
            task.info["ignored_options"] = ignored
        return task
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
                  seed: int = 0, coils: int = 1, noise: float = 0.0) -> Task:
    """The MRI problem of a fully-sampled magnitude image (H, W) on the working grid: mask, optional
    simulated coils (maps then re-estimated from the data by ESPIRiT) and noise, all from ``seed``."""
    m = make_mask(mask_kind, image.shape, accel, center_fraction, seed)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(torch.complex64)
    region = calib_region(m.mask)
    ref_scale = float(np.percentile(image, 99.5)) or 1.0
    gen = torch.Generator().manual_seed(seed)
    maps = simulate_coil_maps(image.shape, coils) if coils > 1 else None
    k = simulate_kspace(x, m.mask, coil_maps=maps, noise_sigma=noise * ref_scale, generator=gen)
    notes = ["k-space simulated from a magnitude image (retrospective undersampling)"]
    if coils > 1:
        notes.append(f"{coils} coils simulated; sensitivities estimated from the data by ESPIRiT "
                     f"({region[0]}x{region[1]} calibration region)")
        op: LinearOperator = MultiCoilMRI(m.mask, coil_maps(k[0], region))
    else:
        op = SingleCoilMRI(m.mask)
    support = op.support if isinstance(op, MultiCoilMRI) else None
    scale = _scale_of(op, k)
    ref = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None] / scale
    info = {"source": "simulated from image", "accel": m.accel, "mask": mask_kind, "center_fraction": center_fraction,
            "coils": coils, "noise": noise, "noise_sigma": noise * ref_scale / scale}
    sigma = _with_model_error(op, k, noise * ref_scale, scale, notes, info) / scale
    return Task(op, k / scale, lowres_phase(k, op, region), sigma, scale, ref, m.mask, lambda a: a, np.eye(4), notes,
                info, support=support)


def _with_model_error(op: LinearOperator, y: Tensor, noise: float, scale: float, notes: list[str],
                      info: dict) -> float:
    """The likelihood std (units of y) for data y of ``op`` with noise std ``noise``: for multi-coil
    data the larger of ``noise`` and the SENSE residual std (see the module docstring). ``scale``:
    the normalised unit, for the notes; the residual goes into ``info`` in normalised units."""
    if not isinstance(op, MultiCoilMRI):
        return noise
    resid = sense_residual_sigma(op, y)
    info["sense_residual_sigma"] = resid / scale
    if resid > noise:
        notes.append(f"likelihood std {resid / scale:.3g} (normalised): the SENSE least-squares residual, above the "
                     f"noise std {noise / scale:.3g}; it allows for the error of the estimated coil maps")
    return max(noise, resid)


def _prepare_kspace(path: Path, fmt: str, accel: float, mask_kind: str, center_fraction: float, seed: int,
                    slice_index: int | None) -> Task:
    notes: list[str] = []
    if fmt == "hdf5":
        d = io.read_kspace_h5(path)
        ksp, mask = d["kspace"], d.get("mask")
    else:
        d = np.load(path)
        if "mask" not in d.files:
            raise MediffError(f"{path}: NPZ k-space needs a 'mask' array next to 'kspace'")
        ksp, mask = d["kspace"], d["mask"]
    ksp = np.asarray(ksp)
    if ksp.ndim == 4:
        k_i = ksp.shape[0] // 2 if slice_index is None else slice_index
        if not 0 <= k_i < ksp.shape[0]:
            raise MediffError(f"--slice {k_i} out of range ({ksp.shape[0]} slices)")
        notes.append(f"slice {k_i} of {ksp.shape[0]}")
        ksp = ksp[k_i]
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
    if np.ndim(mask) == 1 and np.shape(mask)[0] != w:
        raise MediffError(f"{path}: 1D mask has {np.shape(mask)[0]} entries but k-space has {w} columns")
    mask = np.asarray(mask).astype(bool)
    mask = np.broadcast_to(mask, (h, w)).copy() if mask.ndim == 1 else mask  # writable: torch shares it
    check_kspace(full, mask)
    y = full * torch.from_numpy(mask)
    region = calib_region(mask)
    c = y.shape[1]
    op: LinearOperator = MultiCoilMRI(mask, coil_maps(y[0], region)) if c > 1 else SingleCoilMRI(mask)
    if c > 1:
        notes.append(f"{c}-coil data; sensitivities estimated by ESPIRiT from a {region[0]}x{region[1]} calibration region")
    # A reference exists only when the file holds fully-sampled k-space (retrospective undersampling).
    ref = _rss_from_full(full) if bool(np.all(np.abs(ksp).sum(axis=(0, 1)) > 0)) else None
    notes.append(f"real k-space data; phase from the low-resolution image of the {region[0]}x{region[1]} "
                 f"fully-sampled centre")
    # The prior needs a grid divisible by 16: embed the image in a padded grid and crop inside A.
    mult = 16
    ph, pw = -(-h // mult) * mult, -(-w // mult) * mult
    phase = lowres_phase(y, op, region)
    scale = _scale_of(op, y)
    # Measured data carry their own noise: estimated from the outer k-space (file units), then put in
    # the normalised units of y, as the solvers' likelihood needs.
    try:
        sigma_file = estimate_noise_sigma(y, mask)
        notes.append(f"noise std {sigma_file:.4g} per complex k-space entry (normalised {sigma_file / scale:.4g}), "
                     f"estimated from the outer 10% of the sampled k-space (MAD)")
    except MediffError as exc:
        sigma_file = 0.0
        notes.append(f"noise not estimated ({exc}); solvers assume noiseless data")
    model_info: dict = {}
    sigma_lik = _with_model_error(op, y, sigma_file, scale, notes, model_info)
    support = op.support if isinstance(op, MultiCoilMRI) else None
    if (ph, pw) != (h, w):
        crop = CenterCrop((ph, pw), (h, w))
        op = op @ crop
        support = None if support is None else crop.AH(support)
        phase = crop.AH(phase)
        phase = torch.where(phase.abs() > 0, phase, torch.ones_like(phase))
        if ref is not None:
            ref = crop.AH(ref)
        notes.append(f"image grid {h}x{w} padded to {ph}x{pw} for the network; A crops it back")

    def back(a: np.ndarray) -> np.ndarray:
        top, left = (ph - h) // 2, (pw - w) // 2
        return a[top: top + h, left: left + w]

    info = {"source": "k-space file", "accel": float(mask.size / mask.sum()), "coils": c,
            "noise_sigma": sigma_file / scale, "noise_sigma_kspace_units": sigma_file,
            "noise_estimate": "MAD of the outer 10% of sampled k-space, RMS over coils", **model_info}
    return Task(op, y / scale, phase, sigma_lik / scale, scale, None if ref is None else ref / scale, mask, back,
                np.eye(4), notes, info, support=support)


# ESPIRiT's support threshold on the top eigenvalue (``mri.estimate_coil_maps``' ``crop``).
ESPIRIT_CROP = 0.95


def espirit_kernel(region: tuple[int, int]) -> int:
    """ESPIRiT kernel side for a calibration ``region`` (rows, cols): 6, smaller for narrow regions (a
    10-column centre with a 6 x 6 kernel leaves too few patches and the support collapses)."""
    return max(3, min(6, min(region) // 2 - 1))


def coil_maps(kspace: Tensor, region: tuple[int, int]) -> Tensor:
    """ESPIRiT maps (C, H, W) calibrated on the fully-sampled ``region`` (rows, cols)."""
    return estimate_coil_maps(kspace, calib_size=region, kernel_size=espirit_kernel(region), crop=ESPIRIT_CROP)


def _rss_from_full(full: Tensor) -> Tensor:
    from mediff.physics.mri import ifft2c, rss

    return rss(ifft2c(full))


def calib_region(mask: np.ndarray) -> tuple[int, int]:
    """(rows, cols) of the fully-sampled centre: every row of the contiguous centre columns for 1D
    masks, else the largest fully-sampled centred square (Poisson-disc, radial). Raises MediffError
    below 4 so phase and coil maps are never calibrated on a handful of samples."""
    h, w = mask.shape
    cols = mask.all(axis=0)
    c = w // 2
    lo = hi = c
    while lo - 1 >= 0 and cols[lo - 1]:
        lo -= 1
    while hi + 1 < w and cols[hi + 1]:
        hi += 1
    if cols[c] and hi - lo + 1 >= 4:
        return h, hi - lo + 1
    side = 0
    while side + 2 <= min(h, w) and mask[h // 2 - (side + 2) // 2: h // 2 + (side + 2) - (side + 2) // 2,
                                          c - (side + 2) // 2: c + (side + 2) - (side + 2) // 2].all():
        side += 2
    if side < 4:
        raise MediffError("the mask has no fully-sampled centre of >= 4 lines: phase and coil maps cannot be "
                          "calibrated (raise --center-fraction)")
    return side, side


@dataclass
class ReconResult:
    """Magnitude images on the working grid, normalised units: mean (1,1,H,W), std or None, samples."""

    mean: Tensor
    std: Tensor | None
    samples: Tensor
    nfe: int
    seconds: float


def _image(task: Task, x: Tensor) -> Tensor:
    """Solver output -> the image that is scored and written: magnitude for MRI (zero outside the coil
    maps' support, ``Task.support``), real part for CT."""
    img = (x.abs() if task.kind == "mri" else x.real).float()
    return img if task.support is None else img * task.support


def _check_baseline(kind: str, method: str) -> None:
    """Raise MediffError unless ``method`` is a baseline of modality ``kind`` ("mri" | "ct")."""
    allowed = CT_BASELINES if kind == "ct" else BASELINES
    if method not in allowed:
        other = "MRI" if kind == "ct" else "CT"
        raise MediffError(f"{method} is a{'n' if other == 'MRI' else ''} {other}-only baseline; for "
                          f"{kind.upper()} use {', '.join(allowed)} or a diffusion solver")


def _baseline(task: Task, method: str, lam: float | None) -> Tensor:
    """A classical reconstruction of ``task`` (normalised units, (1, 1, H, W))."""
    _check_baseline(task.kind, method)
    if method == "zero-filled":
        return task.op.AH(task.y)
    if method == "fbp":
        from mediff.physics.ct import fbp

        return fbp(task.op, task.y)
    if task.kind == "ct":  # tv: the weight is relative to ||A||^2 (see DEFAULT_LAMBDA_CT), started at FBP
        from mediff.physics.ct import fbp

        lam = DEFAULT_LAMBDA_CT[method] if lam is None else lam
        x0 = fbp(task.op, task.y)
        op, y = task.data()  # PWLS-TV for low dose
        s = float(baselines.op_norm(op, x0, 30)[0]) * 1.01
        return baselines.tv_reconstruct(op, y, lam * s * s, iters=BASELINE_ITERS_CT, x0=x0, a_norm=s)
    lam = DEFAULT_LAMBDA[method] if lam is None else lam
    fn = baselines.tv_reconstruct if method == "tv" else baselines.l1_wavelet_reconstruct
    return fn(task.op, task.y, lam, iters=BASELINE_ITERS)


# CG steps per DDS update on CT (``dds_cg_iters``); MRI uses SOLVERS['dds'] (8 coils) or 5 (one coil).
CT_DDS_CG_ITERS = 40


def dds_cg_iters(task: Task) -> int:
    """CG steps per DDS update for ``task``'s operator: as many as its conditioning needs.

    Measured side by side by ``benchmarks/dds_sweep.py`` (50 NFE, eta = 1): the single-coil MRI normal
    operator is nearly a projection (one eigenvalue cluster), so CG has converged by 5 steps (x4:
    26.86 dB, 20 steps 26.94; ``benchmarks/results/dds_cg_sweep.md``). The 8-coil SENSE normal operator
    has a spread spectrum: 5 -> 20 steps gains 1 dB at x4, more does not help (tuning subjects, 8
    slices: 5 / 10 / 15 / 20 / 30 steps 34.46 / 35.27 / 35.44 / 35.42 / 35.19 dB; ``dds_mri_cg_tuning.md``). CT's
    keeps gaining (6 slices of tuning patients, ``dds_ct_cg_tuning.md``: 20 / 40 / 60 steps give
    37.29 / 37.63 / 37.77 dB at 60 views and 32.79 / 33.68 / 33.81 at low dose; the mean of 8 samples
    at 60 views 39.50 / 39.86 for 20 / 40, ``dds_ct60_k8_tuning.md``): 40, at 1.7x the time of 20 (a CG
    step costs about 1/5 of a forward there), 60 adding 0.13 dB for another 1.35x.
    """
    if task.kind == "ct":
        return CT_DDS_CG_ITERS
    return 5 if task.y.shape[1] == 1 else SOLVERS["dds"].cg_iters


def solver_cg_iters(task: Task, method: str) -> int:
    """CG steps per update of diffusion solver ``method`` on ``task``: DDS's follow the operator
    (``dds_cg_iters``), the other solvers run their ``SolverSpec.cg_iters`` (0: no prox)."""
    return dds_cg_iters(task) if method == "dds" else SOLVERS[method].cg_iters


def run_solver(task: Task, method: str, prior=None, steps: int = 50, seed: int = 0, samples: int = 1,
               lam: float | None = None, progress: Callable | None = None,
               cg_iters: int | None = None) -> ReconResult:
    """Reconstruct with a diffusion solver (needs ``prior``) or a classical baseline (MRI: zero-filled,
    tv, l1wavelet; CT: fbp, tv). Images come back real, (1, 1, H, W), in normalised units.
    ``cg_iters``: CG steps per data-consistency update, instead of ``solver_cg_iters`` (fewer: faster,
    less accurate; ``benchmarks/solver_overhead.py``)."""
    t0 = time.perf_counter()
    if method in BASELINES or method in CT_BASELINES:
        img = _image(task, _baseline(task, method, lam))
        return ReconResult(img, None, img[None], 0, time.perf_counter() - t0)
    if method not in SOLVERS:
        raise MediffError(f"unknown solver {method!r}; choose from "
                          f"{', '.join(dict.fromkeys([*SOLVERS, *BASELINES, *CT_BASELINES]))}")
    if prior is None:
        raise MediffError(f"solver {method} needs a prior (--model)")
    op, y = task.data()
    op = op if task.phase is None else MagnitudeMRI(op, task.phase)
    k = samples
    problem = Problem(op, y.expand(k, *y.shape[1:]), task.noise_sigma)
    gen = torch.Generator().manual_seed(seed)
    x, n = solve(prior, problem, (k, 1, *task.shape), method, steps=steps, sigma_data=prior.meta["sigma_data"],
                 sigma_min=prior.sigma_min, sigma_max=prior.sigma_max, generator=gen, callback=progress,
                 cg_iters=solver_cg_iters(task, method) if cg_iters is None else cg_iters)
    mag = _image(task, x.detach())
    std = mag.std(0, keepdim=True) if k > 1 else None
    return ReconResult(mag.mean(0, keepdim=True), std, mag[:, None], n, time.perf_counter() - t0)


def score(task: Task, image: Tensor) -> dict[str, float]:
    """PSNR / SSIM / NMSE of an image (1, 1, H, W) vs the reference, both in normalised units.

    No ``task.window`` (MRI): normalised units, data_range = reference maximum. With a window (CT,
    (-1000, 1000) HU): both converted to input units and clipped to the window, data_range = its
    width; NMSE of the clipped values measured from the window's lower end (air = 0 for CT).
    """
    if task.reference is None:
        return {}
    ref, img = task.reference.float(), image.float()
    if task.window is None:
        rng = float(ref.max())
    else:
        lo, hi = task.window
        ref, img = ((t * task.scale + task.offset).clamp(lo, hi) - lo for t in (ref, img))
        rng = hi - lo
    return {"PSNR": float(metrics.psnr(img, ref, rng)[0]), "SSIM": float(metrics.ssim(img, ref, rng)[0]),
            "NMSE": float(metrics.nmse(img, ref)[0])}


def _looks_ct(path: Path) -> bool:
    """Whether the input is CT by its own account: an NPZ with ``sinogram`` or ``hu``, or a DICOM file /
    series whose Modality is CT (headers only; anything unreadable is left to the readers)."""
    try:
        fmt = io.detect_format(path)
        if fmt == "npz":
            with np.load(path) as z:
                return "sinogram" in z.files or "hu" in z.files
        if fmt in ("dicom", "dicom-series"):
            first = path if fmt == "dicom" else next(
                (f for f in sorted(path.iterdir()) if f.is_file() and f.suffix.lower() in (".dcm", ".dicom", ".ima")),
                None)
            return first is not None and \
                str(getattr(io._dcmread(first, stop_before_pixels=True), "Modality", "")) == "CT"
    except Exception:  # noqa: BLE001 - detection only; the reader reports the real problem
        return False
    return False


def reconstruct_file(input_path: Path, out_dir: Path, model: str | None, solver: str = "dds", accel: float = 4.0,
                     mask_kind: str = "random1d", center_fraction: float = 0.08, steps: int = 50, seed: int = 0,
                     samples: int = 1, noise: float = 0.0, coils: int = 1, slice_index: int | None = None,
                     compare: tuple[str, ...] = ("zero-filled",), lam: float | None = None,
                     command: str = "", views: int | None = None, limited_angle: float | None = None,
                     dose: float | None = None, dicom: bool = False, mri_options: tuple[str, ...] = (),
                     cg_iters: int | None = None) -> dict:
    """The ``mediff reconstruct`` job: writes recon NIfTI (+ zero-filled for MRI / fbp for CT),
    metrics.json and report.html (+ recon_dicom/ with ``dicom``) into ``out_dir`` (which the caller
    creates atomically). Returns the metrics record.

    CT mode when the prior's normalisation is a HU window, any of ``views`` / ``limited_angle`` /
    ``dose`` is given, the solver is ``fbp``, or the input declares itself CT (sinogram / ``hu`` NPZ,
    DICOM Modality CT). ``mri_options`` names MRI options the user set; CT mode ignores them with a note.
    ``compare`` names of the other modality's baselines are skipped. ``cg_iters`` overrides the CG steps
    per update of a solver with a data-consistency prox (dds, ddnm, dps, mcg).
    """
    import json

    from mediff import __version__
    from mediff.prior import load_prior
    from mediff.synthesis import progress_callback

    if samples < 1 or steps < 1:
        raise MediffError("--samples and --steps must be positive")
    every = dict.fromkeys([*SOLVERS, *BASELINES, *CT_BASELINES])
    if solver not in every:
        raise MediffError(f"unknown solver {solver!r}; choose from {', '.join(every)}")
    if cg_iters is not None:
        with_cg = [k for k, v in SOLVERS.items() if v.guidance != "none"]
        if solver not in with_cg:
            raise MediffError(f"--cg-iters sets the data-consistency CG of {', '.join(with_cg)}, not {solver}")
        if cg_iters < 1:
            raise MediffError(f"--cg-iters must be >= 1, got {cg_iters}")
    input_path = Path(input_path)
    prior = load_prior(model) if solver in SOLVERS else None
    ct = (prior is not None and prior.meta.get("normalization", {}).get("kind") == "hu_window") or \
        views is not None or limited_angle is not None or dose is not None or solver == "fbp" or _looks_ct(input_path)
    if solver not in SOLVERS:
        _check_baseline("ct" if ct else "mri", solver)
    if ct:
        from mediff.recon_ct import DEFAULT_VIEWS, prepare_ct

        task = prepare_ct(input_path, prior.image_size if prior is not None else None,
                          DEFAULT_VIEWS if views is None else views, limited_angle, dose, seed,
                          normalization=None if prior is None else prior.meta.get("normalization"),
                          slice_index=slice_index, prior_name=None if prior is None else prior.name)
        if mri_options:
            task.notes.append(f"MRI options ignored for CT: {', '.join(mri_options)}")
        label = f"{solver} {task.info['views']} views"
    else:
        size = prior.image_size if prior is not None else 128
        task = prepare_mri(input_path, size, accel, mask_kind, center_fraction, seed, coils, noise, slice_index)
        label = f"{solver} x{task.info['accel']:.1f}"
    allowed = CT_BASELINES if ct else BASELINES
    if solver in SOLVERS and cg_iters is None:
        cg_iters = solver_cg_iters(task, solver)
    with progress_callback(steps, label) as cb:
        res = run_solver(task, solver, prior, steps, seed, samples, lam, progress=cb if solver in SOLVERS else None,
                         cg_iters=cg_iters)
    rows = [{"method": solver, **score(task, res.mean), "NFE": res.nfe, "seconds": round(res.seconds, 2)}]
    companion = COMPANION[task.kind]
    others = {solver: res}
    # Baselines of the other modality in ``compare`` are skipped; CT always lists FBP, MRI computes the
    # zero-filled image for its output file without a row unless asked.
    listed = [c for c in compare if c in allowed] + ([companion] if ct else [])
    for name in dict.fromkeys(listed + [companion]):
        if name not in others:
            r = run_solver(task, name, lam=None)
            others[name] = r
            if name in listed:
                rows.append({"method": name, **score(task, r.mean), "NFE": 0, "seconds": round(r.seconds, 2)})
    if task.window is not None:
        lo, hi = task.window
        units = (f"PSNR/SSIM/NMSE on the working grid, HU clipped to [{lo:g}, {hi:g}] (data_range {hi - lo:g}); "
                 f"NMSE of the clipped HU measured from {lo:g}")
    else:
        units = "PSNR/SSIM/NMSE on the working grid in normalised units, data_range = reference max"
    record = {"solver": solver, "modality": task.kind, "model": None if prior is None else prior.name, "nfe": res.nfe,
              "seconds": round(res.seconds, 3), "metrics": rows, "notes": task.notes, "problem": task.info,
              "units": units, "seed": seed, "samples": samples, "steps": steps,
              "cg_iters": cg_iters, "mediff": __version__,
              "command": command}
    if ct and mri_options:
        record["ignored_options"] = list(mri_options)
    if res.std is not None and task.reference is not None:
        record["coverage90"] = float(metrics.coverage(res.samples, task.reference, level=0.9)[0])
    _write_outputs(Path(out_dir), task, res, others[companion], record, dicom=dicom,
                   dicom_reference=input_path if io.detect_format(input_path) == "dicom" else None)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(record, indent=2))
    return record


def _write_outputs(out: Path, task: Task, res: ReconResult, comp: ReconResult, record: dict, dicom: bool = False,
                   dicom_reference: Path | None = None) -> None:
    """recon.nii.gz, the companion baseline (zero_filled / fbp .nii.gz), std.nii.gz, recon_dicom/ and
    report.html. NIfTI/DICOM are in input units on the input grid (CT: HU); report panels show the
    working grid (CT: HU in the metric window)."""
    from mediff.report import Panel, write_report

    companion = COMPANION[task.kind]
    recon = task.input_units(res.mean)
    io.write_nifti(out / "recon.nii.gz", recon, task.affine)
    io.write_nifti(out / f"{companion.replace('-', '_')}.nii.gz", task.input_units(comp.mean), task.affine)
    if res.std is not None:
        io.write_nifti(out / "std.nii.gz", task.input_units(res.std, shift=False), task.affine)
    if dicom:
        io.write_dicom(out / "recon_dicom", np.asarray(recon, dtype=np.float32)[..., None],
                       modality="CT" if task.kind == "ct" else "MR", affine=task.affine, reference=dicom_reference,
                       series_description=f"mediff {record['solver']}")

    def shown(x: Tensor) -> np.ndarray:  # working grid, in the report's display units
        a = x[0, 0].detach().float().cpu().numpy()
        return a * task.scale + task.offset if task.window is not None else a

    if task.window is not None:
        lo, hi = task.window
    else:
        shown_ref = task.reference if task.reference is not None else res.mean
        lo, hi = 0.0, float(torch.quantile(shown_ref.flatten(), 0.995))
    panels = []
    if task.reference is not None:
        panels.append(Panel("reference", shown(task.reference), vmin=lo, vmax=hi))
    panels += [Panel(f"{record['solver']} (NFE {res.nfe})", shown(res.mean), vmin=lo, vmax=hi),
               Panel(companion, shown(comp.mean), vmin=lo, vmax=hi)]
    if task.kind == "mri":
        panels.append(Panel(f"mask (x{task.info['accel']:.2f})", task.display.astype(np.float32), kind="mask"))
    elif task.display is not None:
        panels.append(Panel(f"sinogram ({task.info['views']} views, {task.info['angles']})",
                            np.asarray(task.display, dtype=np.float32), caption="line integrals (views x detectors)"))
    if task.reference is not None:
        ref = shown(task.reference)
        err = 0.2 * (hi - lo) if task.window is None else 0.1 * (hi - lo)
        panels += [Panel(f"|error| {record['solver']}", np.abs(shown(res.mean) - ref), kind="error", vmin=0, vmax=err),
                   Panel(f"|error| {companion}", np.abs(shown(comp.mean) - ref), kind="error", vmin=0, vmax=err)]
    if res.std is not None:
        std = res.std[0, 0].numpy() * (task.scale if task.window is not None else 1.0)
        panels.append(Panel(f"posterior std ({record['samples']} samples)", std, kind="uncertainty",
                            caption=f"90% interval coverage {record.get('coverage90', float('nan')):.3f}"))
    meta = {"command": record["command"], "model": record["model"], "seed": record["seed"], "steps": record["steps"],
            "mediff": record["mediff"]}
    title = "mediff CT reconstruction" if task.kind == "ct" else "mediff MRI reconstruction"
    write_report(out / "report.html", title, panels, record["metrics"], task.notes, meta)
