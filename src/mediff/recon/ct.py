"""CT reconstruction problems from files: as a ``CTTask``.

Inputs:

* a CT image in HU (DICOM file or series, NIfTI, NPY, NPZ with ``hu``), 2D or a volume (the middle
  axial slices one by one (``ct_source``); NPY/NPZ stacks are (slices, H, W)), checked with ``check_hu``.
  A sinogram is simulated from it: parallel beam, or fan beam with a flat detector (``geometry``);
  sparse view (``views`` over 180 degrees, 360 for fan beam), limited angle (``views`` over
  [0, limited_angle) degrees) and/or low dose (Poisson counts, ``dose`` = I0 photons per detector
  bin, from ``seed``). It is measured on the slice's own grid, as a scanner measures the object: on
  a prior's grid when that is the slice's (a native-resolution prior), else at full resolution and
  rebinned onto the coarser N x N working grid's detector (``hu_task``; a non-square slice is
  resampled onto the working grid first, with air padding; the working pixel is the input spacing
  times the downsampling factor, so line integrals keep their physical scale). The input slice is the
  reference, on its own grid (``Task.input_reference``).
* an NPZ holding a measured parallel-beam sinogram: ``sinogram`` (n_views, n_det) of line integrals,
  ``angles_deg`` (n_views,), ``image_size`` N (n_det must be ParallelBeamCT's default for N: the
  image diagonal in one-pixel bins), optional ``pixel_size_mm`` (default 1) and ``reference_hu``
  (N, N). The detector is rebinned (exact area average) onto the working grid's bins; ``dose``,
  if given, is the scan's I0 and sets the noise model.

Units: CT priors work in u = (HU - hu_min) / (hu_max - hu_min) (metadata normalisation "hu_window",
default [-1000, 1000]: u = (HU + 1000) / 2000). Attenuation is affine in HU, mu = mu_w (1 + HU/1000)
(``ct.MU_WATER_PER_MM``), so mu = a u + b with a = mu_w (hu_max - hu_min) / 1000 and
b = mu_w (1 + hu_min / 1000) (1/mm; b = 0 for the default window). The line integrals y = A mu
become (y - A(b 1)) / a = A u: a linear problem in u, which every solver and baseline handles
unchanged. One more constant: ||A||^2 ~ N V px^2 (N x N grid, V views, px mm), and DPS / MCG take
likelihood-gradient steps that are only stable for ||A|| ~ 1 (as for MRI's orthonormal FFT). So the
task's operator is op = A / k with k = px sqrt(N V) (``ParallelBeamCT`` with pixel_size_mm = 1 /
sqrt(N V), ||op|| ~ 1) and y_u = (y - A(b 1)) / (a k) = op u; noise stds are divided by a k likewise.
FBP is calibrated for any pixel size, so FBP of y_u is u; TV weights are relative to ||op||^2.

Noise: for low dose, var(p) ~ exp(p) / I0 per bin (Poisson counts, delta method, p the measured
line integral): bins behind dense anatomy are far noisier than bins through air. The task carries
the mean noise std s = sqrt(mean var) / (a k) in u units and per-bin weights w = s / std_bin
(``CTTask.weights``); the diffusion solvers and TV solve the whitened problem (w op, w y), whose noise
is homoscedastic with std s: penalised weighted least squares. FBP uses the unweighted data.
Noiseless data: 0 and no weights (data consistency is enforced exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mediff import baselines, io
from mediff.errors import MediffError
from mediff.physics.ct import MU_WATER_PER_MM, FanBeamCT, ParallelBeamCT, check_hu, check_sinogram, fbp, hu_to_mu, \
    limited_angle_angles, simulate_sinogram, sparse_view_angles
from mediff.physics.operators import LinearOperator, Weighted
from mediff.recon import policy
from mediff.recon.grid import GridMap, InputGrid, fit_to_grid, pick_slice, slice_count
from mediff.recon.options import CTOptions
from mediff.recon.task import SliceSource, Task
from mediff.report import Panel

METRIC_WINDOW = (-1000.0, 1000.0)  # HU window of PSNR/SSIM (data_range 2000)
FINE_GRID = 256  # working grids above this many pixels a side are "ct-fine" for the solvers' CG count
MAX_BASELINE_SIZE = 1024  # working grid without a prior: the input grid, downsampled to at most this
# Volumes are reoriented so slices look like stored axial DICOM images (rows to P, columns to L),
# the way CT training slices are stored.
CT_SLICE_ORIENTATION = ("P", "L", "S")


def hu_window(normalization: dict | None, prior_name: str | None = None) -> tuple[float, float]:
    """(hu_min, hu_max) of a prior's metadata normalisation ({"kind": "hu_window", "hu_min", "hu_max"},
    or ``units.Normalization.to_dict`` form); None -> (-1000, 1000). Non-CT normalisations raise."""
    if normalization is None:
        return -1000.0, 1000.0
    kind = normalization.get("kind")
    if kind != "hu_window":
        who = f"prior {prior_name}" if prior_name else "the prior"
        raise MediffError(f"{who} is not a CT prior (normalization {kind!r}, expected 'hu_window'): "
                          "use a CT prior, or --solver fbp / tv")
    params = normalization.get("params") or {}
    try:
        lo = float(normalization.get("hu_min", params.get("hu_min", normalization.get("offset", -1000.0))))
        hi = float(normalization.get("hu_max", params.get("hu_max", lo + float(normalization.get("scale", 2000.0)))))
    except (TypeError, ValueError):
        raise MediffError(f"invalid hu_window normalization {normalization!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise MediffError(f"invalid hu_window normalization: hu_min {lo} must be below hu_max {hi}")
    return lo, hi


def u_coefficients(hu_min: float, hu_max: float, mu_water: float = MU_WATER_PER_MM) -> tuple[float, float]:
    """(a, b) in 1/mm with mu = a u + b for u = (HU - hu_min) / (hu_max - hu_min)."""
    return mu_water * (hu_max - hu_min) / 1000.0, mu_water * (1.0 + hu_min / 1000.0)


def _check_options(options: CTOptions) -> None:
    views, limited_angle, dose = options.views, options.limited_angle, options.dose
    if options.geometry not in (None, "parallel", "fan"):
        raise MediffError(f"--geometry must be parallel or fan, got {options.geometry!r}")
    if not options.fan and (options.source_distance is not None or options.detector_distance is not None):
        raise MediffError("--source-distance / --detector-distance set the fan beam: add --geometry fan")
    src, det = options.distances
    if not (math.isfinite(src) and src > 0 and math.isfinite(det) and det >= 0):
        raise MediffError(f"fan-beam distances must be finite, source > 0 and detector >= 0 mm, got {src}, {det}")
    if views is not None and (int(views) != views or views < 1):
        raise MediffError(f"--views must be a positive integer, got {views!r}")
    if limited_angle is not None and not 0.0 < float(limited_angle) <= 180.0:
        raise MediffError(f"--limited-angle must be in (0, 180] degrees, got {limited_angle!r}")
    if dose is not None and not (math.isfinite(float(dose)) and float(dose) > 0):
        raise MediffError(f"--dose must be a positive photon count I0, got {dose!r}")


def fit_hu(hu: np.ndarray, size: int, pixel_size_mm: float) -> tuple[np.ndarray, GridMap,
                                                                      float, str | None]:
    """An HU slice (H, W) on the size x size working grid (area downsampling, padded with air) ->
    (HU (size, size), map back to (H, W), working pixel size in mm, note)."""
    h, w = hu.shape
    work, back, note = fit_to_grid(np.asarray(hu, dtype=np.float32) + 1000.0, size)  # 0 = air: pads with air
    factor = max(h, w) / size if max(h, w) > size else 1.0
    # ``back`` crops and interpolates bilinearly (weights sum to 1), so it maps HU to HU directly.
    return work - 1000.0, back, pixel_size_mm * factor, note


def _sinogram_noise(p: torch.Tensor, dose: float) -> tuple[float, torch.Tensor]:
    """Noise of line integrals p at I0 = ``dose`` (Poisson, delta method var = exp(p) / I0): the mean
    std sqrt(mean var) and the per-bin whitening weights sqrt(mean var / var) (float32, p's shape)."""
    var = torch.exp(p.double()) / dose
    mean = var.mean()
    return float(mean.sqrt()), (mean / var).sqrt().float()


def unit_operator(n: int, angles_deg: torch.Tensor, pixel_size_mm: float, options: CTOptions = CTOptions()
                  ) -> tuple[ParallelBeamCT | FanBeamCT, float]:
    """The u-problem's operator op = A / k (||op|| ~ 1) and k = pixel_size_mm sqrt(N V), so that the
    physical projector of the N x N grid with ``pixel_size_mm`` pixels is A = k op (parallel beam, or
    fan beam with ``options``' distances, given in mm and scaled like the pixels)."""
    unit = 1.0 / math.sqrt(n * len(angles_deg))
    k = pixel_size_mm / unit
    if options.fan:
        src, det = options.distances
        return FanBeamCT(n, angles_deg, src / k, det / k, pixel_size_mm=unit), k
    return ParallelBeamCT(n, angles_deg, pixel_size_mm=unit), k


def _u_data(y: torch.Tensor, op: ParallelBeamCT, k: float, hu_min: float, hu_max: float) -> torch.Tensor:
    """Line integrals y (1, 1, V, D) of A = k op -> y_u = (y - A(b 1)) / (a k) (float32)."""
    a, b = u_coefficients(hu_min, hu_max)
    y = y.double()
    if b != 0.0:
        y = y - k * op.A(torch.full((1, 1, op.n, op.n), b, dtype=torch.float64))
    return (y / (a * k)).float()


def _angles(options: CTOptions) -> tuple[torch.Tensor, str]:
    """The view angles (degrees) of ``options`` and their span in words: over 180 degrees for parallel
    beam, 360 for fan beam (whose opposite rays are not the same line), or the limited angle."""
    views, limited = int(options.n_views), options.limited_angle
    if limited is None:
        if options.fan:
            return sparse_view_angles(views) * 2.0, "0-360 deg, fan beam"
        return sparse_view_angles(views), "0-180 deg"
    return limited_angle_angles(views, limited), f"0-{float(limited):g} deg (limited angle)" + \
        (", fan beam" if options.fan else "")


def _geometry(options: CTOptions) -> str:
    if not options.fan:
        return "parallel-beam"
    src, det = options.distances
    return f"fan-beam (flat detector; source {src:g} mm and detector {det:g} mm from the isocentre)"


@dataclass(kw_only=True)
class CTTask(Task):
    """A CT problem in u units: op maps a u image (1, 1, N, N) to a sinogram (1, 1, V, D) (``op = A / k``,
    module docstring). sinogram: (V, D) line integrals shown in the report, or None; weights: like y,
    noise_sigma / std per bin when the noise varies per bin (low dose), else None; window: HU window
    of the metrics."""

    sinogram: np.ndarray | None = None
    weights: Tensor | None = None
    window: tuple[float, float] = METRIC_WINDOW

    kind: ClassVar[str] = "ct"
    baselines: ClassVar[tuple[str, ...]] = ("fbp", "tv")
    companion: ClassVar[str] = "fbp"
    title: ClassVar[str] = "mediff CT reconstruction"
    dicom_modality: ClassVar[str] = "CT"
    error_fraction: ClassVar[float] = 0.1

    def data(self) -> tuple[LinearOperator, Tensor]:
        """Whitened by ``weights`` when the noise varies per bin (weighted least squares), the noise std
        then being ``noise_sigma`` everywhere."""
        if self.weights is None:
            return self.op, self.y
        return Weighted(self.op, self.weights), self.weights * self.y

    def normal_diagonal(self) -> Tensor | None:
        """With per-bin weights (low dose), A^T W A 1: for a non-negative A it bounds the diagonal
        sum_i w_i a_ij^2 from above (the separable-quadratic-surrogate diagonal), and it follows the
        weights, which fall by orders of magnitude on rays through bone and a thick body. Floored at
        1e-3 of its maximum, so pixels no ray sees are not divided by ~0. Unweighted data: None (the
        projector's own diagonal is flat inside the field of view)."""
        if self.weights is None:
            return None
        d = self.solver_operator().normal(torch.ones(1, 1, *self.shape))
        return d.clamp_min(1e-3 * float(d.max()))

    @property
    def shape(self) -> tuple[int, int]:
        return self.op.n, self.op.n

    @property
    def summary(self) -> str:
        return f"{self.info['views']} views"

    @property
    def family(self) -> str:
        # Every CG step costs a projection and a back-projection, 16x more on a 512-px grid than on
        # 128 px: fine grids get their own CG count (policy.DDS_CG_ITERS), a trade of time for accuracy.
        return "ct" if self.op.n <= FINE_GRID else "ct-fine"

    def image(self, x: Tensor) -> Tensor:
        return x.real.float()

    def baseline(self, method: str, lam: float | None) -> Tensor:
        self.check_baseline(method)
        x0 = fbp(self.op, self.y)
        if method == "fbp":
            return x0
        # TV: the weight is relative to ||A||^2 (policy.BASELINE_LAMBDA), started at FBP; PWLS for low dose,
        # whose bin weights span orders of magnitude: PDHG then takes per-entry steps from the row and
        # column sums of the (non-negative) weighted projector, or the heaviest rays would set one step
        # for all and it would not converge in BASELINE_ITERS.
        key = self.family if self.weights is None else f"{self.family}-pwls"
        lam = policy.BASELINE_LAMBDA[key][method] if lam is None else lam
        op, y = self.data()
        s = float(baselines.op_norm(op, x0, 30)[0]) * 1.01
        sums = None if self.weights is None else (op.A(torch.ones_like(x0)), op.AH(torch.ones_like(y)))
        return baselines.tv_reconstruct(op, y, lam * s * s, iters=policy.BASELINE_ITERS["ct"], x0=x0, a_norm=s,
                                        abs_sums=sums)

    def scored(self, image: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, float]:
        """Both in HU clipped to the window and measured from its lower end (air = 0): data_range is the
        window's width, and NMSE is relative to the clipped HU."""
        lo, hi = self.window
        img, ref = ((t * self.scale + self.offset).clamp(lo, hi) - lo for t in (image, reference))
        return img, ref, hi - lo

    @property
    def metric_units(self) -> str:
        lo, hi = self.window
        return (f"PSNR/SSIM/NMSE of HU clipped to [{lo:g}, {hi:g}] (data_range {hi - lo:g}); "
                f"NMSE of the clipped HU measured from {lo:g}")

    def shown(self, x: Tensor) -> np.ndarray:
        return x[0, 0].detach().float().cpu().numpy() * self.scale + self.offset

    def shown_std(self, std: Tensor) -> np.ndarray:
        return std[0, 0].detach().float().cpu().numpy() * self.scale

    def display_range(self, fallback: Tensor) -> tuple[float, float]:
        return self.window

    def data_panels(self) -> list[Panel]:
        if self.sinogram is None:
            return []
        return [Panel(f"sinogram ({self.info['views']} views, {self.info['angles']})",
                      np.asarray(self.sinogram, dtype=np.float32), caption="line integrals (views x detectors)")]


def simulate_ct(hu: np.ndarray, options: CTOptions = CTOptions(), seed: int = 0, pixel_size_mm: float = 1.0,
                hu_range: tuple[float, float] = (-1000.0, 1000.0)) -> CTTask:
    """The CT problem of an HU slice (N, N) on the working grid (see module docstring); the slice
    (in u units) is the reference. Attenuation below air (HU < -1000) is clipped to 0 for simulation."""
    _check_options(options)
    views, dose = options.n_views, options.dose
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim != 2 or hu.shape[0] != hu.shape[1]:
        raise MediffError(f"the CT working grid must be square (N, N), got {hu.shape}")
    hu_min, hu_max = hu_range
    y, op, k, angles, span = _simulate(hu, pixel_size_mm, options, seed)
    a, _ = u_coefficients(hu_min, hu_max)
    noise, weights = (0.0, None) if dose is None else _sinogram_noise(y, dose)
    noise /= a * k
    ref = torch.from_numpy(((hu - hu_min) / (hu_max - hu_min)).astype(np.float32))[None, None]
    notes = [_simulation_note(options, seed, span)]
    info = {"source": "simulated from image", "views": int(views), "angles": span, "dose_I0": dose,
            "geometry": _geometry(options),
            "pixel_size_mm": float(pixel_size_mm), "grid": hu.shape[0], "hu_window": [hu_min, hu_max],
            "noise_sigma_u": noise}
    return CTTask(op=op, y=_u_data(y, op, k, hu_min, hu_max), noise_sigma=noise, scale=hu_max - hu_min,
                  reference=ref, notes=notes, info=info, offset=hu_min, sinogram=y[0, 0].float().numpy(),
                  weights=weights)


def _simulate(hu: np.ndarray, px: float, options: CTOptions, seed: int
              ) -> tuple[Tensor, ParallelBeamCT | FanBeamCT, float, Tensor, str]:
    """The sinogram ``options`` measure of an HU slice (N, N) of ``px`` mm pixels on its own grid:
    (physical line integrals (1, 1, V, D) float64, the unit operator op and k with A = k op, the view
    angles (V,) in degrees, their span in words). Attenuation below air is clipped to 0; low-dose
    counts are drawn from ``seed``."""
    angles, span = _angles(options)
    op, k = unit_operator(hu.shape[0], angles, px, options)
    mu = hu_to_mu(torch.from_numpy(np.clip(np.asarray(hu, dtype=np.float64), -1000.0, None)))[None, None]
    gen = torch.Generator().manual_seed(seed) if options.dose is not None else None
    return simulate_sinogram(mu * k, op, options.dose, generator=gen), op, k, angles, span  # A mu = op (k mu)


def _simulation_note(options: CTOptions, seed: int, span: str, where: str = "") -> str:
    return (f"{_geometry(options)} sinogram simulated from the HU image{where}: {int(options.n_views)} views over "
            f"{span}" + ("" if options.dose is None else f", low dose I0 = {options.dose:g} photons/bin (Poisson, "
                         f"seed {seed}); diffusion solvers and TV weight each bin by its inverse noise std "
                         "(penalised weighted least squares)"))


def ct_source(path: Path, size: int | None, options: CTOptions = CTOptions(), seed: int = 0,
              normalization: dict | None = None, prior_name: str | None = None) -> SliceSource:
    """The CT slices of ``path`` in the prior's u units (module docstring): a volume's axial slices, a
    numpy stack's slices, or the one slice of a 2D image or sinogram file.

    size: working grid N (the prior's image size); None = the input grid, at most MAX_BASELINE_SIZE
    (baselines without a prior). normalization: the prior's metadata normalisation (None: HU window
    [-1000, 1000]); a non-CT one raises MediffError.
    """
    hu_range = hu_window(normalization, prior_name)
    _check_options(options)
    path = Path(path)
    fmt = io.detect_format(path)
    if fmt == "npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                is_sino = "sinogram" in z.files
        except (OSError, ValueError) as exc:
            raise MediffError(f"cannot read npz {path}: {exc}") from None
        if is_sino:
            return SliceSource(1, lambda k: _prepare_sinogram(path, size, options, hu_range), "sinograms")
    img = io.read_image(path)
    stack = fmt in ("npy", "npz") and np.ndim(img.array) == 3
    n = img.array.shape[0] if stack else slice_count(img, CT_SLICE_ORIENTATION, axis=2)
    return SliceSource(n, lambda k: _image_task(img, path, fmt, k, size, options, seed, hu_range),
                       "slices" if stack else "axial slices")


def prepare_ct(path: Path, size: int | None, options: CTOptions = CTOptions(), seed: int = 0,
               normalization: dict | None = None, slice_index: int | None = None,
               prior_name: str | None = None) -> CTTask:
    """The CT problem of one slice of ``path`` (``slice_index``, default the middle one; ``ct_source``)."""
    source = ct_source(path, size, options, seed, normalization, prior_name)
    return source.build(source.middle(slice_index))


def _image_task(img: io.MedicalImage, path: Path, fmt: str, k: int, size: int | None, options: CTOptions, seed: int,
                hu_range: tuple[float, float]) -> CTTask:
    """Slice ``k`` of an HU image (its only slice when 2D) with a simulated sinogram."""
    image, affine, px, notes, grid = _read_hu(img, path, fmt, k)
    check_hu(image)
    task = hu_task(image, px, size, options, seed, hu_range)
    task.affine, task.grid = affine, grid
    task.notes[:0] = notes
    return task


def hu_task(hu: np.ndarray, px: float, size: int | None, options: CTOptions = CTOptions(), seed: int = 0,
            hu_range: tuple[float, float] = (-1000.0, 1000.0)) -> CTTask:
    """The CT problem of an HU slice (H, W) of ``px`` mm pixels with a simulated sinogram, on the
    size x size working grid (None: the slice's own grid, at most MAX_BASELINE_SIZE), scored against
    the slice on its own grid. A square slice larger than the working grid is measured at full
    resolution (``_simulated_at_full_resolution``); otherwise it is resampled onto the grid first."""
    own_grid = size is None
    if own_grid:
        size = max(2, min(max(hu.shape), MAX_BASELINE_SIZE))
    h, w = hu.shape
    if h == w and h > size:
        return _simulated_at_full_resolution(hu, px, size, options, seed, hu_range)
    work, back, px_work, fit_note = fit_hu(hu, size, px)
    if own_grid and fit_note:
        fit_note = fit_note.replace("the prior's", "a", 1)
    task = simulate_ct(work, options, seed, px_work, hu_range)
    task.to_input = back
    if fit_note:  # scored on the input's grid, against the input slice itself
        task.input_reference = np.asarray(hu, dtype=np.float32)
    task.notes[:0] = [fit_note] if fit_note else []
    task.notes.append(f"working grid {size}x{size}, pixel {px_work:.3g} mm")
    return task


def _simulated_at_full_resolution(hu: np.ndarray, px: float, size: int, options: CTOptions, seed: int,
                                  hu_range: tuple[float, float]) -> CTTask:
    """An HU slice (N, N) of ``px`` mm pixels reconstructed on a coarser size x size grid: its
    sinogram is simulated from the slice itself at full resolution (a scanner measures the object,
    not a downsampled copy) and rebinned onto the working grid's detector, as a measured one is; the
    task is scored against the slice on its own grid."""
    n = hu.shape[0]
    y, _, _, angles, span = _simulate(hu, px, options, seed)
    task = sinogram_task(y[0, 0].numpy(), angles.numpy(), n, px, options.dose, size, hu_range, hu, options)
    task.notes.insert(0, _simulation_note(options, seed, span, f" at its own {n}x{n} grid"))
    task.notes.append(f"working grid {size}x{size}, pixel {task.info['pixel_size_mm']:.3g} mm")
    task.info.update(source="simulated from image", views=int(options.n_views), angles=span,
                     geometry=_geometry(options))
    return task


def _read_hu(img: io.MedicalImage, path: Path, fmt: str, k: int
             ) -> tuple[np.ndarray, np.ndarray, float, list[str], InputGrid | None]:
    """Slice ``k`` of an HU image read from ``path``: the 2D HU slice, its affine, its pixel size (mm),
    notes, and where it sits on the input's voxel grid (None for 2D images and numpy stacks, which
    have no voxel grid of their own)."""
    notes: list[str] = []
    arr = np.asarray(img.array)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise MediffError(f"{path}: CT image must be real-valued HU, got {arr.dtype}")
    spacing: float | None = None
    grid = None
    if fmt in ("npy", "npz") and arr.ndim == 3:
        # A stack (slices, H, W) as numpy stores it (e.g. one slice per patient): no reorientation.
        image, affine = arr[k].astype(np.float32), np.eye(4)
        notes.append(f"slice {k} of a stack of {arr.shape[0]}")
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                if "pixel_spacing_mm" in z.files:
                    ps = np.atleast_1d(z["pixel_spacing_mm"]).astype(float)
                    spacing = float(ps[k] if ps.size == arr.shape[0] else ps[0])
    else:
        image, affine, note, grid = pick_slice(img, k, CT_SLICE_ORIENTATION, axis=2)
        if note:
            notes.append(note)
        if fmt == "npz" and arr.ndim == 2:
            with np.load(path, allow_pickle=False) as z:
                if "pixel_spacing_mm" in z.files:
                    spacing = float(np.atleast_1d(z["pixel_spacing_mm"]).astype(float)[0])
    if spacing is None:
        sp = np.linalg.norm(np.asarray(affine)[:3, :2], axis=0)
        if not img.meta.get("spacing_known", True) or not np.all(sp > 0):
            notes.append("pixel spacing unknown: 1 mm assumed")
            sp = np.ones(2)
        elif abs(sp[0] - sp[1]) > 0.01 * sp.max():
            notes.append(f"anisotropic pixels {sp[0]:.3g} x {sp[1]:.3g} mm: their mean is used")
        spacing = float(sp.mean())
    if not (math.isfinite(spacing) and spacing > 0):
        raise MediffError(f"{path}: pixel spacing must be positive, got {spacing}")
    if fmt in ("npy", "npz") and (arr.ndim == 3 or not img.meta.get("spacing_known", False)):
        affine = np.diag([spacing, spacing, 1.0, 1.0])  # no geometry stored: the pixel size only
    return image, affine, spacing, notes, grid


def _rebin(sino: np.ndarray, spacing: float, n_new: int, new_spacing: float, shift: np.ndarray) -> np.ndarray:
    """Area-average a sinogram (V, D) with bins of ``spacing`` onto ``n_new`` bins of ``new_spacing``
    (both centred; mm), the object displaced by ``shift`` (V,) mm along each view's detector; 0 outside."""
    v, d = sino.shape
    edges = (np.arange(d + 1) - d / 2.0) * spacing
    cum = np.concatenate([np.zeros((v, 1)), np.cumsum(sino * spacing, axis=1)], axis=1)  # integral to each edge
    centres = (np.arange(n_new) - (n_new - 1) / 2.0) * new_spacing
    out = np.empty((v, n_new))
    for i in range(v):
        lo = centres - new_spacing / 2.0 - shift[i]
        hi = centres + new_spacing / 2.0 - shift[i]
        integral = lambda x: np.interp(x, edges, cum[i], left=0.0, right=cum[i, -1])  # noqa: E731
        out[i] = (integral(hi) - integral(lo)) / new_spacing
    return out


def _read_sinogram(path: Path) -> tuple[np.ndarray, np.ndarray, int, float, dict]:
    """A sinogram NPZ's (sinogram (V, D), angles_deg (V,), image size N, pixel size mm, all arrays),
    validated against the geometry it declares."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("angles_deg", "image_size") if k not in z.files]
        if missing:
            raise MediffError(f"{path}: a sinogram NPZ needs {', '.join(missing)} next to 'sinogram'")
        d = {k: z[k] for k in z.files}
    try:
        sino = np.asarray(d["sinogram"], dtype=np.float64)
        angles = np.asarray(d["angles_deg"], dtype=np.float64).reshape(-1)
        n = int(np.asarray(d["image_size"]).reshape(-1)[0])
        px = float(np.asarray(d.get("pixel_size_mm", 1.0)).reshape(-1)[0])
    except (TypeError, ValueError) as exc:
        raise MediffError(f"{path}: sinogram, angles_deg, image_size and pixel_size_mm must be numeric "
                          f"({exc})") from None
    if not np.isfinite(angles).all() or angles.size == 0:
        raise MediffError(f"{path}: angles_deg must be finite and non-empty")
    if n < 2 or not (math.isfinite(px) and px > 0):
        raise MediffError(f"{path}: image_size must be >= 2 and pixel_size_mm > 0, got {n}, {px}")
    n_det = ParallelBeamCT(n, angles[:1], pixel_size_mm=px).n_detectors  # one view: cheap at any size
    check_sinogram(torch.from_numpy(sino)[None, None] if sino.ndim == 2 else torch.from_numpy(sino),
                   SimpleNamespace(n_views=angles.size, n_detectors=n_det))
    return sino.reshape(angles.size, n_det), angles, n, px, d


def _prepare_sinogram(path: Path, size: int | None, options: CTOptions, hu_range: tuple[float, float]) -> CTTask:
    """A measured parallel-beam sinogram file (module docstring) as a CTTask on the working grid."""
    views, limited_angle = options.views, options.limited_angle
    sino, angles, n, px, d = _read_sinogram(path)
    ref = None
    if "reference_hu" in d:
        ref = np.asarray(d["reference_hu"], dtype=np.float64)
        if ref.shape != (n, n):
            raise MediffError(f"{path}: reference_hu must be ({n}, {n}), got {ref.shape}")
        check_hu(ref)
    task = sinogram_task(sino, angles, n, px, options.dose, min(n, MAX_BASELINE_SIZE) if size is None else size,
                         hu_range, ref)
    task.notes.insert(0, f"measured parallel-beam sinogram: {angles.size} views over {angles.min():.4g}-"
                         f"{angles.max():.4g} deg, {n}x{n} image, pixel {px:.3g} mm")
    if (views is not None and views != angles.size) or limited_angle is not None:
        task.notes.insert(1, "--views / --limited-angle ignored: the sinogram file fixes the geometry")
    task.info["source"] = "sinogram file"
    return task


def sinogram_task(sino: np.ndarray, angles: np.ndarray, n: int, px: float, dose: float | None, size: int,
                  hu_range: tuple[float, float], reference_hu: np.ndarray | None = None,
                  options: CTOptions = CTOptions()) -> CTTask:
    """The CT problem of a sinogram (V, D) of line integrals of an n x n grid of ``px`` mm pixels
    (``angles`` (V,) degrees; D = the default detector count of ``options``' geometry for n) on the
    size x size working grid: the detector is rebinned onto the working grid's bins when the grids
    differ (exact area average; a fan beam's flat detector is rebinned at the isocentre, where both
    grids' bins are their pixels), and the task is scored against ``reference_hu`` (n, n) on the
    sinogram's own grid when given. ``dose``: the scan's I0, which sets the noise model (None: noiseless)."""
    n_det = sino.shape[1]
    hu_min, hu_max = hu_range
    notes: list[str] = []
    _, back, fit_note = fit_to_grid(np.zeros((n, n), np.float32), size)
    f = min(1.0, size / n)
    m = max(1, round(n * f))
    px_w = px * n / m
    op, k = unit_operator(size, torch.from_numpy(angles), px_w, options)
    noise_p = 0.0 if dose is None else _sinogram_noise(torch.from_numpy(sino), dose)[0]
    if (m, px_w) != (size, px) or op.n_detectors != n_det:
        # Object centre in the working grid (``fit_to_grid`` pads top/left by (size - m) // 2), in mm.
        off = ((size - m) // 2 + (m - 1) / 2.0 - (size - 1) / 2.0) * px_w
        th = np.deg2rad(angles)
        shift = off * np.cos(th) - off * np.sin(th)  # s of the centre (x = off, y = -off)
        sino = _rebin(sino, px, op.n_detectors, px_w, shift)
        noise_p /= math.sqrt(max(1.0, px_w / px))  # averaging over px_w / px bins
        notes.append(f"detector rebinned to the {size}x{size} working grid ({px_w:.3g} mm bins)")
    if fit_note:
        notes.append(fit_note.replace("image", "reconstruction grid", 1))
    a, _ = u_coefficients(hu_min, hu_max)
    noise = noise_p / (a * k)
    notes.append("noise from the counts model at I0 = {:g}".format(dose) if dose is not None else
                 "no --dose: the data are treated as noiseless")
    y = torch.from_numpy(sino).reshape(1, 1, *sino.shape[-2:])
    weights = None if dose is None else _sinogram_noise(y, dose)[1]  # relative: rebinning scales all bins alike
    ref = None
    if reference_hu is not None:
        work, _, _, _ = fit_hu(reference_hu, size, px)
        ref = torch.from_numpy(((work - hu_min) / (hu_max - hu_min)).astype(np.float32))[None, None]
    info = {"views": int(angles.size), "angles": f"{angles.min():.4g}-{angles.max():.4g} deg",
            "dose_I0": dose, "pixel_size_mm": px_w, "grid": size, "hu_window": [hu_min, hu_max], "noise_sigma_u": noise}
    return CTTask(op=op, y=_u_data(y, op, k, hu_min, hu_max), noise_sigma=noise, scale=hu_max - hu_min,
                  reference=ref, to_input=back, affine=np.diag([px, px, 1.0, 1.0]), notes=notes, info=info,
                  offset=hu_min, sinogram=y[0, 0].float().numpy(), weights=weights,
                  input_reference=None if reference_hu is None or not fit_note else
                  np.asarray(reference_hu, dtype=np.float32))
