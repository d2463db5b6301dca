"""CT physics: parallel- and fan-beam forward models, FBP, HU mapping and low-dose simulation.

This module is the only place where CT geometry lives. Conventions (shared by every function):

* Images are real tensors ``(B, 1, N, N)``. Pixel ``[i, j]`` has its centre at
  ``x = (j - (N-1)/2) * pixel_size_mm`` (x to the right) and ``y = ((N-1)/2 - i) * pixel_size_mm``
  (y up), so the rotation centre is the image centre. Attenuation images are in 1/mm.
* Sinograms are ``(B, 1, n_views, n_detectors)`` of dimensionless line integrals
  ``p = int mu dl`` (the forward model multiplies by ``pixel_size_mm``, lengths are in mm).
* Angles are in degrees, counter-clockwise from the +x axis. Parallel view ``theta`` measures
  ``s = x cos(theta) + y sin(theta)`` (rays run along ``(-sin, cos)``); detector bin ``k`` sits at
  ``s_k = (k - (n_det-1)/2) * spacing``.
* The discrete projector is Joseph's method (ray-driven): a ray steps one pixel at a time along its
  dominant axis, linearly interpolates the two neighbouring pixels on the other axis and weights by
  the path length per step. It is stored once as a sparse CSR matrix together with its transpose,
  built from the very same weights, so ``AH`` is the exact adjoint of ``A`` (to rounding).

The image is modelled as zero outside the N x N square; rays are infinite lines (for fan beam, the
source is required to sit outside the image so each ray crosses the object once).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.operators.base import LinearOperator

__all__ = [
    "FanBeamCT",
    "ParallelBeamCT",
    "check_hu",
    "check_sinogram",
    "fbp",
    "hu_to_mu",
    "limited_angle_angles",
    "mu_to_hu",
    "filter_sinogram",
    "simulate_sinogram",
    "sparse_view_angles",
]

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy, 1/mm
FILTERS = ("ramp", "hann", "shepp-logan", "cosine")

# Rough upper bound on temporary elements per chunk while building matrices (memory, not speed).
_CHUNK = 1 << 21

# (ox, oy, dx, dy) of every ray, in pixel units, image-centred frame.
Rays = tuple[Tensor, Tensor, Tensor, Tensor]
# (views (V,), x (P, 1), y (P, 1)) -> (P, V) continuous detector index of the ray of each view
# through each point (pixel units).
DetIndexFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------
# Angle helpers
# --------------------------------------------------------------------------------------------------


def sparse_view_angles(n_views: int) -> Tensor:
    """``n_views`` angles (degrees, float64) uniform over [0, 180): ``k * 180 / n_views``."""
    if int(n_views) != n_views or n_views < 1:
        raise MediffError(f"n_views must be a positive integer, got {n_views!r}")
    return torch.arange(int(n_views), dtype=torch.float64) * (180.0 / int(n_views))


def limited_angle_angles(n_views: int, max_angle_deg: float = 120.0) -> Tensor:
    """``n_views`` angles uniform over [0, max_angle_deg) (degrees, float64): a missing wedge."""
    if int(n_views) != n_views or n_views < 1:
        raise MediffError(f"n_views must be a positive integer, got {n_views!r}")
    if not 0.0 < float(max_angle_deg) <= 180.0:
        raise MediffError(f"max_angle_deg must be in (0, 180], got {max_angle_deg!r}")
    return torch.arange(int(n_views), dtype=torch.float64) * (float(max_angle_deg) / int(n_views))


def _as_angles(angles_deg: Tensor | Sequence[float] | np.ndarray) -> Tensor:
    a = torch.as_tensor(np.asarray(angles_deg.detach().cpu() if isinstance(angles_deg, Tensor) else angles_deg,
                                   dtype=np.float64)).reshape(-1)
    if a.numel() == 0:
        raise MediffError("angles_deg is empty: at least one view is needed")
    if not bool(torch.isfinite(a).all()):
        raise MediffError("angles_deg contains NaN or inf")
    return a


def _check_n(n: int) -> int:
    if int(n) != n or n < 2:
        raise MediffError(f"image size n must be an integer >= 2, got {n!r}")
    return int(n)


# --------------------------------------------------------------------------------------------------
# Joseph projector as a pair of CSR matrices
# --------------------------------------------------------------------------------------------------


def _group_rays(rays: Rays, transposed: bool) -> Rays:
    """Rays in the 'group frame' where they are y-dominant (|dy| >= |dx|).

    x-dominant rays act on the transposed image X^T; pixel (i', j') of X^T is X[j', i'] whose centre
    is (x, y) = (-y', -x') in terms of the group-frame centre (x', y'). The map is its own inverse.
    """
    ox, oy, dx, dy = rays
    return (-oy, -ox, -dy, -dx) if transposed else rays


def _ray_coeffs(n: int, rays: Rays) -> tuple[Tensor, Tensor, Tensor]:
    """Per y-dominant ray: column position ``u(k) = alpha - k * g`` where it crosses row ``k``, and
    the path length per row step ``L = 1/|dy|`` (pixel units). Shapes (R,)."""
    ox, oy, dx, dy = rays
    c = (n - 1) / 2.0
    g = dx / dy
    # Row k has y = c - k; the ray reaches it at x = ox + (c - k - oy) g; column index u = x + c.
    alpha = ox + c + (c - oy) * g
    return alpha, g, 1.0 / dy.abs()


def _forward_entries(n: int, alpha: Tensor, g: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ray-major CSR parts (crow, col, val) of the y-dominant Joseph matrix (R, n*n).

    Column indices are sorted within each row (k ascending, then j0 < j0+1), as torch CSR requires.
    """
    R = alpha.numel()
    # Rows k where the crossing u lies in (-1, n), i.e. touches at least one pixel; solved in closed
    # form (rounded outward) so that no time is spent on samples outside the image.
    safe_g = torch.where(g.abs() > 1e-12, g, torch.ones_like(g))
    b1, b2 = (alpha - n) / safe_g, (alpha + 1.0) / safe_g
    # Generous margins: the exact test on u below decides, this only must not miss a row (a nearly
    # axis-aligned ray with tiny g can creep into the image over many rows).
    flat_in = (alpha > -1.0 - 1e-6) & (alpha < n + 1e-6)
    lo = torch.where(g.abs() > 1e-12, torch.minimum(b1, b2), torch.where(flat_in, 0.0, float(n)))
    hi = torch.where(g.abs() > 1e-12, torch.maximum(b1, b2), torch.where(flat_in, n - 1.0, -1.0))
    k_lo = (lo.floor() - 1).clamp(0, n).long()
    k_hi = (hi.ceil() + 1).clamp(-1, n - 1).long()
    counts = (k_hi - k_lo + 1).clamp_min(0)
    cum = counts.cumsum(0)
    rows_out, cols_out, vals_out = [], [], []
    r0 = 0
    while r0 < R:
        base = int(cum[r0 - 1]) if r0 > 0 else 0
        r1 = int(torch.searchsorted(cum, base + _CHUNK, right=True))
        r1 = min(max(r1, r0 + 1), R)
        cnt = counts[r0:r1]
        ray = torch.repeat_interleave(torch.arange(r0, r1), cnt)
        start = cum[r0:r1] - cnt - base
        k = torch.arange(ray.numel()) - start[ray - r0] + k_lo[ray]
        u = alpha[ray] - k.double() * g[ray]
        j0f = torch.floor(u)
        f = u - j0f
        w = length[ray]
        j0 = j0f.long()
        jj = torch.stack([j0, j0 + 1], 1)
        ww = torch.stack([(1.0 - f) * w, f * w], 1)
        keep = ((jj >= 0) & (jj < n) & (ww > 0)).reshape(-1).nonzero().squeeze(1)
        rows_out.append(ray.repeat_interleave(2)[keep])
        cols_out.append((k[:, None] * n + jj).reshape(-1)[keep])
        vals_out.append(ww.reshape(-1)[keep])
        r0 = r1
    rows = torch.cat(rows_out)
    crow = torch.zeros(R + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=R).cumsum(0)
    return crow, torch.cat(cols_out), torch.cat(vals_out)


def _adjoint_entries(
    n: int,
    alpha: Tensor,
    g: Tensor,
    length: Tensor,
    ray_global: Tensor,
    n_det: int,
    n_views: int,
    transposed: bool,
    det_index: DetIndexFn,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel-major CSR parts (crow, col, val) of the transpose (n*n, R) of the same Joseph matrix.

    Enumerates, for each pixel and view, the candidate rays whose crossing with the pixel's row lies
    within one pixel (found by projecting the segment (x_j - 1, x_j + 1) onto the detector), then
    recomputes each weight with exactly the forward's floating-point expression, so both matrices hold
    bit-identical entries without any sort. Ray indices come out ascending within each pixel row.
    """
    R = alpha.numel()
    c = (n - 1) / 2.0
    view_of = ray_global // n_det
    views = torch.unique(view_of)  # only views that own rays of this group
    V = views.numel()
    # If every ray of these views is in the group (always true for parallel beam), the local ray id
    # is plain arithmetic; otherwise (fan beam views straddling 45 degrees) use a lookup table.
    whole_views = R == V * n_det
    local = torch.full((n_views * n_det,), -1, dtype=torch.long)
    local[ray_global] = torch.arange(R)
    local_of_view = local.view(n_views, n_det)[views]  # (V, n_det)
    n_pix = n * n
    crow_counts = torch.zeros(n_pix, dtype=torch.long)
    cols_out, vals_out = [], []
    p_step = max(1, _CHUNK // (2 * V))
    for p0 in range(0, n_pix, p_step):
        pix = torch.arange(p0, min(n_pix, p0 + p_step))
        kk, jj = pix // n, pix % n
        xc = (jj.double() - c)[:, None]
        yc = (c - kk.double())[:, None]
        if transposed:  # group-frame (x', y') -> original (-y', -x')
            end_a = det_index(views, -yc, -(xc - 1.0))
            end_b = det_index(views, -yc, -(xc + 1.0))
        else:
            end_a = det_index(views, xc - 1.0, yc)
            end_b = det_index(views, xc + 1.0, yc)
        d_lo = (torch.minimum(end_a, end_b) - 1e-6).ceil_().clamp_(0, n_det).long()
        d_hi = (torch.maximum(end_a, end_b) + 1e-6).floor_().clamp_(-1, n_det - 1).long()
        cnt = (d_hi - d_lo + 1).clamp_min_(0).reshape(-1)
        pair = torch.repeat_interleave(torch.arange(cnt.numel()), cnt)
        start = cnt.cumsum(0) - cnt
        d = torch.arange(pair.numel()) - start[pair] + d_lo.reshape(-1)[pair]
        vloc = pair % V
        lid = local_of_view[vloc, d]
        p_loc = pair // V
        if not whole_views:
            ok = lid >= 0
            lid, p_loc = lid[ok], p_loc[ok]
        # Same expression, operands and dtype as in _forward_entries -> identical rounding.
        u = alpha[lid] - kk[p_loc].double() * g[lid]
        j0f = torch.floor(u)
        f = u - j0f
        w = length[lid]
        dj = jj[p_loc] - j0f.long()  # 0: pixel is j0 (weight 1-f); 1: pixel is j0+1 (weight f)
        keep = ((dj == 0) | ((dj == 1) & (f > 0))).nonzero().squeeze(1)
        val = torch.where(dj == 0, (1.0 - f) * w, f * w)[keep]
        crow_counts[pix] = torch.bincount(p_loc[keep], minlength=pix.numel())
        cols_out.append(lid[keep])
        vals_out.append(val)
    crow = torch.zeros(n_pix + 1, dtype=torch.long)
    crow[1:] = crow_counts.cumsum(0)
    return crow, torch.cat(cols_out), torch.cat(vals_out)


class _Group:
    """Rays of one dominance class: global ray ids and the CSR pair (float64, int32 indices)."""

    def __init__(self, ray_ids: Tensor, transposed: bool, mat: Tensor, mat_t: Tensor) -> None:
        self.ray_ids, self.transposed, self.mat, self.mat_t = ray_ids, transposed, mat, mat_t


def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
    # int32 indices: half the memory traffic and MKL/cuSPARSE use them natively (no per-call copy).
    return torch.sparse_csr_tensor(crow.to(torch.int32), col.to(torch.int32), val, shape, check_invariants=False)


def _build_groups(n: int, rays: Rays, n_views: int, n_det: int, det_index: DetIndexFn,
                  scale: float) -> list[_Group]:
    """Split rays by dominant axis and build A and A^T for each group (weights times ``scale``)."""
    ox, oy, dx, dy = rays
    ydom = dy.abs() >= dx.abs()
    groups = []
    for transposed, sel in ((False, ydom), (True, ~ydom)):
        ids = sel.nonzero().squeeze(1)
        if ids.numel() == 0:
            continue
        g_rays = _group_rays((ox[ids], oy[ids], dx[ids], dy[ids]), transposed)
        alpha, g, length = _ray_coeffs(n, g_rays)
        crow, col, val = _forward_entries(n, alpha, g, length)
        crow_t, col_t, val_t = _adjoint_entries(n, alpha, g, length, ids, n_det, n_views, transposed, det_index)
        # Both enumerations must find the same entries (cheap consistency guard, never user-facing).
        if col.numel() != col_t.numel() or not bool(torch.isclose(val.sum(), val_t.sum(), rtol=1e-12)):
            raise RuntimeError("internal error: CT matrix and its transpose disagree")  # pragma: no cover
        mat = _csr(crow, col, val * scale, (ids.numel(), n * n))
        mat_t = _csr(crow_t, col_t, val_t * scale, (n * n, ids.numel()))
        groups.append(_Group(ids, transposed, mat, mat_t))
    return groups


def _matmul(groups: list[_Group], x: Tensor, n: int, m: int) -> Tensor:
    """Forward: x (B, 1, n, n) -> y (B, m) using the group matrices (already on x's device/dtype)."""
    b = x.shape[0]
    img = x.reshape(b, n * n).T.contiguous()
    img_t = None
    y = x.new_zeros(m, b)
    for grp in groups:
        if grp.transposed:
            if img_t is None:
                img_t = x.reshape(b, n, n).transpose(1, 2).reshape(b, n * n).T.contiguous()
            y[grp.ray_ids] = grp.mat @ img_t
        else:
            y[grp.ray_ids] = grp.mat @ img
    return y.T


def _matmul_t(groups: list[_Group], y: Tensor, n: int) -> Tensor:
    """Adjoint: y (B, m) -> x (B, 1, n, n)."""
    b = y.shape[0]
    yt = y.T.contiguous()
    out = y.new_zeros(n * n, b)
    out_t = None
    for grp in groups:
        part = grp.mat_t @ yt[grp.ray_ids].contiguous()
        if grp.transposed:
            out_t = part if out_t is None else out_t + part
        else:
            out = out + part
    x = out.T.reshape(b, 1, n, n)
    if out_t is not None:
        x = x + out_t.T.reshape(b, 1, n, n).transpose(-1, -2)
    return x


class _Project(torch.autograd.Function):
    """y = A x with the backward pass A^T g through the stored transpose (never torch's CSR.t())."""

    @staticmethod
    def forward(ctx, x: Tensor, op: "_JosephCT") -> Tensor:  # type: ignore[override]
        ctx.op = op
        return op._forward_raw(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _BackProject.apply(grad, ctx.op), None


class _BackProject(torch.autograd.Function):
    """x = A^T y; its backward is A, so double backward works too."""

    @staticmethod
    def forward(ctx, y: Tensor, op: "_JosephCT") -> Tensor:  # type: ignore[override]
        ctx.op = op
        return op._adjoint_raw(y)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _Project.apply(grad, ctx.op), None


class _JosephCT(LinearOperator):
    """Shared machinery of the parallel and fan-beam operators (sparse Joseph matrix + transpose)."""

    n: int
    angles_deg: Tensor
    n_detectors: int
    pixel_size_mm: float

    def _init_common(self, n: int, angles_deg: Tensor, n_det: int, pixel_size_mm: float) -> None:
        if int(n_det) != n_det or n_det < 1:
            raise MediffError(f"n_detectors must be a positive integer, got {n_det!r}")
        if not (math.isfinite(float(pixel_size_mm)) and float(pixel_size_mm) > 0):
            raise MediffError(f"pixel_size_mm must be > 0, got {pixel_size_mm!r}")
        self._set(n=n, angles_deg=angles_deg, n_detectors=int(n_det), pixel_size_mm=float(pixel_size_mm))
        groups = _build_groups(n, self._rays(), self.n_views, self.n_detectors, self._det_index,
                               self.pixel_size_mm)
        # Cache of the matrices per (device, dtype); filled lazily, the float64 CPU copy is the master.
        self._set(_groups=groups, _cache={(torch.device("cpu"), torch.float64): groups})

    # Geometry hooks -------------------------------------------------------------------------------
    def _rays(self) -> Rays:
        raise NotImplementedError

    def _det_index(self, views: Tensor, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    # Shapes ---------------------------------------------------------------------------------------
    @property
    def n_views(self) -> int:
        return int(self.angles_deg.numel())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(1, N, N) of one image."""
        return (1, self.n, self.n)

    @property
    def sinogram_shape(self) -> tuple[int, int, int]:
        """(1, n_views, n_detectors) of one sinogram."""
        return (1, self.n_views, self.n_detectors)

    @property
    def nnz(self) -> int:
        """Stored non-zeros of A (the transpose holds as many again)."""
        return sum(int(grp.mat.values().numel()) for grp in self._groups)

    def _mats(self, device: torch.device, dtype: torch.dtype) -> list[_Group]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = [
                _Group(grp.ray_ids.to(device), grp.transposed, grp.mat.to(device=device, dtype=dtype),
                       grp.mat_t.to(device=device, dtype=dtype))
                for grp in self._groups
            ]
        return self._cache[key]

    @staticmethod
    def _work_dtype(t: Tensor) -> torch.dtype:
        if t.is_complex() or not t.is_floating_point():
            raise MediffError(f"CT operators need a real floating-point tensor, got {t.dtype}")
        return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32

    def _forward_raw(self, x: Tensor) -> Tensor:
        dt = self._work_dtype(x)
        y = _matmul(self._mats(x.device, dt), x.to(dt), self.n, self.n_views * self.n_detectors)
        return y.reshape(x.shape[0], 1, self.n_views, self.n_detectors).to(x.dtype)

    def _adjoint_raw(self, y: Tensor) -> Tensor:
        dt = self._work_dtype(y)
        x = _matmul_t(self._mats(y.device, dt), y.to(dt).reshape(y.shape[0], -1), self.n)
        return x.to(y.dtype)

    # LinearOperator API ---------------------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        """Line integrals: image (B, 1, N, N) in 1/mm -> sinogram (B, 1, n_views, n_detectors)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise MediffError(f"CT image must have shape (B, 1, {self.n}, {self.n}), got {tuple(x.shape)}")
        self._work_dtype(x)
        return _Project.apply(x, self)

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        """Exact adjoint (unfiltered back-projection): sinogram (B, 1, V, D) -> image (B, 1, N, N)."""
        check_sinogram(y, self, finite=False)
        return _BackProject.apply(y, self)


class ParallelBeamCT(_JosephCT):
    """Parallel-beam Radon transform (Joseph projector) with its exact adjoint.

    ``n``: image side in pixels. ``angles_deg``: view angles in degrees (any order, any range).
    ``n_detectors``: number of bins of width one pixel; default covers the image diagonal (smallest
    count >= N*sqrt(2) with the parity of N, so bins line up with pixel centres at 0 degrees).
    ``pixel_size_mm``: pixel side; line integrals of an image in 1/mm come out dimensionless.
    Memory: about 2 x 1.8 N^2 n_views stored weights (256^2 x 180 views: ~21 M, ~250 MB in float64).
    """

    def __init__(
        self,
        n: int,
        angles_deg: Tensor | Sequence[float] | np.ndarray,
        n_detectors: int | None = None,
        pixel_size_mm: float = 1.0,
    ) -> None:
        n = _check_n(n)
        if n_detectors is None:
            n_detectors = math.ceil(n * math.sqrt(2.0) - 1e-9)
            n_detectors += (n_detectors - n) % 2
        self._init_common(n, _as_angles(angles_deg), n_detectors, pixel_size_mm)

    def _rays(self) -> Rays:
        th = torch.deg2rad(self.angles_deg)[:, None]
        s = (torch.arange(self.n_detectors, dtype=torch.float64) - (self.n_detectors - 1) / 2.0)[None, :]
        cos, sin = torch.cos(th), torch.sin(th)
        shape = (self.n_views, self.n_detectors)
        return ((s * cos).reshape(-1), (s * sin).reshape(-1), (-sin).expand(shape).reshape(-1),
                cos.expand(shape).reshape(-1))

    def _det_index(self, views: Tensor, x: Tensor, y: Tensor) -> Tensor:
        th = torch.deg2rad(self.angles_deg)[views]
        return x * torch.cos(th) + y * torch.sin(th) + (self.n_detectors - 1) / 2.0


class FanBeamCT(_JosephCT):
    """Fan-beam CT with a FLAT detector (Joseph projector) and its exact adjoint.

    For view angle ``beta`` the central ray runs along ``e = (-sin beta, cos beta)`` (as the parallel
    ray at ``theta = beta``): the source sits at ``-source_distance * e``, the detector centre at
    ``+detector_distance * e`` and detector bin ``k`` is offset ``(k - (n_det-1)/2) * detector_spacing``
    along ``(cos beta, sin beta)``. Distances and spacing are in mm (pixel units when pixel_size_mm=1).
    Defaults: ``detector_spacing`` = magnification x pixel size (one pixel at the isocentre) and
    ``n_detectors`` covering the image's circumscribed circle. FBP needs views over 360 degrees.
    """

    def __init__(
        self,
        n: int,
        angles_deg: Tensor | Sequence[float] | np.ndarray,
        source_distance: float,
        detector_distance: float,
        n_detectors: int | None = None,
        detector_spacing: float | None = None,
        pixel_size_mm: float = 1.0,
    ) -> None:
        n = _check_n(n)
        px = float(pixel_size_mm)
        if not (math.isfinite(px) and px > 0):
            raise MediffError(f"pixel_size_mm must be > 0, got {pixel_size_mm!r}")
        r_s, r_d = float(source_distance) / px, float(detector_distance) / px  # in pixels
        radius = (n / 2.0 + 1.0) * math.sqrt(2.0)
        if not (math.isfinite(r_s) and r_s > radius):
            raise MediffError(
                f"source_distance must exceed the image's half-diagonal ({radius * px:.1f} mm), got {source_distance!r}"
            )
        if not (math.isfinite(r_d) and r_d >= 0):
            raise MediffError(f"detector_distance must be >= 0, got {detector_distance!r}")
        mag = (r_s + r_d) / r_s
        spacing = mag if detector_spacing is None else float(detector_spacing) / px
        if not (math.isfinite(spacing) and spacing > 0):
            raise MediffError(f"detector_spacing must be > 0, got {detector_spacing!r}")
        if n_detectors is None:
            # Half-width at the isocentre must cover the circle of radius N/sqrt(2) seen from the source.
            half = (r_s + r_d) * math.tan(math.asin(min(1.0, (n / math.sqrt(2.0)) / r_s)))
            n_detectors = 2 * math.ceil(half / spacing) + 1
        if int(n_detectors) != n_detectors or n_detectors < 1:
            raise MediffError(f"n_detectors must be a positive integer, got {n_detectors!r}")
        fan = 2.0 * math.degrees(math.atan(n_detectors * spacing / 2.0 / (r_s + r_d)))
        if fan >= 90.0:
            raise MediffError(f"fan angle {fan:.1f} deg >= 90 deg is not supported; use a smaller detector")
        self._set(source_distance=float(source_distance), detector_distance=float(detector_distance),
                  detector_spacing=spacing * px, fan_angle_deg=fan, _rs=r_s, _rd=r_d, _spacing=spacing)
        self._init_common(n, _as_angles(angles_deg), int(n_detectors), px)

    def _frame(self) -> tuple[Tensor, Tensor]:
        b = torch.deg2rad(self.angles_deg)
        return torch.cos(b), torch.sin(b)

    def _det_offsets(self) -> Tensor:
        """Detector bin positions along the detector, in pixels (n_det,)."""
        return (torch.arange(self.n_detectors, dtype=torch.float64) - (self.n_detectors - 1) / 2.0) * self._spacing

    def _rays(self) -> Rays:
        cos, sin = (t[:, None] for t in self._frame())
        u = self._det_offsets()[None, :]
        # source S = -rs e, detector point D = rd e + u t, e = (-sin, cos), t = (cos, sin)
        sx, sy = self._rs * sin, -self._rs * cos
        px_, py_ = -self._rd * sin + u * cos, self._rd * cos + u * sin
        dx, dy = px_ - sx, py_ - sy
        norm = torch.sqrt(dx * dx + dy * dy)
        shape = (self.n_views, self.n_detectors)
        return (sx.expand(shape).reshape(-1), sy.expand(shape).reshape(-1), (dx / norm).reshape(-1),
                (dy / norm).reshape(-1))

    def _det_index(self, views: Tensor, x: Tensor, y: Tensor) -> Tensor:
        b = torch.deg2rad(self.angles_deg)[views]
        cos, sin = torch.cos(b), torch.sin(b)
        along_t = x * cos + y * sin
        along_e = -x * sin + y * cos
        u = (self._rs + self._rd) * along_t / (along_e + self._rs)
        return u / self._spacing + (self.n_detectors - 1) / 2.0


def check_sinogram(sino: Tensor, op: LinearOperator, finite: bool = True) -> None:
    """Raise MediffError unless ``sino`` is a real (B, 1, n_views, n_detectors) tensor for ``op``
    (and, with ``finite``, free of NaN/inf)."""
    if not isinstance(sino, Tensor):
        raise MediffError(f"sinogram must be a torch.Tensor, got {type(sino).__name__}")
    want = (1, op.n_views, op.n_detectors)
    if sino.dim() != 4 or tuple(sino.shape[1:]) != want:
        raise MediffError(f"sinogram must have shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(sino.shape)}")
    if sino.is_complex() or not sino.is_floating_point():
        raise MediffError(f"sinogram must be real floating point, got {sino.dtype}")
    if finite and not bool(torch.isfinite(sino).all()):
        raise MediffError("sinogram contains NaN or inf")


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


def _pixel_backproject(op: _JosephCT, q: Tensor, fan_weight: bool) -> Tensor:
    """Pixel-driven back-projection sum_v w_v(X) q_v(det(X)) with linear interpolation on the detector.

    q: (B, 1, V, D) -> (B, 1, N, N). With ``fan_weight`` the fan-beam distance weight
    w = (R_s / (R_s + X.e))^2 is applied (Kak & Slaney's 1/U^2), otherwise w = 1.
    This is the interpolating back-projector FBP needs: every pixel gets exactly one detector sample
    per view (the Joseph transpose spreads rays unevenly when rays are more than a pixel apart).
    """
    b, n, n_det, n_views = q.shape[0], op.n, op.n_detectors, op.n_views
    dt = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    c = (n - 1) / 2.0
    coords = torch.arange(n, dtype=torch.float64, device=q.device)
    xs = (coords - c).repeat(n)[:, None]  # (N*N, 1), row-major pixel order
    ys = (c - coords).repeat_interleave(n)[:, None]
    # Zero bins on both sides so that out-of-detector samples read 0 without branching.
    qp = torch.nn.functional.pad(q.to(dt).reshape(b, n_views, n_det), (1, 1)).reshape(b, -1)
    out = torch.zeros(b, n * n, dtype=dt, device=q.device)
    step = max(1, _CHUNK // max(1, n * n * b))
    for v0 in range(0, n_views, step):
        views = torch.arange(v0, min(n_views, v0 + step), device=q.device)
        idx = op._det_index(views.cpu(), xs.cpu(), ys.cpu()).to(q.device)  # (N*N, Vc)
        idx = idx.clamp(-1.0, float(n_det))
        i0 = torch.floor(idx)
        f = (idx - i0).to(dt)
        lin = views[None, :] * (n_det + 2) + i0.long() + 1
        lin1 = (lin + 1).clamp_max(n_views * (n_det + 2) - 1)
        val = qp[:, lin] * (1.0 - f) + qp[:, lin1] * f  # (B, N*N, Vc)
        if fan_weight:
            beta = torch.deg2rad(op.angles_deg)[views.cpu()].to(q.device)
            along_e = -xs * torch.sin(beta) + ys * torch.cos(beta)
            val = val * ((op._rs / (op._rs + along_e)) ** 2).to(dt)
        out = out + val.sum(-1)
    return out.reshape(b, 1, n, n)


def fbp(op: LinearOperator, sino: Tensor, filter: str = "ramp") -> Tensor:
    """Filtered back-projection: sinogram (B, 1, V, D) of line integrals -> attenuation (B, 1, N, N) in 1/mm.

    Parallel beam: views are assumed uniform over 180 degrees (each weighted pi / V); fewer or
    limited-angle views give the usual streak / missing-wedge artefacts. Fan beam (flat detector):
    Kak & Slaney weighted filtering (cosine pre-weight, ramp on the detector scaled to the
    isocentre, 1/U^2 distance weight), views assumed uniform over 360 degrees (weight 2 pi / V).
    """
    if not isinstance(op, (ParallelBeamCT, FanBeamCT)):
        raise MediffError(f"fbp needs a ParallelBeamCT or FanBeamCT, got {type(op).__name__}")
    check_sinogram(sino, op)
    if isinstance(op, ParallelBeamCT):
        q = filter_sinogram(sino, filter, spacing=1.0)  # detector bins are one pixel wide
        rec = _pixel_backproject(op, q, fan_weight=False) * (math.pi / op.n_views)
    else:
        # Rescale the flat detector to a virtual one through the isocentre (magnification M).
        mag = (op._rs + op._rd) / op._rs
        p = op._det_offsets().to(sino.device) / mag  # virtual detector coordinates, pixels
        pre = (op._rs / torch.sqrt(op._rs ** 2 + p ** 2)).to(sino.dtype)
        # 1/2: each line is measured twice over 360 degrees.
        q = 0.5 * filter_sinogram(sino * pre, filter, spacing=op._spacing / mag)
        rec = _pixel_backproject(op, q, fan_weight=True) * (2.0 * math.pi / op.n_views)
    # Reconstructed in 1/pixel (line integrals are dimensionless) -> 1/mm.
    return rec / op.pixel_size_mm


# --------------------------------------------------------------------------------------------------
# HU mapping, validation and low-dose simulation
# --------------------------------------------------------------------------------------------------


def hu_to_mu(hu: Tensor | float, mu_water: float = MU_WATER_PER_MM) -> Tensor | float:
    """Hounsfield units -> linear attenuation in 1/mm: mu = mu_water (1 + HU / 1000)."""
    if not mu_water > 0:
        raise MediffError(f"mu_water must be > 0 (1/mm), got {mu_water!r}")
    return mu_water * (1.0 + hu / 1000.0)


def mu_to_hu(mu: Tensor | float, mu_water: float = MU_WATER_PER_MM) -> Tensor | float:
    """Linear attenuation in 1/mm -> Hounsfield units: HU = 1000 (mu / mu_water - 1)."""
    if not mu_water > 0:
        raise MediffError(f"mu_water must be > 0 (1/mm), got {mu_water!r}")
    return 1000.0 * (mu / mu_water - 1.0)


def check_hu(image: Tensor | np.ndarray) -> None:
    """Raise MediffError unless ``image`` looks like a CT slice in Hounsfield units.

    A real HU slice contains air (about -1000 HU) around the patient, so the minimum must be below
    -500; images normalised to [0, 1], 8-bit images or attenuation maps (~0.02 /mm) all fail that.
    Values beyond [-10000, 100000] HU are rejected as implausible (wrong units or corrupt data).
    """
    arr = torch.as_tensor(np.asarray(image)) if not isinstance(image, Tensor) else image.detach()
    if arr.numel() == 0:
        raise MediffError("CT image is empty")
    if arr.is_complex() or arr.dtype == torch.bool:
        raise MediffError(f"CT image must be real-valued HU, got {arr.dtype}")
    arr = arr.double()
    if not bool(torch.isfinite(arr).all()):
        raise MediffError("CT image contains NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo > -500.0:
        raise MediffError(
            f"CT image does not look like Hounsfield units: values in [{lo:.4g}, {hi:.4g}] contain no air "
            "(about -1000 HU); convert normalised or attenuation data to HU first"
        )
    if lo < -10000.0 or hi > 100000.0:
        raise MediffError(f"CT image values [{lo:.4g}, {hi:.4g}] are implausible for Hounsfield units")


def simulate_sinogram(
    mu_image: Tensor,
    op: LinearOperator,
    dose_I0: float | None = None,  # noqa: N803 - I0 is the standard symbol
    electronic_noise_sigma: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Simulate measured line integrals from an attenuation image (B, 1, N, N) in 1/mm.

    Clean: p = A mu. Low dose (``dose_I0`` = unattenuated photons per detector bin): counts ~
    Poisson(I0 exp(-p)) + N(0, electronic_noise_sigma^2), floored at 1 count (log of a non-positive
    count is undefined; this caps p at log(I0)), then p_noisy = -log(counts / I0).
    Randomness comes only from ``generator`` (required when noise is simulated); the global torch
    RNG is never touched. Returns (B, 1, n_views, n_detectors) in the dtype of ``mu_image``.
    """
    p = op.A(mu_image)
    if dose_I0 is None:
        if electronic_noise_sigma:
            raise MediffError("electronic_noise_sigma is in detector counts and needs dose_I0")
        return p
    if not (math.isfinite(float(dose_I0)) and float(dose_I0) > 0):
        raise MediffError(f"dose_I0 must be a positive photon count, got {dose_I0!r}")
    if not (math.isfinite(float(electronic_noise_sigma)) and float(electronic_noise_sigma) >= 0):
        raise MediffError(f"electronic_noise_sigma must be >= 0, got {electronic_noise_sigma!r}")
    if generator is None:
        raise MediffError("simulate_sinogram needs an explicit torch.Generator for reproducible noise")
    # Poisson sampling in float64: float32 rates lose integer resolution above ~1.6e7 counts.
    rate = float(dose_I0) * torch.exp(-p.detach().double())
    counts = torch.poisson(rate, generator=generator)
    if electronic_noise_sigma > 0:
        counts = counts + float(electronic_noise_sigma) * torch.randn(
            counts.shape, dtype=counts.dtype, device=counts.device, generator=generator
        )
    counts = counts.clamp_min(1.0)
    return (-torch.log(counts / float(dose_I0))).to(p.dtype)
