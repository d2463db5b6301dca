"""Coil sensitivities: smooth synthetic maps for simulation, and maps estimated from the data's
fully-sampled centre (ESPIRiT, or low-resolution coil images over their RSS).

Maps are (C, H, W) complex with sum_c |S_c|^2 = 1 inside their support and 0 outside.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.physics.mri.fourier import as_complex, ifft2c, rss



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
    if not bool(torch.isfinite(torch.view_as_real(as_complex(k))).all()):
        raise MediffError("k-space contains NaN or inf")
    out_dtype = as_complex(k[:1, :1, :1]).dtype
    k64 = as_complex(k).to(torch.complex128)
    maps = _espirit(k64, cal, int(kernel_size), threshold, crop) if method == "espirit" else _lowres_maps(
        k64, min(cal), support_threshold
    )
    return _phase_align(maps).to(device=k.device, dtype=out_dtype)
