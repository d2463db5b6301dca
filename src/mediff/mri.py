"""MRI physics: centred FFTs, single-/multi-coil (SENSE) operators, coil maps, k-space simulation,
noise-level estimation.

Conventions
-----------
* Images are complex tensors (B, 1, H, W); real input is promoted to complex (float64 -> complex128,
  anything else -> complex64). Measurements are (B, C, H, W) complex k-space (C coils, C = 1 for
  single-coil) in *centred* layout (DC at (H // 2, W // 2)), with unsampled entries exactly zero.
* The Fourier transform is the centred orthonormal DFT (``fft2c``), so ||F x|| = ||x|| and the
  operator norm of A is <= 1 when sum_c |S_c|^2 <= 1.
* Masks are (H, W) or (B, 1, H, W), bool or float 0/1 (numpy, torch or :class:`mediff.masks.Mask`).
  Coil maps are (C, H, W) or (B, C, H, W) complex.
* Operators follow the device and dtype of their input: masks and coil maps are cast/moved on use.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.masks import Mask
from mediff.operators.base import LinearOperator, PhaseModulated, conjugate_gradient

__all__ = [
    "MagnitudeMRI",
    "MultiCoilMRI",
    "SingleCoilMRI",
    "check_kspace",
    "estimate_coil_maps",
    "estimate_noise_sigma",
    "fft2c",
    "hann_calib_window",
    "ifft2c",
    "lowres_phase",
    "rss",
    "simulate_coil_maps",
    "simulate_kspace",
]

_DIMS = (-2, -1)


# ----------------------------------------------------------------------------- FFTs and helpers


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2D DFT over the last two dims: fftshift(fft2(ifftshift(x), norm="ortho"))."""
    x = _as_complex(x)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), dim=_DIMS, norm="ortho"), dim=_DIMS)


def ifft2c(y: Tensor) -> Tensor:
    """Inverse of :func:`fft2c` (also its adjoint, the transform being unitary)."""
    y = _as_complex(y)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(y, dim=_DIMS), dim=_DIMS, norm="ortho"), dim=_DIMS)


def _masked_circulant(x: Tensor, mask_unshifted: Tensor) -> Tensor:
    """F^H M F x with the centred FFTs of :func:`fft2c` but no shifts: F^H M F is a circular
    convolution, which commutes with the circular shifts of fftshift/ifftshift, so with the mask
    given in unshifted order (``ifftshift(M)``) the shifts cancel. Saves four rolls per CG iteration.

    A mask of one row (..., 1, W) stands for a 1D (column) mask, the same on every row: the transform
    along H then cancels too (F_H^H F_H = I), so only the 1D FFTs along W run (half the work)."""
    if mask_unshifted.shape[-2] == 1:
        return torch.fft.ifft(torch.fft.fft(x, dim=-1, norm="ortho") * mask_unshifted, dim=-1, norm="ortho")
    return torch.fft.ifft2(torch.fft.fft2(x, dim=_DIMS, norm="ortho") * mask_unshifted, dim=_DIMS, norm="ortho")


def _unshifted_mask(m: Tensor) -> Tensor:
    """``ifftshift(m)`` for :func:`_masked_circulant`: one row (..., 1, W) when every row of ``m`` is the
    same (1D Cartesian masks), else the full (..., H, W)."""
    if bool((m == m[..., :1, :]).all()):
        return torch.fft.ifftshift(m[..., :1, :], dim=-1)
    return torch.fft.ifftshift(m, dim=_DIMS)


def _as_complex(x: Tensor) -> Tensor:
    """Promote real tensors to complex (float64 -> complex128, other real -> complex64)."""
    if x.is_complex():
        return x
    return x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)


def rss(coil_images: Tensor, dim: int = 1) -> Tensor:
    """Root-sum-of-squares sqrt(sum_c |x_c|^2) over ``dim`` (kept): (B, C, H, W) -> (B, 1, H, W), real."""
    return coil_images.abs().square().sum(dim=dim, keepdim=True).sqrt()


def _mask_tensor(mask: object) -> Tensor:
    """A private copy of ``mask`` as a torch tensor (H, W) or (B, 1, H, W), validated to be 0/1."""
    if isinstance(mask, Mask):
        t = torch.from_numpy(mask.mask.copy())
    elif isinstance(mask, np.ndarray):
        t = torch.from_numpy(np.array(mask, copy=True))
    elif isinstance(mask, Tensor):
        t = mask.detach().clone()
    else:
        raise MediffError(f"mask must be a Mask, numpy array or torch tensor, got {type(mask).__name__}")
    if not (t.dim() == 2 or (t.dim() == 4 and t.shape[1] == 1)):
        raise MediffError(f"mask must have shape (H, W) or (B, 1, H, W), got {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
            raise MediffError("mask values must be 0 or 1 (bool or float)")
        t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    return t


class _Cache:
    """Per (device, dtype) copies of a constant tensor, so a solver loop on GPU does not re-upload a
    mask or coil map on every call. Holds derived data only; the operator itself stays immutable."""

    def __init__(self, value: Tensor) -> None:
        self.value = value
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._copies:
            if len(self._copies) > 8:  # bound the memory of a long-lived operator
                self._copies.clear()
            self._copies[key] = self.value.to(device=device, dtype=dtype)
        return self._copies[key]


def _batch_ok(b_x: int, b_op: int, what: str) -> None:
    if b_op not in (1, b_x):
        raise MediffError(f"batch size {b_x} does not match the {what} batch size {b_op}")


# ----------------------------------------------------------------------------- operators


class SingleCoilMRI(LinearOperator):
    """A = M F: centred orthonormal 2D FFT then sampling mask. x (B, 1, H, W) -> y (B, 1, H, W).

    A^H = F^H M and A^H A = F^H M F (M is a real 0/1 diagonal, so M^H M = M).
    """

    def __init__(self, mask: object) -> None:
        m = _mask_tensor(mask)
        self._set(_mask=_Cache(m), _mask_unshifted=_Cache(_unshifted_mask(m)),
                  shape=tuple(int(s) for s in m.shape[-2:]), n_coils=1)

    @property
    def mask(self) -> Tensor:
        """A copy of the stored mask, (H, W) or (B, 1, H, W)."""
        return self._mask.value.clone()

    def _m(self, ref: Tensor, unshifted: bool = False) -> Tensor:
        # Mask as the real dtype matching ``ref`` so multiplication keeps exact zeros and the dtype.
        return (self._mask_unshifted if unshifted else self._mask).get(ref.device, ref.real.dtype)

    def _check(self, t: Tensor, channels: int, name: str) -> Tensor:
        t = _as_complex(t)
        if t.dim() != 4 or t.shape[1] != channels or tuple(t.shape[-2:]) != self.shape:
            raise MediffError(f"{name} must have shape (B, {channels}, {self.shape[0]}, {self.shape[1]}), got {tuple(t.shape)}")
        if self._mask.value.dim() == 4:
            _batch_ok(t.shape[0], self._mask.value.shape[0], "mask")
        return t

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        x = self._check(x, 1, "image")
        return fft2c(x) * self._m(x)

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        y = self._check(y, 1, "k-space")
        return ifft2c(y * self._m(y))

    def normal(self, x: Tensor) -> Tensor:
        x = self._check(x, 1, "image")
        return _masked_circulant(x, self._m(x, unshifted=True))


class MultiCoilMRI(SingleCoilMRI):
    """SENSE: A = M F S. x (B, 1, H, W) -> y (B, C, H, W); A^H y = sum_c conj(S_c) F^H M y_c.

    coil_maps: (C, H, W) or (B, C, H, W) complex. With sum_c |S_c|^2 = 1 and a full mask, A^H A = I.
    """

    def __init__(self, mask: object, coil_maps: Tensor | np.ndarray) -> None:
        super().__init__(mask)
        maps = torch.as_tensor(coil_maps).detach().clone()
        if maps.dim() not in (3, 4) or tuple(maps.shape[-2:]) != self.shape:
            raise MediffError(
                f"coil maps must have shape (C, H, W) or (B, C, H, W) with H, W = {self.shape}, got {tuple(maps.shape)}"
            )
        maps = _as_complex(maps)
        if maps.dim() == 3:
            maps = maps.unsqueeze(0)
        if self._mask.value.dim() == 4 and maps.shape[0] != 1 and self._mask.value.shape[0] not in (1, maps.shape[0]):
            raise MediffError(f"mask batch {self._mask.value.shape[0]} does not match coil-map batch {maps.shape[0]}")
        # conj(S) stored resolved: a lazily conjugated operand makes every multiply ~3x slower on CPU.
        self._set(_maps=_Cache(maps), _maps_conj=_Cache(maps.conj().resolve_conj()), n_coils=int(maps.shape[1]))

    @property
    def coil_maps(self) -> Tensor:
        """A copy of the coil maps, (1 or B, C, H, W)."""
        return self._maps.value.clone()

    @property
    def support(self) -> Tensor:
        """(1 or B, 1, H, W) float: 1 where some coil map is non-zero, 0 where all vanish (ESPIRiT's
        "no object here"): A ignores the image there, so the data say nothing about it."""
        return (self._maps.value != 0).any(dim=1, keepdim=True).float()

    def _s(self, ref: Tensor, conj: bool = False) -> Tensor:
        s = (self._maps_conj if conj else self._maps).get(ref.device, ref.dtype)
        _batch_ok(ref.shape[0], s.shape[0], "coil-map")
        return s

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        x = self._check(x, 1, "image")
        return fft2c(self._s(x) * x) * self._m(x)

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        y = self._check(y, self.n_coils, "k-space")
        return (self._s(y, conj=True) * ifft2c(y * self._m(y))).sum(dim=1, keepdim=True)

    def normal(self, x: Tensor) -> Tensor:
        # One mask multiply and no validation of the intermediate k-space: this runs inside CG loops.
        x = self._check(x, 1, "image")
        return (self._s(x, conj=True) * _masked_circulant(self._s(x) * x, self._m(x, unshifted=True))).sum(
            dim=1, keepdim=True)


# Largest image width for which ``MagnitudeMRI`` stores its per-row normal matrices (at most H W^2 reals:
# 8 MB at 128 px, 64 MB at 256); wider images keep the FFT normal, whose cost grows as W log W.
_ROW_GRAM_MAX_WIDTH = 256


def _row_gram(op: LinearOperator, phase: Tensor) -> tuple[Tensor, tuple[slice, slice]] | None:
    """Real A^H A of ``PhaseModulated(op, phase)`` as one w x w matrix per image row over the bounding
    box (rows, cols) of the coil maps' support: ((h, w, w), (rows, cols)), for a multi-coil ``op``; None
    when it does not split by rows (2D or per-item mask, per-item maps or phase), W is too large, the
    maps vanish everywhere, or ``op`` is single-coil (its two 1D FFT passes cost less than the matmul).

    With a 1D mask (the same on every row) F^H M F acts along W only, as the circulant P of
    :func:`_masked_circulant` (P[j, k] = c[(j - k) mod W], c = ifft(ifftshift(m))). With weights
    a_c = S_c * phase on row h, A^H A restricted to the row is sum_c diag(conj a_c) P diag(a_c) =
    P o (a^H a) (Hadamard product with the coils' outer products), Hermitian; for a real image only
    its real part acts, a symmetric matrix. Where every map is zero (ESPIRiT zeroes them outside the
    object) its rows and columns are zero, so only the support's box is stored: less than half the
    memory to read per call on a 128-px brain slice (3-4 MB instead of 8.4), which matters because a
    network forward between two data-consistency steps evicts the matrices from cache."""
    if not isinstance(op, MultiCoilMRI):
        return None
    mu, maps = op._mask_unshifted.value, op._maps.value
    if (mu.dim() != 2 or mu.shape[0] != 1 or maps.shape[0] != 1 or phase.dim() != 4 or phase.shape[:2] != (1, 1)
            or op.shape[1] > _ROW_GRAM_MAX_WIDTH):
        return None
    cdtype = torch.complex128 if maps.dtype == torch.complex128 or phase.dtype == torch.complex128 else torch.complex64
    a = (maps.to(cdtype) * phase.to(cdtype))[0]  # (C, H, W)
    inside = op.support[0, 0].bool()  # (H, W); the phase has unit modulus, so a vanishes exactly there
    if not bool(inside.any()):
        return None
    r_idx, c_idx = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    rows, cols = slice(int(r_idx[0]), int(r_idx[-1]) + 1), slice(int(c_idx[0]), int(c_idx[-1]) + 1)
    w = op.shape[1]
    c = torch.fft.ifft(mu[0].to(cdtype))
    idx = torch.arange(w)
    circulant = c[(idx[:, None] - idx[None, :]) % w][cols, cols]  # (w, w)
    a = a[:, rows, cols].permute(1, 0, 2)  # (h, C, w)
    outer = a.conj().transpose(-1, -2) @ a  # (h, w, w): conj(a_j) a_k summed over coils
    return (circulant * outer).real.contiguous(), (rows, cols)


class MagnitudeMRI(PhaseModulated):
    """A real (magnitude) image x (B, 1, H, W) through a fixed unit-modulus ``phase`` into a Cartesian
    MRI operator: ``PhaseModulated(op, phase)``, with A^H A applied as one real matrix per row of the
    coil maps' support box when the mask is 1D (``_row_gram``; one batched matmul instead of 2 C FFT
    passes; every solver's data-consistency CG runs on it; ``benchmarks/normal_op.py`` and
    ``benchmarks/solver_overhead.py`` time it)."""

    def __init__(self, op: LinearOperator, phase: Tensor) -> None:
        super().__init__(op, phase)
        gram = _row_gram(op, self.phase)
        self._set(_gram=None if gram is None else _Cache(gram[0]), _box=None if gram is None else gram[1])

    def normal(self, x: Tensor) -> Tensor:
        if self._gram is None or x.is_complex():
            return super().normal(x)
        g = self._gram.get(x.device, x.dtype)
        rows, cols = self._box
        h, w = x.shape[-2:]
        # The box's rows as (h, B, w) times the symmetric G_h: one batched matmul; zero outside the box.
        out = torch.bmm(x[:, 0, rows, cols].transpose(0, 1), g).transpose(0, 1).unsqueeze(1)
        return torch.nn.functional.pad(out, (cols.start, w - cols.stop, rows.start, h - rows.stop))


def _operator_for(mask: object, coil_maps: Tensor | np.ndarray | None) -> SingleCoilMRI:
    if isinstance(mask, SingleCoilMRI):
        return mask
    return SingleCoilMRI(mask) if coil_maps is None else MultiCoilMRI(mask, coil_maps)


# ----------------------------------------------------------------------------- simulation


def simulate_coil_maps(
    shape: Sequence[int], n_coils: int, seed: int | None = None, dtype: torch.dtype = torch.complex64,
    width: float = 0.6, phase_scale: float = 1.0,
) -> Tensor:
    """Smooth synthetic coil sensitivities (C, H, W), normalised so sum_c |S_c|^2 = 1 at every pixel.

    Coil c sits at angle theta_c = 2 pi c / C on a circle of radius 1.2 (units: half the field of view).
    Its magnitude is a Gaussian of the distance to the coil (std ``width``), its phase a smooth ramp
    phi_c + phase_scale * pi/2 * (cos theta_c * x + sin theta_c * y) that differs between coils (a phase
    common to all coils would be indistinguishable from image phase). ``seed=None`` is deterministic
    (phi_c = theta_c); an int seed jitters angles and phase offsets reproducibly.
    """
    h, w = (int(s) for s in shape)
    if n_coils < 1 or h < 1 or w < 1:
        raise MediffError(f"need n_coils >= 1 and a positive shape, got n_coils={n_coils}, shape={tuple(shape)}")
    theta = 2.0 * np.pi * np.arange(n_coils) / n_coils
    offsets = theta.copy()
    if seed is not None:
        rng = np.random.default_rng(seed)
        theta = theta + rng.uniform(-0.5, 0.5, n_coils) * (np.pi / n_coils)
        offsets = rng.uniform(-np.pi, np.pi, n_coils)
    y = (np.arange(h) - h // 2) / (h / 2)
    x = (np.arange(w) - w // 2) / (w / 2)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    cy, cx = 1.2 * np.sin(theta), 1.2 * np.cos(theta)
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    mag = np.exp(-d2 / (2.0 * width**2))
    phase = offsets[:, None, None] + phase_scale * (np.pi / 2) * (
        np.cos(theta)[:, None, None] * xx[None] + np.sin(theta)[:, None, None] * yy[None]
    )
    maps = mag * np.exp(1j * phase)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))  # Gaussians never vanish: safe everywhere
    return torch.from_numpy(maps).to(dtype)


def simulate_kspace(
    image: Tensor, mask: object, coil_maps: Tensor | np.ndarray | None = None, noise_sigma: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """y = A x + n, (B, C, H, W) complex, for an image (B, 1, H, W) real or complex.

    ``mask`` is a mask (or an MRI operator, then ``coil_maps`` must be None). n is circular complex
    Gaussian with E|n|^2 = noise_sigma^2 per complex entry (real and imaginary parts each have std
    noise_sigma / sqrt(2)), added on sampled entries only, so unsampled entries are exactly zero.
    """
    if noise_sigma < 0 or not math.isfinite(noise_sigma):
        raise MediffError(f"noise_sigma must be finite and >= 0, got {noise_sigma}")
    if isinstance(mask, SingleCoilMRI) and coil_maps is not None:
        raise MediffError("pass coil maps either inside the operator or as coil_maps, not both")
    op = _operator_for(mask, coil_maps)
    y = op.A(image)
    if noise_sigma > 0:
        dev = generator.device if generator is not None else y.device
        n = torch.randn(y.shape, dtype=y.dtype, generator=generator, device=dev).to(y.device)
        # torch.randn for complex dtypes already draws real/imag with variance 1/2 each (E|n|^2 = 1).
        y = y + noise_sigma * n * op._m(y)
    return y


# ----------------------------------------------------------------------------- coil-map estimation


def hann_calib_window(shape: Sequence[int], calib: int | Sequence[int], device: object = None,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """Separable window (H, W) on the centred calibration block around DC, zero elsewhere.

    ``calib`` is the block side, or its (rows, cols). Along an axis the block covers only partly the
    window is a Hann taper w(k) = (1 + cos(2 pi k / (c + 1))) / 2 for offsets k from DC: it peaks at DC,
    stays > 0 at the block edge and suppresses the Gibbs ringing that truncating the block would cause.
    Along an axis the block covers entirely (c >= n: a 1D mask's centre columns hold every row) nothing
    is truncated, so the window is 1 there and the low-resolution image keeps full resolution along it.
    """
    h, w = (int(s) for s in shape)
    cal = (calib, calib) if np.isscalar(calib) else tuple(calib)
    if len(cal) != 2:
        raise MediffError(f"calib must be an int or (rows, cols), got {calib!r}")
    out = []
    for n, c in zip((h, w), cal):
        c = int(c)
        if c < 1:
            raise MediffError(f"calibration size must be >= 1, got {calib!r}")
        k = torch.arange(n, dtype=torch.float64) - n // 2
        if c >= n:
            out.append(torch.ones_like(k))
            continue
        inside = (k >= -(c // 2)) & (k < c - c // 2)
        out.append(torch.where(inside, 0.5 * (1 + torch.cos(2 * math.pi * k / (c + 1))), torch.zeros_like(k)))
    return (out[0][:, None] * out[1][None, :]).to(device=device, dtype=dtype)


def _phase_align(maps: Tensor) -> Tensor:
    """Fix the per-pixel phase ambiguity of maps (C, H, W) against a virtual body coil.

    v is the dominant eigenvector of sum_r S(r) S(r)^H (invariant to per-pixel phases): the coil
    combination with most energy, so v^H S(r) is rarely ~0 inside the object, unlike one physical
    coil. Each pixel is rotated so that v^H S(r) is real and >= 0; the maps come out smooth.
    """
    c = maps.shape[0]
    flat = maps.reshape(c, -1)
    _, vecs = torch.linalg.eigh(flat @ flat.conj().T)
    v = vecs[:, -1]
    proj = (v.conj()[:, None] * flat).sum(0)
    rot = torch.where(proj.abs() > 0, proj.conj() / proj.abs().clamp_min(torch.finfo(proj.real.dtype).tiny), torch.ones_like(proj))
    return (flat * rot).reshape(maps.shape)


def _espirit(ksp: Tensor, calib: tuple[int, int], kernel: int, threshold: float, crop: float) -> Tensor:
    """ESPIRiT (Uecker et al. 2014) maps for one k-space (C, H, W), complex128, zero where cropped.

    1. Calibration matrix: every kernel x kernel patch of the calib block (all coils) is a row.
    2. Its dominant right singular vectors w_n (s > threshold * s_max) span the consistent patches.
    3. Projecting each patch onto that span and averaging over the k^2 patches covering a k-space
       sample is a convolution; in image space it is a C x C matrix per pixel
           G(r) = (1/k^2) sum_d g[d] exp(+i 2 pi d.r / N),  g_cc'[d] = sum_n sum_{u-u'=d} w_n[c,u] conj(w_n[c',u']).
       Consistent coil images satisfy S(r) = G(r) S(r): the maps are the eigenvectors with eigenvalue
       ~1; pixels whose top eigenvalue < crop are outside the support.
    Building g (size (2k-1)^2) first costs C^2 small FFTs instead of one (H, W) FFT per kernel.
    """
    c, h, w = ksp.shape
    cal = ksp[:, _centre_idx(h, calib[0])][:, :, _centre_idx(w, calib[1])].unsqueeze(0)
    # unfold (real-only op; it is linear, so split real/imag) -> (C*k*k, n_patches), ordered (coil, tap)
    unfold = torch.nn.functional.unfold
    mat = (unfold(cal.real, kernel) + 1j * unfold(cal.imag, kernel))[0].T  # rows = patches
    _, s, vh = torch.linalg.svd(mat, full_matrices=False)
    wn = vh[s > threshold * s[0]]  # (n_kernels, C*k*k), orthonormal rows spanning the patch row-space
    proj = (wn.T @ wn.conj()).reshape(c, kernel, kernel, c, kernel, kernel)  # P[(c,u), (c',u')]
    # sum P along the diagonals u - u' = d -> g (C, C, 2k-1, 2k-1), d = 0 at index k - 1
    g = torch.zeros(c, c, 2 * kernel - 1, 2 * kernel - 1, dtype=wn.dtype, device=wn.device)
    for i2 in range(kernel):
        for j2 in range(kernel):
            g[:, :, kernel - 1 - i2:2 * kernel - 1 - i2, kernel - 1 - j2:2 * kernel - 1 - j2] += proj[
                :, :, :, :, i2, j2
            ].permute(0, 3, 1, 2)
    # place d = 0 at DC (index N // 2) and take the un-normalised inverse DFT -> G(r) in centred image
    # coordinates, the same as the coil images ifft2c(ksp).
    grid = torch.zeros(c, c, h, w, dtype=wn.dtype, device=wn.device)
    half = kernel - 1
    rows = torch.arange(-half, half + 1, device=wn.device) + h // 2
    cols = torch.arange(-half, half + 1, device=wn.device) + w // 2
    ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)  # only matters for tiny grids
    grid[:, :, rows[ok_r][:, None], cols[ok_c][None, :]] = g[:, :, ok_r][:, :, :, ok_c]
    gram = ifft2c(grid) * (math.sqrt(h * w) / kernel**2)  # (C, C, H, W)
    gram = gram.permute(2, 3, 0, 1).reshape(h * w, c, c)
    gram = 0.5 * (gram + gram.conj().transpose(1, 2))  # exactly Hermitian for eigh
    evals, evecs = torch.linalg.eigh(gram)
    top = evecs[..., -1] * (evals[..., -1:] > crop)  # unit-norm eigenvector, zeroed outside support
    return top.T.reshape(c, h, w)


def _centre_idx(n: int, width: int) -> slice:
    start = n // 2 - width // 2
    return slice(start, start + width)


def _lowres_maps(ksp: Tensor, calib: int, support_threshold: float) -> Tensor:
    """Low-resolution maps: Hann-windowed calib k-space -> coil images -> divide by their RSS."""
    win = hann_calib_window(ksp.shape[-2:], calib, device=ksp.device, dtype=ksp.real.dtype)
    low = ifft2c(ksp * win)
    r = rss(low, dim=0)
    support = r > support_threshold * r.max()
    return torch.where(support, low / r.clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(low))


def estimate_coil_maps(
    kspace: Tensor, calib_size: int | tuple[int, int] = 24, method: str = "espirit", kernel_size: int = 6,
    threshold: float = 0.02, crop: float = 0.95, support_threshold: float = 0.05,
) -> Tensor:
    """Coil maps from k-space (C, H, W) or (B, C, H, W) with a fully-sampled centre of calib_size^2, or
    (rows, cols) for ESPIRiT: 1D Cartesian masks sample every row of their centre columns, and a tall
    calibration block gives ESPIRiT enough patches when the centre is only ~10 columns wide.

    method="espirit": ESPIRiT (own implementation; see ``_espirit``), support = top eigenvalue > crop.
    method="lowres": Hann-windowed calibration -> low-resolution coil images / RSS, support = RSS >
    support_threshold * max. Both return maps with sum_c |S_c|^2 = 1 inside the support and 0 outside,
    phase-referenced to a virtual body coil (so the smooth object phase stays in the image). Output has
    the input's shape, device and complex dtype; computation is in complex128.
    """
    k = torch.as_tensor(kspace)
    if k.dim() == 4:
        return torch.stack([estimate_coil_maps(kb, calib_size, method, kernel_size, threshold, crop, support_threshold) for kb in k])
    if k.dim() != 3:
        raise MediffError(f"k-space for coil estimation must be (C, H, W) or (B, C, H, W), got {tuple(k.shape)}")
    c, h, w = k.shape
    cal = (int(calib_size), int(calib_size)) if np.isscalar(calib_size) else tuple(int(v) for v in calib_size)
    if method not in ("espirit", "lowres"):
        raise MediffError(f"unknown coil-map method {method!r}; choose 'espirit' or 'lowres'")
    if min(cal) < 2 or cal[0] > h or cal[1] > w:
        raise MediffError(f"calib_size must be in [2, {min(h, w)}], got {calib_size}")
    if method == "espirit" and not (1 <= kernel_size < min(cal)):
        raise MediffError(f"ESPIRiT kernel_size {kernel_size} must be smaller than calib_size {calib_size}")
    if not bool(torch.isfinite(torch.view_as_real(_as_complex(k))).all()):
        raise MediffError("k-space contains NaN or inf")
    out_dtype = _as_complex(k[:1, :1, :1]).dtype
    k64 = _as_complex(k).to(torch.complex128)
    maps = _espirit(k64, cal, int(kernel_size), threshold, crop) if method == "espirit" else _lowres_maps(
        k64, min(cal), support_threshold
    )
    return _phase_align(maps).to(device=k.device, dtype=out_dtype)


# ----------------------------------------------------------------------------- phase, validation


def lowres_phase(kspace: Tensor, op_or_mask: object, calib: int | Sequence[int] = 24) -> Tensor:
    """Unit-modulus phase (B, 1, H, W) of a low-resolution image from the windowed k-space centre.

    Why: the diffusion priors model *magnitude* images, but MRI data are complex. Solvers reconstruct
    x = magnitude * phase with this fixed smooth phase estimate, so a real-valued prior sample can be
    pushed through A. kspace: (B, C, H, W). For C > 1 pass a MultiCoilMRI (the coil images are combined
    with its maps via A^H); a bare mask means single-coil. Where the low-res image is ~0 the phase is 1.

    ``calib``: side of the fully-sampled centre, or its (rows, cols) (``recon.calib_region``). For a 1D
    mask that is the whole band (H, centre columns): the window is then flat along the rows (see
    :func:`hann_calib_window`) and the phase has full resolution along the fully-sampled direction.
    """
    op = op_or_mask if isinstance(op_or_mask, SingleCoilMRI) else SingleCoilMRI(op_or_mask)
    y = _as_complex(torch.as_tensor(kspace))
    if y.dim() != 4:
        raise MediffError(f"k-space must have shape (B, C, H, W), got {tuple(y.shape)}")
    if y.shape[1] != op.n_coils:
        raise MediffError(f"k-space has {y.shape[1]} coils but the operator expects {op.n_coils} (multi-coil needs MultiCoilMRI)")
    win = hann_calib_window(y.shape[-2:], calib, device=y.device, dtype=y.real.dtype)
    low = op.AH(y * win)
    mag = low.abs()
    eps = 1e-6 * mag.flatten(1).amax(1).view(-1, 1, 1, 1)
    return torch.where(mag > eps, low / mag.clamp_min(torch.finfo(mag.dtype).tiny), torch.ones_like(low))


# ----------------------------------------------------------------------------- noise level

# Normal consistency constant: std = MAD / Phi^-1(3/4) for Gaussian samples.
_MAD_TO_STD = 1.0 / 0.6744897501960817


def estimate_noise_sigma(kspace: Tensor | np.ndarray, mask: object, fraction: float = 0.1) -> float:
    """Noise std per complex k-space entry (E|n|^2 = sigma^2, the convention of :func:`simulate_kspace`),
    estimated from the sampled entries farthest from DC, where an MR image has ~no signal left.

    kspace: (C, H, W) or (B, C, H, W) in centred layout; mask: (H, W) or (B, 1, H, W) (or a Mask).
    The region is the outer ``fraction`` of the sampled entries by normalised radius
    sqrt((ky / (H/2))^2 + (kx / (W/2))^2): the k-space corners for Cartesian masks, away from the
    axes where the edges of a rectangular field of view put their streaks. Entries that are exactly
    zero in every coil are not measurements (zero-padded readout, partial Fourier) and are skipped.
    Per coil, the real and imaginary parts each give std = 1.4826 * MAD (median absolute deviation,
    robust to the few strong entries that edges leave there); sigma_c^2 = std_re^2 + std_im^2 and the
    result is sqrt(mean_c sigma_c^2), the RMS over coils.

    What the object itself puts out there adds in quadrature: the estimate is an upper bound. Raw
    scanner k-space is noise-dominated in its corners; an image with detail up to the grid's Nyquist
    (a slice downsampled to 2 mm, sharp edges on a coarse grid) is not, and reads as noisier than it is.
    Raises MediffError for NaN/inf or when fewer than 8 entries per coil fall in the region.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise MediffError(f"fraction must be in (0, 1], got {fraction}")
    k = _as_complex(torch.as_tensor(kspace)).detach().cpu().to(torch.complex128)
    if k.dim() == 3:
        k = k.unsqueeze(0)
    if k.dim() != 4:
        raise MediffError(f"k-space must have shape (C, H, W) or (B, C, H, W), got {tuple(k.shape)}")
    b, c, h, w = k.shape
    m = _mask_tensor(mask).cpu().to(torch.bool)
    if tuple(m.shape[-2:]) != (h, w):
        raise MediffError(f"k-space grid {(h, w)} does not match mask grid {tuple(m.shape[-2:])}")
    m = m.reshape(-1, h, w)
    if m.shape[0] not in (1, b):
        raise MediffError(f"mask batch {m.shape[0]} does not match k-space batch {b}")
    vals = torch.view_as_real(k)
    if not bool(torch.isfinite(vals).all()):
        raise MediffError("k-space contains NaN or inf")
    measured = m.expand(b, h, w) & (k != 0).any(dim=1)  # (B, H, W)
    ky = (torch.arange(h, dtype=torch.float64) - h // 2) / (h / 2)
    kx = (torch.arange(w, dtype=torch.float64) - w // 2) / (w / 2)
    rho = (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt().expand(b, h, w)
    if not bool(measured.any()):
        raise MediffError("no sampled, non-zero k-space entries to estimate the noise from")
    r = rho[measured]
    # The outer ``fraction`` of the measured entries: the largest radii (ties at the cut are kept).
    n_keep = max(1, int(math.ceil(float(fraction) * r.numel())))
    cut = torch.topk(r, n_keep).values.min()
    region = measured & (rho >= cut)
    n = int(region.sum())
    if n < 8:
        raise MediffError(f"only {n} sampled k-space entries far from the centre: too few to estimate the noise")
    sel = k.permute(1, 0, 2, 3)[:, region].numpy()  # (C, n)
    var = np.zeros(c)
    for part in (sel.real, sel.imag):
        mad = np.median(np.abs(part - np.median(part, axis=1, keepdims=True)), axis=1)
        var += (_MAD_TO_STD * mad) ** 2
    return float(np.sqrt(var.mean()))


def sense_residual_sigma(op: MultiCoilMRI, kspace: Tensor, iters: int = 100) -> float:
    """Std per sampled complex entry of what the SENSE model ``op`` cannot explain in ``kspace``
    (1, C, H, W): the residual of the least-squares fit x_ls = argmin ||y - A x||, dof-corrected,
    sigma^2 = ||y - A x_ls||^2 / (M - N), M the sampled entries over all coils, N the pixels inside
    the maps' support. Returns 0.0 when M <= N (as many unknowns as data: nothing is left over).

    Why: coil maps are estimated, so no image fits multi-coil data exactly even without noise (the
    maps' support, edges and phase miss). Solvers that enforce the data to convergence (DDNM, and
    DPS/MCG's exact guidance) then fit the miss as image detail; this residual is what a likelihood
    has to allow for, noise included (for a correct model it estimates the noise std itself).
    x_ls by ``iters`` CG steps on A^H A x = A^H y in complex128.
    """
    y = _as_complex(torch.as_tensor(kspace)).to(torch.complex128)
    if y.dim() != 4 or y.shape[0] != 1:
        raise MediffError(f"k-space must have shape (1, C, H, W), got {tuple(y.shape)}")
    maps = op.coil_maps
    m = int(torch.broadcast_to(op.mask.bool(), y.shape).sum())
    n = int((maps.abs().pow(2).sum(dim=1) > 0.5).sum())  # sum_c |S_c|^2 = 1 inside the support, 0 outside
    if m <= n:
        return 0.0
    x = conjugate_gradient(op.normal, op.AH(y), torch.zeros(1, 1, *y.shape[-2:], dtype=y.dtype), iters)
    return float(((y - op.A(x)).abs().pow(2).sum() / (m - n)).sqrt())


def check_kspace(kspace: Tensor | np.ndarray, mask: object) -> None:
    """Raise MediffError if k-space (B, C, H, W) or (C, H, W) does not fit ``mask`` (H, W) or (B, 1, H, W),
    contains NaN/inf, or is all zero."""
    k = torch.as_tensor(kspace)
    m = _mask_tensor(mask)
    if k.dim() not in (3, 4):
        raise MediffError(f"k-space must have shape (B, C, H, W) or (C, H, W), got {tuple(k.shape)}")
    if tuple(k.shape[-2:]) != tuple(m.shape[-2:]):
        raise MediffError(f"k-space grid {tuple(k.shape[-2:])} does not match mask grid {tuple(m.shape[-2:])}")
    if m.dim() == 4 and m.shape[0] not in (1, k.shape[0] if k.dim() == 4 else 1):
        raise MediffError(f"mask batch {m.shape[0]} does not match k-space batch {k.shape[0] if k.dim() == 4 else 1}")
    vals = torch.view_as_real(k) if k.is_complex() else k
    if not bool(torch.isfinite(vals).all()):
        raise MediffError("k-space contains NaN or inf")
    if not bool((vals != 0).any()):
        raise MediffError("k-space is all zero")
