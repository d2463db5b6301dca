"""What the data themselves say about the MRI problem: the image phase from the k-space centre,
the noise level from the outer k-space, and the SENSE model's residual."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.physics.masks import mask_tensor
from mediff.physics.mri.coils import hann_calib_window
from mediff.physics.mri.fourier import as_complex
from mediff.physics.mri.sense import MultiCoilMRI, SingleCoilMRI
from mediff.physics.operators import conjugate_gradient



def unit_phase(c: Tensor, floor: Tensor | float = 0.0) -> Tensor:
    """c / |c| for a complex image c, and 1 where |c| <= ``floor`` (broadcastable to c): a phase is
    only defined where there is signal, and 1 leaves a magnitude there unchanged."""
    mag = c.abs()
    return torch.where(mag > floor, c / mag.clamp_min(torch.finfo(mag.dtype).tiny), torch.ones_like(c))


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
    y = as_complex(torch.as_tensor(kspace))
    if y.dim() != 4:
        raise MediffError(f"k-space must have shape (B, C, H, W), got {tuple(y.shape)}")
    if y.shape[1] != op.n_coils:
        raise MediffError(f"k-space has {y.shape[1]} coils but the operator expects {op.n_coils} (multi-coil needs MultiCoilMRI)")
    win = hann_calib_window(y.shape[-2:], calib, device=y.device, dtype=y.real.dtype)
    low = op.AH(y * win)
    return unit_phase(low, 1e-6 * low.abs().flatten(1).amax(1).view(-1, 1, 1, 1))


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
    k = as_complex(torch.as_tensor(kspace)).detach().cpu().to(torch.complex128)
    if k.dim() == 3:
        k = k.unsqueeze(0)
    if k.dim() != 4:
        raise MediffError(f"k-space must have shape (C, H, W) or (B, C, H, W), got {tuple(k.shape)}")
    b, c, h, w = k.shape
    m = mask_tensor(mask).cpu().to(torch.bool)
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
    y = as_complex(torch.as_tensor(kspace)).to(torch.complex128)
    if y.dim() != 4 or y.shape[0] != 1:
        raise MediffError(f"k-space must have shape (1, C, H, W), got {tuple(y.shape)}")
    maps = op.coil_maps
    m = int(torch.broadcast_to(op.mask.bool(), y.shape).sum())
    n = int((maps.abs().pow(2).sum(dim=1) > 0.5).sum())  # sum_c |S_c|^2 = 1 inside the support, 0 outside
    if m <= n:
        return 0.0
    x = conjugate_gradient(op.normal, op.AH(y), torch.zeros(1, 1, *y.shape[-2:], dtype=y.dtype), iters)
    return float(((y - op.A(x)).abs().pow(2).sum() / (m - n)).sqrt())
