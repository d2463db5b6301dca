"""Classical (non-learned) reconstruction baselines, generic over any ``LinearOperator``.

All solvers are batched: items are independent problems (own operator norm, own step sizes). They
work for real images (CT, ``(B, 1, N, N)``) and complex ones (MRI, ``(B, 1, H, W)`` complex), with
explicit iteration counts and no global random state, so results are reproducible.

Problems solved (x: image, y: measurements, A: operator):

* ``zero_filled``:       x = Aᴴ y
* ``least_squares``:     min ½||Ax − y||² + ½ lam ||x||²           (conjugate gradient)
* ``tv_reconstruct``:    min ½||Ax − y||² + lam · TV(x)            (PDHG / Chambolle–Pock)
* ``l1_wavelet_reconstruct``: min ½||Ax − y||² + lam ||Ψx||₁        (FISTA, orthonormal Ψ)

The regulariser weight ``lam`` is in units of the data term, so it scales with the measurement
intensity; choose it with ``tune_lambda`` on validation data.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mediff.errors import MediffError
from mediff.metrics import psnr
from mediff.physics.operators import Identity, LinearOperator, conjugate_gradient, inner

__all__ = [
    "Wavelet2D",
    "daubechies_filter",
    "gaussian_denoise",
    "grad2d",
    "div2d",
    "l1_wavelet_objective",
    "l1_wavelet_reconstruct",
    "least_squares",
    "op_norm",
    "total_variation",
    "tune_lambda",
    "tv_denoise",
    "tv_objective",
    "tv_reconstruct",
    "zero_filled",
]

Callback = Callable[[int, Tensor], None]


def _bview(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-item (B,) tensor to broadcast against ``like`` (B, ...)."""
    return v.view((-1,) + (1,) * (like.dim() - 1))


def _sqnorm(v: Tensor) -> Tensor:
    """Per-item squared 2-norm, shape (B,), real."""
    return inner(v, v).real


# --------------------------------------------------------------------------------------------------
# Simple reconstructions
# --------------------------------------------------------------------------------------------------


def zero_filled(op: LinearOperator, y: Tensor) -> Tensor:
    """Adjoint reconstruction ``Aᴴ y``.

    For MRI with an orthonormal FFT and a 0/1 mask this is the zero-filled image; for multi-coil SENSE
    it is the coil-combined adjoint; for CT it is the (unfiltered) backprojection.
    """
    return op.AH(y)


def least_squares(
    op: LinearOperator,
    y: Tensor,
    iters: int,
    lam: float = 0.0,
    x0: Tensor | None = None,
    tol: float = 0.0,
) -> Tensor:
    """Regularised least squares: solve (AᴴA + lam I) x = Aᴴ y by conjugate gradient.

    y: measurements (B, ...). iters: CG iterations (exact in ≤ n iterations for an n-pixel full-rank
    problem in exact arithmetic). lam ≥ 0: Tikhonov weight. x0: start (default zeros, giving the
    minimum-norm solution when lam = 0 and A is rank deficient). Returns x with the shape of Aᴴ y.
    """
    if lam < 0:
        raise MediffError(f"lam must be >= 0, got {lam}")
    rhs = op.AH(y)
    start = torch.zeros_like(rhs) if x0 is None else x0.to(rhs.dtype)
    if lam == 0:
        normal = op.normal
    else:

        def normal(v: Tensor) -> Tensor:
            return op.normal(v) + lam * v

    return conjugate_gradient(normal, rhs, start, iters, tol)


def op_norm(
    op: LinearOperator,
    x_like: Tensor,
    iters: int = 30,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-item spectral norm ||A|| estimated by power iteration on AᴴA.

    x_like: (B, ...) tensor fixing the image shape, dtype and device (values unused). iters: power
    iterations. generator: RNG for the start vector (default: a fresh one seeded with 0, so the
    global RNG is untouched and the result is deterministic). Returns (B,) real, ≥ 0. Power iteration
    approaches ||A|| from below; solvers here multiply by a small safety factor.
    """
    if generator is None:
        generator = torch.Generator(device=x_like.device)
        generator.manual_seed(0)
    v = torch.randn(x_like.shape, dtype=x_like.dtype, device=x_like.device, generator=generator)
    v = v / _bview(_sqnorm(v).sqrt(), v)
    sq = torch.zeros(x_like.shape[0], dtype=v.real.dtype, device=v.device)
    tiny = torch.finfo(sq.dtype).tiny
    for _ in range(iters):
        w = op.normal(v)
        # Rayleigh quotient <v, AᴴA v> = ||Av||² with ||v|| = 1 is a lower bound on ||A||².
        sq = inner(v, w).real.clamp_min(0)
        nw = _sqnorm(w).sqrt()
        v = torch.where(_bview(nw > tiny, w), w / _bview(nw.clamp_min(tiny), w), v)
    return sq.sqrt()


# Power iteration underestimates ||A||; this margin keeps step sizes strictly admissible.
_NORM_SAFETY = 1.01


# --------------------------------------------------------------------------------------------------
# Total variation
# --------------------------------------------------------------------------------------------------


def grad2d(x: Tensor) -> Tensor:
    """Forward differences on the last two dims with Neumann boundary (last difference 0).

    x: (..., H, W) real or complex. Returns (2, ..., H, W): [∂_H x, ∂_W x]. Its norm is ≤ √8.
    """
    gh = torch.zeros_like(x)
    gw = torch.zeros_like(x)
    gh[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    gw[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return torch.stack([gh, gw])


def div2d(g: Tensor) -> Tensor:
    """Discrete divergence, the negative adjoint of ``grad2d``: <grad x, g> = −<x, div g>.

    g: (2, ..., H, W). Returns (..., H, W).
    """
    gh, gw = g[0], g[1]
    dh = torch.zeros_like(gh)
    dw = torch.zeros_like(gw)
    dh[..., 0, :] = gh[..., 0, :]
    dh[..., 1:-1, :] = gh[..., 1:-1, :] - gh[..., :-2, :]
    dh[..., -1, :] = -gh[..., -2, :]
    dw[..., :, 0] = gw[..., :, 0]
    dw[..., :, 1:-1] = gw[..., :, 1:-1] - gw[..., :, :-2]
    dw[..., :, -1] = -gw[..., :, -2]
    return dh + dw


def _pointwise_mag(g: Tensor) -> Tensor:
    """|g| = sqrt(|g_H|² + |g_W|²) per pixel; works for complex fields. (2, ...) -> (...)."""
    return (g.real**2 + (g.imag**2 if g.is_complex() else 0)).sum(0).sqrt()


def total_variation(x: Tensor) -> Tensor:
    """Isotropic TV over the last two dims, summed over all other non-batch dims. x: (B, ..., H, W) -> (B,)."""
    return _pointwise_mag(grad2d(x)).flatten(1).sum(1)


def tv_objective(op: LinearOperator, x: Tensor, y: Tensor, lam: float) -> Tensor:
    """½||Ax − y||² + lam · TV(x) per item, shape (B,)."""
    return 0.5 * _sqnorm(op.A(x) - y) + lam * total_variation(x)


def tv_reconstruct(
    op: LinearOperator,
    y: Tensor,
    lam: float,
    iters: int = 200,
    x0: Tensor | None = None,
    *,
    a_norm: float | Tensor | None = None,
    norm_iters: int = 30,
    abs_sums: tuple[Tensor, Tensor] | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """TV-regularised reconstruction min_x ½||Ax − y||² + lam · TV(x) by PDHG (Chambolle–Pock 2011).

    y: (B, ...) measurements. lam ≥ 0 (data-term units). iters: PDHG iterations. x0: start (default
    zeros: Aᴴy is badly scaled for non-orthonormal operators such as CT). TV is isotropic on the last
    two dims (complex x: |∇x| = sqrt(|∂_H x|² + |∂_W x|²)), per channel/slice for extra dims.
    a_norm: known ||A|| (scalar or (B,)); otherwise estimated per item with ``op_norm(norm_iters)``.
    callback(k, x) is called after every iteration k = 1..iters. Returns x shaped like Aᴴ y.

    PDHG on K = [A; ∇] with F(u, g) = ½||u − y||² + lam ||g||_{2,1}, G = 0. Step sizes, one of two ways:

    - scalar (default): to balance the two blocks for operators with ||A|| far from 1 (CT), A and y
      are divided by s = ||A|| and lam by s² (same minimiser); then ||K||² ≤ L² = ||A/s||² + 8 = 9,
      and tau = sigma = 0.99 / L gives tau·sigma·L² < 1.
    - diagonal (``abs_sums`` = (row sums of |A|, like y; column sums of |A|, like x), for an A with
      known entry magnitudes, e.g. a non-negative projector: (A 1, Aᴴ 1)): sigma_i = 1 / Σ_j |K_ij|,
      tau_j = 1 / Σ_i |K_ij| (Pock & Chambolle 2011, "Diagonal preconditioning for first order
      primal-dual algorithms", alpha = 1; ∇'s rows sum to 2 and its columns to 4), times 0.99.
      Where the rows of A differ by orders of magnitude (weighted least squares), one scalar step is
      set by the heaviest rows and is far too small for the rest; per-entry steps are not.
    """
    if lam < 0:
        raise MediffError(f"lam must be >= 0, got {lam}")
    aty = op.AH(y)
    x = torch.zeros_like(aty) if x0 is None else x0.to(aty.dtype).clone()
    if x.dim() < 3:
        raise MediffError(f"tv_reconstruct needs images with two spatial dims (B, ..., H, W), got {tuple(x.shape)}")
    rdt = x.real.dtype
    tiny = torch.finfo(rdt).tiny
    if abs_sums is not None:
        rows, cols = (v.real.to(rdt) for v in abs_sums)
        s_y = torch.ones((), dtype=rdt, device=x.device)
        s_x = s_y
        y_s = y
        lam_s = torch.full((x.shape[0],) + (1,) * (x.dim() - 1), float(lam), dtype=rdt, device=x.device)
        sigma_p = 0.99 / rows.clamp_min(1e-6 * float(rows.max()))
        sigma_q, tau = 0.99 / 2.0, 0.99 / (cols + 4.0)
    else:
        if a_norm is None:
            s = op_norm(op, x, norm_iters) * _NORM_SAFETY
        else:
            s = torch.as_tensor(a_norm, dtype=rdt, device=x.device).expand(x.shape[0]).clone()
        s = s.to(rdt).clamp_min(tiny)
        s_y, s_x = _bview(s, y).to(y.dtype), _bview(s, x).to(x.dtype)
        y_s = y / s_y
        lam_s = _bview(lam / s**2, x)  # per-item TV weight of the rescaled problem, broadcast on (B, ...)
        step = 0.99 / math.sqrt(1.0 + 8.0)  # tau = sigma; (tau·sigma)·9 = 0.98 < 1
        sigma_p = sigma_q = tau = step

    p = torch.zeros_like(y_s)  # dual of the data block
    q = torch.zeros((2,) + tuple(x.shape), dtype=x.dtype, device=x.device)  # dual of the gradient block
    x_bar = x
    for k in range(1, iters + 1):
        # Dual ascent. prox of (σ F1)* for F1 = ½||· − y||² (σ per entry): (p − σ y) / (1 + σ).
        p = (p + sigma_p * (op.A(x_bar) / s_y - y_s)) / (1.0 + sigma_p)
        # prox of (σ F2)* for F2 = lam||·||_{2,1}: pointwise projection onto the ball |q| ≤ lam
        # (lam = 0 projects to q = 0 via the tiny clamp, leaving plain least squares).
        q = q + sigma_q * grad2d(x_bar)
        q = q / torch.clamp(_pointwise_mag(q) / lam_s.clamp_min(tiny), min=1.0)
        # Primal descent with Kᴴ(p, q) = Aᴴp / s − div q; G = 0 so no primal prox.
        x_new = x - tau * (op.AH(p) / s_x - div2d(q))
        x_bar = 2 * x_new - x  # over-relaxation theta = 1
        x = x_new
        if callback is not None:
            callback(k, x)
    return x


def tv_denoise(x: Tensor, lam: float, iters: int = 200) -> Tensor:
    """TV denoising min_u ½||u − x||² + lam · TV(u) (ROF), i.e. ``tv_reconstruct`` with the identity.

    x: noisy image (B, ..., H, W), real or complex; lam in intensity units. Returns (B, ..., H, W).
    """
    return tv_reconstruct(Identity(), x, lam, iters, x0=x, a_norm=1.0)


def gaussian_denoise(x: Tensor, sigma_px: float, truncate: float = 4.0) -> Tensor:
    """Gaussian smoothing over the last two dims with std ``sigma_px`` pixels (reflect boundary).

    x: (..., H, W) real or complex (real and imaginary parts filtered alike). The kernel is truncated at
    ``truncate`` sigmas (clipped to the image size, since reflect padding needs radius < size).
    Returns a tensor like x. sigma_px = 0 returns a copy.
    """
    if sigma_px < 0:
        raise MediffError(f"sigma_px must be >= 0, got {sigma_px}")
    if sigma_px == 0:
        return x.clone()
    if x.is_complex():
        return torch.complex(gaussian_denoise(x.real, sigma_px, truncate), gaussian_denoise(x.imag, sigma_px, truncate))
    h, w = x.shape[-2:]
    v = x.reshape(-1, 1, h, w)
    for dim, n in ((2, h), (3, w)):
        r = min(int(truncate * sigma_px + 0.5), n - 1)
        if r == 0:
            continue
        t = torch.arange(-r, r + 1, dtype=v.dtype, device=v.device)
        k = torch.exp(-0.5 * (t / sigma_px) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1]
        shape[dim] = 2 * r + 1
        pad = (0, 0, r, r) if dim == 2 else (r, r, 0, 0)
        v = F.conv2d(F.pad(v, pad, mode="reflect"), k.view(shape))
    return v.reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# Orthonormal wavelets
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def daubechies_filter(order: int) -> tuple[float, ...]:
    """Scaling (low-pass synthesis) filter of the Daubechies wavelet with ``order`` vanishing moments.

    Length 2·order, minimum phase, sum √2 (orthonormal): order 1 is Haar. Built by spectral
    factorisation of P(y) = Σ_{k<N} C(N−1+k, k) yᵏ, y = sin²(ω/2), keeping the zeros inside the unit
    circle; equals PyWavelets' ``Wavelet('dbN').rec_lo`` (checked in the tests).
    """
    if not 1 <= order <= 10:
        # Root finding loses accuracy beyond ~db10; such long filters are not useful for 2-D baselines.
        raise MediffError(f"Daubechies order must be in 1..10, got {order}")
    poly = [math.comb(order - 1 + k, k) for k in range(order)]
    zeros = []
    for yr in np.roots(poly[::-1]) if order > 1 else []:
        # y = (2 − z − 1/z)/4  <=>  z² − (2 − 4y) z + 1 = 0; the two roots are reciprocal.
        zr = np.roots([1.0, -(2.0 - 4.0 * yr), 1.0])
        zeros.append(zr[np.argmin(np.abs(zr))])
    q = np.real(np.poly(zeros)) if zeros else np.array([1.0])
    h = np.convolve([float(math.comb(order, k)) for k in range(order + 1)], q)
    h = h * math.sqrt(2.0) / h.sum()
    return tuple(float(v) for v in h)


def _wavelet_order(name: str) -> int:
    name = name.lower()
    if name == "haar":
        return 1
    if name.startswith("db") and name[2:].isdigit():
        return int(name[2:])
    raise MediffError(f"unsupported wavelet {name!r}; use 'haar' or 'db1'..'db10'")


class Wavelet2D(LinearOperator):
    """Orthonormal 2-D discrete wavelet transform Ψ on the last two dims, periodic boundary.

    A (analysis): x (..., H, W) -> coefficients (..., H, W) in the Mallat layout (approximation in the
    top-left (H/2ᴸ, W/2ᴸ) block, at each level the detail blocks (low_H, high_W) top-right,
    (high_H, low_W) bottom-left, (high_H, high_W) bottom-right), matching ``pywt.coeffs_to_array`` of
    ``pywt.wavedec2(x, wavelet, mode='periodization')``. AH (synthesis) is its inverse. Being square and
    orthonormal, ||Ψx|| = ||x|| and ΨᴴΨ = I, so the l1 prox in ``l1_wavelet_reconstruct`` is exact.
    H and W must be divisible by 2**levels. Real or complex input (the filters are real).
    """

    def __init__(self, wavelet: str = "db4", levels: int = 3) -> None:
        if levels < 1:
            raise MediffError(f"levels must be >= 1, got {levels}")
        h = np.asarray(daubechies_filter(_wavelet_order(wavelet)))
        length = h.size
        g = np.array([(-1) ** m * h[length - 1 - m] for m in range(length)])  # quadrature mirror high-pass
        filt = torch.tensor(np.stack([h, g]), dtype=torch.float64).unsqueeze(1)  # (2, 1, L)
        # Circular offset so coefficient k sits where pywt's periodization puts it.
        self._set(wavelet=wavelet, levels=levels, filters=filt, shift=1 - length // 2)

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise MediffError("Wavelet2D needs at least two dims (H, W)")
        f = 2**self.levels
        if x.shape[-1] % f or x.shape[-2] % f:
            raise MediffError(
                f"image size {tuple(x.shape[-2:])} must be divisible by 2**levels = {f}; lower `levels` or pad"
            )

    def _analysis_1d(self, v: Tensor) -> Tensor:
        """(M, N) -> (M, N): [approx (N/2) | detail (N/2)] along the last dim."""
        n = v.shape[-1]
        length = self.filters.shape[-1]
        # a[k] = Σ_m h[m] v[(2k + m + shift) mod N]; the periodic extension is built by index so
        # filters longer than the signal (deep levels) wrap correctly.
        idx = (torch.arange(n + length - 2, device=v.device) + self.shift) % n
        out = F.conv1d(v[:, idx].unsqueeze(1), self.filters.to(v), stride=2)  # (M, 2, N/2)
        return out.flatten(1)

    def _synthesis_1d(self, c: Tensor) -> Tensor:
        """Exact adjoint (= inverse) of ``_analysis_1d``: (M, N) -> (M, N)."""
        m, n = c.shape
        full = F.conv_transpose1d(c.view(m, 2, n // 2), self.filters.to(c), stride=2).squeeze(1)  # (M, N+L-2)
        # Fold the periodic extension back: position j of the extension is sample (j + shift) mod N.
        reps = -(-full.shape[-1] // n)
        full = F.pad(full, (0, reps * n - full.shape[-1])).view(m, reps, n).sum(1)
        return torch.roll(full, self.shift, dims=-1)

    def _along(self, x: Tensor, dim: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
        v = x.movedim(dim, -1)
        shape = v.shape
        return fn(v.reshape(-1, shape[-1])).view(shape).movedim(-1, dim)

    def _real_op(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        # Filters are real: transform real and imaginary parts separately (stacked in one call).
        if x.is_complex():
            out = fn(torch.stack([x.real, x.imag]))
            return torch.complex(out[0], out[1])
        return fn(x)

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        self._check(x)

        def run(v: Tensor) -> Tensor:
            v = v.clone()
            h, w = v.shape[-2:]
            for _ in range(self.levels):
                blk = v[..., :h, :w]
                blk = self._along(blk, -1, self._analysis_1d)
                blk = self._along(blk, -2, self._analysis_1d)
                v[..., :h, :w] = blk
                h, w = h // 2, w // 2
            return v

        return self._real_op(x, run)

    def AH(self, c: Tensor) -> Tensor:  # noqa: N802
        self._check(c)

        def run(v: Tensor) -> Tensor:
            v = v.clone()
            f = 2 ** (self.levels - 1)
            h, w = v.shape[-2] // f, v.shape[-1] // f
            for _ in range(self.levels):
                blk = v[..., :h, :w]
                blk = self._along(blk, -2, self._synthesis_1d)
                blk = self._along(blk, -1, self._synthesis_1d)
                v[..., :h, :w] = blk
                h, w = h * 2, w * 2
            return v

        return self._real_op(c, run)

    def detail_mask(self, shape: Sequence[int], device: torch.device | None = None) -> Tensor:
        """Boolean (H, W) mask, True on detail coefficients, False on the coarsest approximation block."""
        h, w = shape[-2], shape[-1]
        m = torch.ones(h, w, dtype=torch.bool, device=device)
        m[: h // 2**self.levels, : w // 2**self.levels] = False
        return m


def _soft_threshold(c: Tensor, thr: Tensor) -> Tensor:
    """Magnitude soft-threshold, the prox of thr·|·| for real or complex c: c · max(0, 1 − thr/|c|)."""
    mag = c.abs()
    return c * torch.clamp(1.0 - thr / mag.clamp_min(torch.finfo(mag.dtype).tiny), min=0.0)


def l1_wavelet_objective(
    op: LinearOperator, x: Tensor, y: Tensor, lam: float, psi: Wavelet2D, penalize_approx: bool = False
) -> Tensor:
    """½||Ax − y||² + lam ||Ψx||₁ per item (B,); the approximation band is excluded unless ``penalize_approx``."""
    c = psi.A(x).abs()
    if not penalize_approx:
        c = c * psi.detail_mask(x.shape, x.device)
    return 0.5 * _sqnorm(op.A(x) - y) + lam * c.flatten(1).sum(1)


def l1_wavelet_reconstruct(
    op: LinearOperator,
    y: Tensor,
    lam: float,
    iters: int = 200,
    wavelet: str = "db4",
    levels: int = 3,
    x0: Tensor | None = None,
    *,
    penalize_approx: bool = False,
    a_norm: float | Tensor | None = None,
    norm_iters: int = 30,
    callback: Callback | None = None,
) -> Tensor:
    """Wavelet-sparse reconstruction min_x ½||Ax − y||² + lam ||Ψx||₁ by FISTA (Beck & Teboulle 2009).

    Ψ = ``Wavelet2D(wavelet, levels)`` (orthonormal, periodic) on the last two dims. Complex
    coefficients are magnitude soft-thresholded. By default the coarsest approximation band is not
    penalised (it holds the image mean/contrast, not sparse). Step 1/L with L = ||A||² (per item;
    ``a_norm`` if given, otherwise power iteration with a 1% safety margin). x0: start (default zeros).
    callback(k, x) after each iteration. Returns x shaped like Aᴴ y.
    """
    if lam < 0:
        raise MediffError(f"lam must be >= 0, got {lam}")
    psi = Wavelet2D(wavelet, levels)
    aty = op.AH(y)
    x = torch.zeros_like(aty) if x0 is None else x0.to(aty.dtype).clone()
    psi._check(x)
    rdt = x.real.dtype
    if a_norm is None:
        nrm = op_norm(op, x, norm_iters) * _NORM_SAFETY
    else:
        nrm = torch.as_tensor(a_norm, dtype=rdt, device=x.device).expand(x.shape[0]).clone()
    step = _bview(1.0 / (nrm.to(rdt) ** 2).clamp_min(torch.finfo(rdt).tiny), x)
    thr = step * lam
    if not penalize_approx:
        thr = thr * psi.detail_mask(x.shape, x.device).to(rdt)

    z, t = x, 1.0
    for k in range(1, iters + 1):
        grad = op.AH(op.A(z) - y)  # gradient of ½||Az − y||²
        x_new = psi.AH(_soft_threshold(psi.A(z - step.to(x.dtype) * grad), thr))
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
        if callback is not None:
            callback(k, x)
    return x


# --------------------------------------------------------------------------------------------------
# Hyper-parameter selection
# --------------------------------------------------------------------------------------------------


def tune_lambda(
    fn: Callable[..., Tensor],
    candidates: Sequence[float],
    op: LinearOperator,
    y: Tensor,
    ref: Tensor,
    data_range: float | Tensor,
    **kwargs: object,
) -> tuple[float, Tensor]:
    """Grid search for the regularisation weight maximising mean PSNR over a VALIDATION batch.

    fn(op, y, lam, **kwargs) -> x, e.g. ``tv_reconstruct`` or ``l1_wavelet_reconstruct``. y, ref:
    validation measurements (B, ...) and ground truth (B, ...). The caller must pass items disjoint
    from the evaluation set: tuning on test items inflates the reported baseline scores.
    Returns (best lam, mean PSNR in dB per candidate, shape (len(candidates),)). Ties keep the first.
    """
    if len(candidates) == 0:
        raise MediffError("tune_lambda needs at least one candidate")
    scores = []
    for lam in candidates:
        x = fn(op, y, lam, **kwargs)
        scores.append(psnr(x, ref, data_range).mean())
    scores_t = torch.stack(scores)
    return float(candidates[int(torch.argmax(scores_t))]), scores_t
