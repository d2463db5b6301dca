"""MRI forward models: single-coil (A = M F) and multi-coil SENSE (A = M F S) operators, the
phase-modulated operator the magnitude priors are solved through, k-space simulation and checks.

Conventions
-----------
* Images are complex tensors (B, 1, H, W); real input is promoted to complex (float64 -> complex128,
  anything else -> complex64). Measurements are (B, C, H, W) complex k-space (C coils, C = 1 for
  single-coil) in *centred* layout (DC at (H // 2, W // 2)), with unsampled entries exactly zero.
* The Fourier transform is the centred orthonormal DFT (``fft2c``), so ||F x|| = ||x|| and the
  operator norm of A is <= 1 when sum_c |S_c|^2 <= 1.
* Masks are (H, W) or (B, 1, H, W), bool or float 0/1 (numpy, torch or :class:`mediff.physics.masks.Mask`).
  Coil maps are (C, H, W) or (B, C, H, W) complex.
* Operators follow the device and dtype of their input: masks and coil maps are cast/moved on use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.physics.mri.fourier import DIMS, as_complex, fft2c, ifft2c
from mediff.physics.masks import mask_tensor
from mediff.physics.operators import LinearOperator, PhaseModulated

def _masked_circulant(x: Tensor, mask_unshifted: Tensor) -> Tensor:
    """F^H M F x with the centred FFTs of :func:`fft2c` but no shifts: F^H M F is a circular
    convolution, which commutes with the circular shifts of fftshift/ifftshift, so with the mask
    given in unshifted order (``ifftshift(M)``) the shifts cancel. Saves four rolls per CG iteration.

    A mask of one row (..., 1, W) stands for a 1D (column) mask, the same on every row: the transform
    along H then cancels too (F_H^H F_H = I), so only the 1D FFTs along W run (half the work)."""
    if mask_unshifted.shape[-2] == 1:
        return torch.fft.ifft(torch.fft.fft(x, dim=-1, norm="ortho") * mask_unshifted, dim=-1, norm="ortho")
    return torch.fft.ifft2(torch.fft.fft2(x, dim=DIMS, norm="ortho") * mask_unshifted, dim=DIMS, norm="ortho")


def _unshifted_mask(m: Tensor) -> Tensor:
    """``ifftshift(m)`` for :func:`_masked_circulant`: one row (..., 1, W) when every row of ``m`` is the
    same (1D Cartesian masks), else the full (..., H, W)."""
    if bool((m == m[..., :1, :]).all()):
        return torch.fft.ifftshift(m[..., :1, :], dim=-1)
    return torch.fft.ifftshift(m, dim=DIMS)



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
        m = mask_tensor(mask)
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
        t = as_complex(t)
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
        maps = as_complex(maps)
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


def check_kspace(kspace: Tensor | np.ndarray, mask: object) -> None:
    """Raise MediffError if k-space (B, C, H, W) or (C, H, W) does not fit ``mask`` (H, W) or (B, 1, H, W),
    contains NaN/inf, or is all zero."""
    k = torch.as_tensor(kspace)
    m = mask_tensor(mask)
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
