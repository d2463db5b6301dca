"""Filtered back-projection for the parallel- and fan-beam projectors, and sinogram checks.

FBP uses the Kak & Slaney spatial-domain ramp, so ``fbp(op, op.A(mu))`` returns mu in 1/mm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.physics.ct.projector import CHUNK, FanBeamCT, ParallelBeamCT, check_sinogram, limit_cpu_threads
from mediff.physics.operators import LinearOperator

FILTERS = ("ramp", "hann", "shepp-logan", "cosine")


# --------------------------------------------------------------------------------------------------
# Filtered back-projection
# --------------------------------------------------------------------------------------------------


def _filter_response(n_det: int, filter: str, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, int]:
    """rfft response (P//2+1,) of the windowed discrete ramp for unit spacing, and the padded length P.

    The ramp is the spatial-domain band-limited kernel of Kak & Slaney (h[0] = 1/4, h[odd m] =
    -1/(pi m)^2, h[even m != 0] = 0), transformed with the FFT: unlike sampling |nu| directly, it has
    the correct (non-zero) DC term, so there is no cupping / DC offset in the reconstruction.
    """
    if filter not in FILTERS:
        raise MediffError(f"unknown FBP filter {filter!r}; choose one of {', '.join(FILTERS)}")
    # Zero-pad to a power of two >= 2 n_det so the circular convolution equals the linear one.
    size = 1 << max(6, math.ceil(math.log2(2 * n_det)))
    m = torch.arange(size, dtype=torch.float64)
    m = torch.where(m > size // 2, m - size, m)  # circular offsets: 0, 1, ..., -2, -1
    h = torch.where(m % 2 == 1, -1.0 / (math.pi * m) ** 2, torch.zeros_like(m))
    h[0] = 0.25
    resp = torch.fft.rfft(h).real  # h is even -> real spectrum
    nu = torch.fft.rfftfreq(size, dtype=torch.float64)  # cycles per detector bin, in [0, 0.5]
    if filter == "hann":
        resp = resp * 0.5 * (1.0 + torch.cos(2.0 * math.pi * nu))
    elif filter == "shepp-logan":
        resp = resp * torch.sinc(nu)  # torch.sinc(x) = sin(pi x) / (pi x)
    elif filter == "cosine":
        resp = resp * torch.cos(math.pi * nu)
    return resp.to(device=device, dtype=dtype), size


def filter_sinogram(sino: Tensor, filter: str = "ramp", spacing: float = 1.0) -> Tensor:
    """Ramp-filter each projection along the last (detector) axis: q = spacing * (p conv h_spacing).

    ``sino``: (..., n_det), bin width ``spacing``; result has the same shape, in units 1/spacing.
    ``filter``: "ramp" | "hann" | "shepp-logan" | "cosine" (ramp times that apodisation window).
    """
    n_det = sino.shape[-1]
    dt = sino.dtype if sino.dtype in (torch.float32, torch.float64) else torch.float32
    resp, size = _filter_response(n_det, filter, dt, sino.device)
    spec = torch.fft.rfft(sino.to(dt), n=size, dim=-1) * resp
    # h for spacing tau is h_1 / tau^2; the convolution sum carries one tau -> overall 1/tau.
    return (torch.fft.irfft(spec, n=size, dim=-1)[..., :n_det] / spacing).to(sino.dtype)


def _fan_backproject(op: "FanBeamCT", q: Tensor) -> Tensor:
    """Distance-weighted pixel-driven back-projection of fan-beam data (Kak & Slaney).

    q: (B, 1, V, D) -> (B, 1, N, N) = sum_v U_v(X)^-2 q_v(det_v(X)), U = (R_s + X.e) / R_s, with linear
    interpolation on the detector (zero beyond it). The 1/U^2 weight depends jointly on pixel and
    view, so this cannot be the plain adjoint; it is computed on the fly (differentiable gathers).
    """
    b, n, n_det, n_views = q.shape[0], op.n, op.n_detectors, op.n_views
    dev = q.device
    dt = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    c = (n - 1) / 2.0
    coords = torch.arange(n, dtype=torch.float64)
    xs = (coords - c).repeat(n)[:, None]  # (N*N, 1), row-major pixel order
    ys = (c - coords).repeat_interleave(n)[:, None]
    # A zero bin on each side of every view: out-of-detector samples read 0 without branching.
    qp = torch.nn.functional.pad(q.to(dt).reshape(b, n_views, n_det), (1, 1)).reshape(b, -1)
    beta = torch.deg2rad(op.angles_deg)
    cos_b, sin_b = torch.cos(beta), torch.sin(beta)
    out = torch.zeros(b, n * n, dtype=dt, device=dev)
    step = max(1, CHUNK // (n * n))  # views per chunk, temporaries kept cache-sized
    for v0 in range(0, n_views, step):
        v1 = min(n_views, v0 + step)
        # Same mapping as FanBeamCT._det_index, sharing the denominator with the distance weight.
        inv = 1.0 / (op.source_px + (ys * cos_b[v0:v1] - xs * sin_b[v0:v1]))  # 1 / (R_s + X.e), (N*N, Vc)
        along_t = xs * cos_b[v0:v1] + ys * sin_b[v0:v1]
        idx = (along_t * inv).mul_((op.source_px + op.detector_px) / op.spacing_px).add_((n_det - 1) / 2.0).clamp_(-1.0, float(n_det))
        i0 = torch.floor(idx)
        # Flat index into the padded views; idx == n_det reads the right pad, whose +1 neighbour
        # (next view's left pad, or clamped to the very last pad) is 0 as well.
        lin = (i0.long() + 1).add_(torch.arange(v0, v1)[None, :] * (n_det + 2)).to(dev)
        lin1 = (lin + 1).clamp_max_(n_views * (n_det + 2) - 1)
        f = (idx - i0).to(device=dev, dtype=dt)
        weight = (inv * op.source_px).square_().to(device=dev, dtype=dt)
        out = out + ((qp[:, lin] * (1.0 - f) + qp[:, lin1] * f) * weight).sum(-1)
    return out.reshape(b, 1, n, n)


def _median_step_rad(angles_deg: Tensor) -> float:
    """Median spacing of the sorted view angles, in radians (0 for a single view)."""
    steps = torch.sort(angles_deg).values.diff()
    return math.radians(float(steps.median())) if steps.numel() else 0.0


def _max_circular_gap_deg(angles_deg: Tensor) -> float:
    """Largest gap between neighbouring view angles on the 360-degree circle."""
    a = torch.sort(torch.remainder(angles_deg, 360.0)).values
    return float(torch.cat([a.diff(), (a[:1] + 360.0 - a[-1:])]).max())


def fbp(op: LinearOperator, sino: Tensor, filter: str = "ramp") -> Tensor:
    """Filtered back-projection: sinogram (B, 1, V, D) of line integrals -> attenuation (B, 1, N, N) in 1/mm.

    Parallel beam: Kak & Slaney ramp (optionally apodised) along the detector, then the exact adjoint
    ``op.AH``, each view weighted d(theta) = min(pi / V, median angular step). That is exact for views
    uniform over 180 (or 360) degrees; limited-angle sets keep their true step (missing wedge stays
    missing, no extrapolation). Fan beam (flat detector): weighted filtering (cosine pre-weight, ramp
    on the detector scaled to the isocentre, 1/U^2 distance weight), views over a full 360 degrees
    (weight 2 pi / V); short scans (Parker weights) are not implemented and raise MediffError.
    """
    if not isinstance(op, (ParallelBeamCT, FanBeamCT)):
        raise MediffError(f"fbp needs a ParallelBeamCT or FanBeamCT, got {type(op).__name__}")
    check_sinogram(sino, op)
    with limit_cpu_threads(op.cpu_threads, sino.device):
        return _fbp(op, sino, filter)


def _fbp(op: "ParallelBeamCT | FanBeamCT", sino: Tensor, filter: str) -> Tensor:
    px = op.pixel_size_mm
    if isinstance(op, ParallelBeamCT):
        q = filter_sinogram(sino, filter, spacing=1.0)  # detector bins are one pixel wide
        d_theta = math.pi / op.n_views
        if op.n_views > 1:
            d_theta = min(d_theta, _median_step_rad(op.angles_deg))
        # op.AH spreads each value with total weight ~1 per view and pixel but carries one factor
        # pixel_size_mm (path lengths in mm). Result in 1/pixel -> 1/mm.
        return op.AH(q) * d_theta / (px * px)
    if op.n_views < 2 or _max_circular_gap_deg(op.angles_deg) > 2.0 * 360.0 / op.n_views + 1e-6:
        raise MediffError("fan-beam FBP needs views spread uniformly over 360 degrees (short scans are not supported)")
    # Rescale the flat detector to a virtual one through the isocentre (magnification M).
    mag = (op.source_px + op.detector_px) / op.source_px
    p = op.detector_offsets_px() / mag  # virtual detector coordinates, pixels
    pre = (op.source_px / torch.sqrt(op.source_px**2 + p**2)).to(device=sino.device, dtype=sino.dtype)
    # 1/2: over 360 degrees every line is measured twice.
    q = 0.5 * filter_sinogram(sino * pre, filter, spacing=op.spacing_px / mag)
    return _fan_backproject(op, q) * (2.0 * math.pi / op.n_views) / px
