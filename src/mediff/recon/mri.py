"""MRI problems: a fully-sampled image (k-space simulated) or measured k-space, as an ``MRITask``.

Inputs: a fully-sampled image or volume (k-space is simulated per slice: single-coil, or ``coils``
simulated coil maps), fastMRI-style HDF5 (``kspace`` (C, H, W) or (S, C, H, W), fastMRI single-coil
(S, H, W); optional ``mask``), or NPZ with ``kspace`` and ``mask``; every slice is its own problem
(``mri_source``). Everything is solved in the prior's normalised units: the scale is the 99.5th
percentile of the zero-filled magnitude, known from the data alone, and undone on output.

Phase: the priors model magnitude images. The complex image is written x * phase with a fixed phase,
so solvers work on a real x through ``MagnitudeMRI`` (a ``PhaseModulated``); whatever the fixed phase
misses, the data term pushes into the magnitude. Measured k-space carries real MR phase
(off-resonance, susceptibility, the coil combination) with structure beyond the fully-sampled
centre: its phase is that of a TV reconstruction of all acquired lines (``data_phase``). k-space
simulated from a magnitude image is real by construction up to the coil combination's smooth phase,
which the low-resolution image of the fully-sampled centre captures exactly, whereas TV's phase
carries its aliasing residue (``lowres_phase`` on the whole ``calib_region``: for 1D masks all rows of
the centre columns). Classical baselines reconstruct the complex image directly.

Noise: simulated k-space knows its noise (``noise``); for measured k-space the noise std per complex
entry is estimated from the outer k-space (``estimate_noise_sigma``) and handed to the solvers.
Multi-coil data also carry the error of the estimated coil maps: the solvers' likelihood std is the
larger of the noise std and the SENSE least-squares residual std (``sense_residual_sigma``), so
solvers that enforce the data to convergence do not fit the maps' miss as image detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mediff import baselines, io
from mediff.errors import MediffError
from mediff.physics.masks import make_mask
from mediff.physics.mri import MagnitudeMRI, MultiCoilMRI, SingleCoilMRI, check_kspace, estimate_coil_maps, \
    estimate_noise_sigma, ifft2c, lowres_phase, rss, sense_residual_sigma, simulate_coil_maps, simulate_kspace, \
    unit_phase
from mediff.physics.operators import CenterCrop, LinearOperator, PhaseModulated
from mediff.recon import policy
from mediff.recon.grid import fit_to_grid, pick_slice, slice_count
from mediff.recon.options import MRIOptions
from mediff.recon.task import SliceSource, Task
from mediff.report import Panel

# ESPIRiT's support threshold on the top eigenvalue (``estimate_coil_maps``' ``crop``;
# benchmarks/espirit_crop.py compares thresholds).
ESPIRIT_CROP = 0.95
# The network's grid must be divisible by this: k-space files of other sizes are embedded in a padded
# grid that A crops back.
GRID_MULTIPLE = 16


@dataclass(kw_only=True)
class MRITask(Task):
    """An MRI problem: op maps a complex image (1, 1, H, W) to k-space (1, C, H, W).

    phase: (1, 1, H, W) unit-modulus phase the magnitude is solved through (module docstring); mask: (H, W) bool sampling
    mask; support: with estimated coil maps, (1, 1, H, W) 1 inside the maps' support and 0 outside (A
    is blind outside, so whatever a solver leaves there is the prior's invention: images are zeroed
    there); row_gram: apply A^H A as per-row matrices when the mask allows (False: FFTs)."""

    phase: Tensor
    mask: np.ndarray
    support: Tensor | None = None
    row_gram: bool = True
    # (op, y, image): a TV reconstruction at the baseline's default weight that the set-up already
    # solved (measured k-space: ``data_phase``), reused by ``baseline("tv")`` while op and y are those.
    tv_solved: tuple[LinearOperator, Tensor, Tensor] | None = None

    kind: ClassVar[str] = "mri"
    baselines: ClassVar[tuple[str, ...]] = ("zero-filled", "tv", "l1wavelet")
    companion: ClassVar[str] = "zero-filled"
    title: ClassVar[str] = "mediff MRI reconstruction"
    dicom_modality: ClassVar[str] = "MR"
    error_fraction: ClassVar[float] = 0.2

    @property
    def shape(self) -> tuple[int, int]:
        # The phase lives on the image grid the solvers see: the scan's grid padded to a multiple of
        # GRID_MULTIPLE, which k-space's own shape is not.
        return tuple(self.phase.shape[-2:])

    @property
    def summary(self) -> str:
        return f"x{self.info['accel']:.1f}"

    @property
    def family(self) -> str:
        return "mri-single" if self.y.shape[1] == 1 else "mri-multi"

    def solver_operator(self) -> LinearOperator:
        op, _ = self.data()
        return MagnitudeMRI(op, self.phase) if self.row_gram else PhaseModulated(op, self.phase)

    def image(self, x: Tensor) -> Tensor:
        img = x.abs().float()
        return img if self.support is None else img * self.support

    def baseline(self, method: str, lam: float | None) -> Tensor:
        self.check_baseline(method)
        if method == "zero-filled":
            return self.op.AH(self.y)
        if method == "tv" and lam is None and self.tv_solved is not None:
            op, y, image = self.tv_solved
            if op is self.op and y is self.y:
                return image
        lam = policy.BASELINE_LAMBDA["mri"][method] if lam is None else lam
        fn = baselines.tv_reconstruct if method == "tv" else baselines.l1_wavelet_reconstruct
        return fn(self.op, self.y, lam, iters=policy.BASELINE_ITERS["mri"])

    def scored(self, image: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, float]:
        return image, reference, float(reference.max())

    @property
    def metric_units(self) -> str:
        return "PSNR/SSIM/NMSE in normalised units, data_range = reference max"

    def display_range(self, fallback: Tensor) -> tuple[float, float]:
        shown = self.reference if self.reference is not None else fallback
        return 0.0, float(torch.quantile(shown.flatten(), 0.995))

    def data_panels(self) -> list[Panel]:
        return [Panel(f"mask (x{self.info['accel']:.2f})", self.mask.astype(np.float32), kind="mask")]


def mri_source(path: Path, size: int, options: MRIOptions = MRIOptions(), seed: int = 0) -> SliceSource:
    """The MRI slices of ``path`` (module docstring), each solved on a size x size working grid (k-space
    files on their own grid, padded to a multiple of GRID_MULTIPLE): a volume's axial slices, a
    multi-slice k-space file's slices, or the one slice of a 2D image or one-slice k-space file."""
    fmt = io.detect_format(path)
    if fmt == "hdf5" or (fmt == "npz" and "kspace" in np.load(path).files):
        ksp, mask = _read_kspace(path, fmt)
        n = ksp.shape[0]
        return SliceSource(n, lambda k: _measured_task(ksp[k], mask, path, options, seed,
                                                       None if n == 1 else f"slice {k} of {n}"), "k-space slices")
    img = io.read_image(path)
    return SliceSource(slice_count(img), lambda k: _image_task(img, k, path, size, options, seed), "axial slices")


def prepare_mri(path: Path, size: int, options: MRIOptions = MRIOptions(), seed: int = 0,
                slice_index: int | None = None) -> MRITask:
    """The MRI problem of one slice of ``path`` (``slice_index``, default the middle one; ``mri_source``)."""
    source = mri_source(path, size, options, seed)
    return source.build(source.middle(slice_index))


def _measured_task(ksp: np.ndarray, mask: object, path: Path, options: MRIOptions, seed: int,
                   note: str | None) -> MRITask:
    """One slice's k-space (C, H, W) and the file's mask as a task; ``note`` names the slice."""
    task = _prepare_kspace(ksp, mask, path, options, seed)
    if note:
        task.notes.insert(0, note)
    # --noise and --coils simulate k-space from an image; measured k-space has its own coils and
    # noise (estimated from the data), so they do not apply: say so rather than ignore them.
    ignored = [name for name in ("--noise", "--coils") if name in options.changed()]
    if ignored:
        task.notes.append(f"{' and '.join(ignored)} ignored: they simulate k-space from an image; this file "
                          f"holds measured k-space ({task.info['coils']} coil(s), noise estimated from the data)")
        task.info["ignored_options"] = ignored
    return task


def _image_task(img: io.MedicalImage, k: int, path: Path, size: int, options: MRIOptions, seed: int) -> MRITask:
    """Slice ``k`` of a fully-sampled image (its only slice when 2D) with simulated k-space."""
    image, affine, note, grid = pick_slice(img, k)
    if not np.isfinite(image).all():
        raise MediffError(f"{path} contains NaN or infinite values")
    work, back, fit_note = fit_to_grid(np.clip(image, 0, None), size)
    task = simulate_mri(work, options, seed)
    task.to_input, task.affine, task.grid = back, affine, grid
    if img.meta.get("spacing_known", False):  # the working pixel: the input's, times the downsampling
        px = float(np.mean(np.linalg.norm(np.asarray(affine)[:3, :2], axis=0)))
        task.info["pixel_size_mm"] = px * max(1.0, max(image.shape) / size)
    if fit_note:  # scored on the input's grid, against the input slice itself
        task.input_reference = np.clip(image, 0, None).astype(np.float32)
    task.notes[:0] = [n for n in (note, fit_note) if n]
    return task


def simulate_mri(image: np.ndarray, options: MRIOptions = MRIOptions(), seed: int = 0) -> MRITask:
    """The MRI problem of a fully-sampled magnitude image (H, W) on the working grid: mask, optional
    simulated coils (maps then re-estimated from the data by ESPIRiT) and noise, all from ``seed``."""
    o = options
    m = make_mask(o.mask, image.shape, o.accel, o.center_fraction, seed)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(torch.complex64)
    region = calib_region(m.mask)
    ref_scale = float(np.percentile(image, 99.5)) or 1.0
    gen = torch.Generator().manual_seed(seed)
    maps = simulate_coil_maps(image.shape, o.coils) if o.coils > 1 else None
    k = simulate_kspace(x, m.mask, coil_maps=maps, noise_sigma=o.noise * ref_scale, generator=gen)
    notes = ["k-space simulated from a magnitude image (retrospective undersampling)"]
    if o.coils > 1:
        notes.append(f"{o.coils} coils simulated; sensitivities estimated from the data by ESPIRiT "
                     f"({region[0]}x{region[1]} calibration region)")
        op: SingleCoilMRI = MultiCoilMRI(m.mask, coil_maps(k[0], region))
    else:
        op = SingleCoilMRI(m.mask)
    scale = _scale_of(op, k)
    ref = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None] / scale
    info = {"source": "simulated from image", "accel": m.accel, "mask": o.mask, "center_fraction": o.center_fraction,
            "coils": o.coils, "noise": o.noise, "noise_sigma": o.noise * ref_scale / scale}
    sigma = _with_model_error(op, k, o.noise * ref_scale, scale, notes, info) / scale
    return MRITask(op=op, y=k / scale, noise_sigma=sigma, scale=scale, reference=ref, notes=notes, info=info,
                   phase=lowres_phase(k, op, region), mask=m.mask, support=_support(op))


def data_tv(op: LinearOperator, y: Tensor) -> Tensor:
    """The TV reconstruction (B, 1, H, W) of k-space ``y`` (B, C, H, W) in the prior's normalised units
    with the TV baseline's weight and iterations (``policy``): what :func:`data_phase` takes the phase of."""
    return baselines.tv_reconstruct(op, y, policy.BASELINE_LAMBDA["mri"]["tv"], iters=policy.BASELINE_ITERS["mri"])


def data_phase(op: LinearOperator, y: Tensor) -> Tensor:
    """Unit-modulus phase (B, 1, H, W) of the TV reconstruction of k-space ``y`` (B, C, H, W) in the
    prior's normalised units (:func:`data_tv`); 1 where it is 0.

    Why TV of all the data rather than the low-resolution image of the fully-sampled centre
    (``lowres_phase``) for measured k-space: the centre holds a small fraction of the lines, so its
    phase is blurred along the undersampled direction, while TV fits every acquired line and, acting
    on the complex image, keeps phase edges. benchmarks/mri_real.py compares the two against the
    fully-sampled (oracle) phase."""
    return unit_phase(data_tv(op, y))


def _support(op: LinearOperator) -> Tensor | None:
    return op.support if isinstance(op, MultiCoilMRI) else None


def _scale_of(op: LinearOperator, y: Tensor) -> float:
    """The 99.5th percentile of the (coil-combined) zero-filled magnitude: the problem's intensity unit."""
    s = float(torch.quantile(op.AH(y).abs().flatten().float(), 0.995))
    if not np.isfinite(s) or s <= 0:
        raise MediffError("k-space gives an all-zero image: nothing to reconstruct")
    return s


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


def _read_kspace(path: Path, fmt: str) -> tuple[np.ndarray, object]:
    """(k-space (S, C, H, W), mask or None) of a k-space file. Files hold (C, H, W) or (S, C, H, W);
    fastMRI single-coil files (``single_coil``) hold (S, H, W); (H, W) is one single-coil slice."""
    if fmt == "hdf5":
        d = io.read_kspace_h5(path)
        ksp, mask = d["kspace"], d.get("mask")
        if d.get("single_coil") and np.ndim(ksp) == 3:
            ksp = np.asarray(ksp)[:, None]
    else:
        d = np.load(path)
        if "mask" not in d.files:
            raise MediffError(f"{path}: NPZ k-space needs a 'mask' array next to 'kspace'")
        ksp, mask = d["kspace"], d["mask"]
    ksp = np.asarray(ksp)
    if not 2 <= ksp.ndim <= 4:
        raise MediffError(f"{path}: kspace must be (C, H, W) or (S, C, H, W), got {ksp.shape}")
    return ksp.reshape((1,) * (4 - ksp.ndim) + ksp.shape), mask


def _kspace_mask(ksp: np.ndarray, mask: object, options: MRIOptions, seed: int, path: Path,
                 notes: list[str]) -> np.ndarray:
    """The (H, W) bool sampling mask: the file's, or a retrospective one for fully-sampled k-space, or
    the non-zero entries."""
    h, w = ksp.shape[-2:]
    if mask is None:
        if np.all(np.abs(ksp).sum(axis=(0, 1)) > 0):
            m = make_mask(options.mask, (h, w), options.accel, options.center_fraction, seed)
            notes.append(f"fully-sampled k-space undersampled retrospectively ({options.mask}, x{m.accel:.2f})")
            return m.mask.astype(bool)  # writable: torch shares it
        notes.append("mask taken from the non-zero k-space entries")
        return np.abs(ksp).sum(axis=0) > 0
    if np.ndim(mask) == 1 and np.shape(mask)[0] != w:
        raise MediffError(f"{path}: 1D mask has {np.shape(mask)[0]} entries but k-space has {w} columns")
    mask = np.asarray(mask).astype(bool)
    return np.broadcast_to(mask, (h, w)).copy() if mask.ndim == 1 else mask  # writable: torch shares it


def _prepare_kspace(ksp: np.ndarray, mask: object, path: Path, options: MRIOptions, seed: int) -> MRITask:
    """The task of one slice's measured k-space (C, H, W) under the file's ``mask`` (None: derived)."""
    notes: list[str] = []
    full = torch.from_numpy(ksp.astype(np.complex64))[None]
    h, w = ksp.shape[-2:]
    mask = _kspace_mask(ksp, mask, options, seed, path, notes)
    check_kspace(full, mask)
    y = full * torch.from_numpy(mask)
    region = calib_region(mask)
    c = y.shape[1]
    op: LinearOperator = MultiCoilMRI(mask, coil_maps(y[0], region)) if c > 1 else SingleCoilMRI(mask)
    if c > 1:
        notes.append(f"{c}-coil data; sensitivities estimated by ESPIRiT from a {region[0]}x{region[1]} calibration region")
    # A reference exists only when the file holds fully-sampled k-space (retrospective undersampling).
    ref = rss(ifft2c(full)) if bool(np.all(np.abs(ksp).sum(axis=(0, 1)) > 0)) else None
    scale = _scale_of(op, y)
    ys = y / scale
    tv = data_tv(op, ys)
    tv_solved = (op, ys, tv)  # the TV baseline on this op and data: solved once (a padded grid's op differs)
    phase = unit_phase(tv)
    notes.append("measured k-space; image phase from a TV reconstruction of all acquired lines")
    sigma_file = _noise_of(y, mask, scale, notes)
    model_info: dict = {}
    sigma_lik = _with_model_error(op, y, sigma_file, scale, notes, model_info)
    support = _support(op)
    ref_input = None
    ph, pw = -(-h // GRID_MULTIPLE) * GRID_MULTIPLE, -(-w // GRID_MULTIPLE) * GRID_MULTIPLE
    if (ph, pw) != (h, w):  # embed the image in a padded grid for the network; A crops it back
        crop = CenterCrop((ph, pw), (h, w))
        op = op @ crop
        support = None if support is None else crop.AH(support)
        phase = unit_phase(crop.AH(phase))  # 1 on the padding
        if ref is not None:
            ref_input = ref[0, 0].real.float().numpy()  # scored on the scan's own grid, not the padded one
            ref = crop.AH(ref)
        notes.append(f"image grid {h}x{w} padded to {ph}x{pw} for the network; A crops it back")

    def back(a: np.ndarray) -> np.ndarray:
        top, left = (ph - h) // 2, (pw - w) // 2
        return a[top: top + h, left: left + w]

    info = {"source": "k-space file", "accel": float(mask.size / mask.sum()), "coils": c,
            "noise_sigma": sigma_file / scale, "noise_sigma_kspace_units": sigma_file,
            "noise_estimate": "MAD of the outer 10% of sampled k-space, RMS over coils", **model_info}
    return MRITask(op=op, y=ys, noise_sigma=sigma_lik / scale, scale=scale,
                   reference=None if ref is None else ref / scale, to_input=back, notes=notes, info=info,
                   phase=phase, mask=mask, support=support, tv_solved=tv_solved, input_reference=ref_input)


def _noise_of(y: Tensor, mask: np.ndarray, scale: float, notes: list[str]) -> float:
    """Noise std of measured k-space (file units), estimated from the outer k-space; 0 if it cannot be."""
    try:
        sigma = estimate_noise_sigma(y, mask)
    except MediffError as exc:
        notes.append(f"noise not estimated ({exc}); solvers assume noiseless data")
        return 0.0
    notes.append(f"noise std {sigma:.4g} per complex k-space entry (normalised {sigma / scale:.4g}), "
                 f"estimated from the outer 10% of the sampled k-space (MAD)")
    return sigma


def espirit_kernel(region: tuple[int, int]) -> int:
    """ESPIRiT kernel side for a calibration ``region`` (rows, cols): 6, smaller for narrow regions (a
    10-column centre with a 6 x 6 kernel leaves too few patches and the support collapses)."""
    return max(3, min(6, min(region) // 2 - 1))


def coil_maps(kspace: Tensor, region: tuple[int, int]) -> Tensor:
    """ESPIRiT maps (C, H, W) calibrated on the fully-sampled ``region`` (rows, cols)."""
    return estimate_coil_maps(kspace, calib_size=region, kernel_size=espirit_kernel(region), crop=ESPIRIT_CROP)


def calib_region(mask: np.ndarray) -> tuple[int, int]:
    """(rows, cols) of the fully-sampled centre: every row of the contiguous centre columns for 1D
    masks, else the largest fully-sampled centred square (Poisson-disc, radial). Raises MediffError
    below 4 so coil maps are never calibrated on a handful of samples."""
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
        raise MediffError("the mask has no fully-sampled centre of >= 4 lines to calibrate on (raise "
                          "--center-fraction)")
    return side, side
