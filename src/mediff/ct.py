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
  the path length per step. It is built once (vectorised, no sort) as sparse CSR matrices together
  with their transposes holding bit-identical weights, so ``AH`` is the exact adjoint of ``A`` (to
  rounding), on CPU or GPU, float32 or float64, with autograd through the stored transpose.
* FBP uses the Kak & Slaney spatial-domain ramp, so ``fbp(op, op.A(mu))`` returns mu in 1/mm.

The image is modelled as zero outside the N x N square; rays are infinite lines (for fan beam, the
source is required to sit outside the image so each ray crosses the object once).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from mediff.errors import MediffError
from mediff.operators.base import LinearOperator

__all__ = [
    "FILTERS",
    "MU_WATER_PER_MM",
    "FanBeamCT",
    "ParallelBeamCT",
    "check_hu",
    "check_sinogram",
    "fbp",
    "filter_sinogram",
    "hu_to_mu",
    "limited_angle_angles",
    "mu_to_hu",
    "simulate_sinogram",
    "sparse_view_angles",
]

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy, 1/mm
FILTERS = ("ramp", "hann", "shepp-logan", "cosine")

# Temporary elements per chunk while building matrices: cache-sized, because on small VMs fresh
# large temporaries cost more in page faults than the arithmetic itself.
_CHUNK = 1 << 17

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
    """Angles as a 1-D float64 CPU tensor (degrees), validated."""
    raw = angles_deg.detach().cpu().numpy() if isinstance(angles_deg, Tensor) else angles_deg
    try:
        a = torch.as_tensor(np.asarray(raw, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise MediffError(f"angles_deg must be a sequence of numbers: {exc}") from None
    if a.dim() > 1:
        raise MediffError(f"angles_deg must be 1-D, got shape {tuple(a.shape)}")
    a = a.reshape(-1)
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
# Joseph projector as sparse matrices
# --------------------------------------------------------------------------------------------------
#
# A y-dominant ray crosses row k at column u = alpha - k g and, by linear interpolation, sees
# (1 - f) X[k, j0] + f X[k, j0 + 1] (j0 = floor(u), f = u - j0), weighted by the path length per
# row L = 1/|dy|. Each such *sample* belongs to column c = (k, j0 + 1) of the image padded with a
# zero column on each side (width n + 2, so the border needs no masks) and carries two weights,
# w0 = L - f L (for z[c]) and w1 = f L (for z[c + 1]). With M0, M1 the sample matrices:
#     A x  = M0 z + M1 S z                   z = pad(x), (S z)[c] = z[c + 1]
#     A^T y = pad^T (M0^T y + S^T M1^T y)
# stored as the stacked CSR matrices [M0 ; M1 S] and [M0^T ; M1^T] (one sparse matmul each way;
# both halves share one sparsity pattern, so stacking is concatenation, never a sort or scatter).
# x-dominant rays are y-dominant rays of the transposed image. The transposed matrices are
# enumerated directly in pixel-major order with bit-identical weights, which makes AH the exact
# adjoint.


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


def _sample_weights(alpha: Tensor, g: Tensor, length: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """floor(u), w0, w1 of samples (rays given by gathered alpha, g, length; rows k as float64).

    Both enumerations call this one function on identical operands, hence identical rounding.
    """
    u = alpha - k * g
    j0f = torch.floor(u)
    w1 = (u - j0f) * length
    return j0f, length - w1, w1


def _forward_samples(n: int, alpha: Tensor, g: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """CSR parts (crow, col, val) of [M0 ; M1 S] (2R, n (n + 2)) and the count of non-zero weights.

    Ray-major, one sample per ray and row: columns come out sorted within each row, as CSR requires.
    """
    R = alpha.numel()
    width = n + 2
    # Rows k where u lies in [-1, n) (the sample touches a pixel), solved in closed form and widened
    # by a row on each side: the range must not miss a row (e.g. a nearly axis-aligned ray with tiny
    # slope creeping into the image); extra samples get zero weights below.
    steep = g.abs() > 1e-12
    safe_g = torch.where(steep, g, torch.ones_like(g))
    b1, b2 = (alpha - n) / safe_g, (alpha + 1.0) / safe_g
    flat_in = (alpha >= -1.0 - 1e-6) & (alpha < n + 1e-6)
    lo = torch.where(steep, torch.minimum(b1, b2), torch.where(flat_in, 0.0, float(n)))
    hi = torch.where(steep, torch.maximum(b1, b2), torch.where(flat_in, n - 1.0, -1.0))
    k_lo = (lo.floor() - 1).clamp(0, n).long()
    k_hi = (hi.ceil() + 1).clamp(-1, n - 1).long()
    counts = (k_hi - k_lo + 1).clamp_min(0)
    crow = torch.zeros(R + 1, dtype=torch.long)
    crow[1:] = counts.cumsum(0)
    total = int(crow[-1])
    offset = crow[:-1] - k_lo  # sample number s of ray r lies on row s - offset[r]
    col = torch.empty(2 * total, dtype=torch.int32)
    val = torch.empty(2 * total, dtype=torch.float64)
    nonzero = 0
    r0 = 0
    while r0 < R:
        s0 = int(crow[r0])
        r1 = min(max(int(torch.searchsorted(crow, s0 + _CHUNK, right=True)) - 1, r0 + 1), R)
        s1 = int(crow[r1])
        ray = torch.repeat_interleave(torch.arange(r0, r1), counts[r0:r1], output_size=s1 - s0)
        k = torch.arange(s0, s1) - offset.index_select(0, ray)
        j0f, w0, w1 = _sample_weights(alpha.index_select(0, ray), g.index_select(0, ray),
                                      length.index_select(0, ray), k.double())
        # Margin samples outside the padded image keep their slot (columns stay sorted and distinct,
        # one sample per row) with zero weights.
        outside = (j0f < -1.0) | (j0f > n - 1.0)
        c0 = k * width + (j0f.clamp_(-1.0, n - 1.0).long() + 1)
        col[s0:s1] = c0
        col[total + s0 : total + s1] = c0 + 1  # M1 S reads z[c + 1]
        val[s0:s1] = w0.masked_fill_(outside, 0.0)
        val[total + s0 : total + s1] = w1.masked_fill_(outside, 0.0)
        nonzero += int(torch.count_nonzero(w0)) + int(torch.count_nonzero(w1))
        r0 = r1
    return torch.cat([crow, crow[1:] + total]), col, val, nonzero


def _adjoint_samples(
    n: int,
    alpha: Tensor,
    g: Tensor,
    length: Tensor,
    ray_global: Tensor,
    n_det: int,
    n_views: int,
    transposed: bool,
    det_index: DetIndexFn,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """CSR parts (crow, col, val) of [M0^T ; M1^T] (2 n (n + 2), R) and the count of non-zero weights.

    Padded pixel (k, j0 + 1) holds the samples of rays crossing row k at u in [j0, j0 + 1). For each
    such pixel and each view the candidate rays are found by projecting that segment of the row onto
    the detector, then kept iff floor(u) == j0 with u from the forward's own formula. Ray indices come
    out ascending within each row; zero-weight forward slots (outside the image) are not needed.
    """
    R = alpha.numel()
    width = n + 2
    c = (n - 1) / 2.0
    views = torch.unique(ray_global // n_det)  # only views that own rays of this group
    V = views.numel()
    # Local ray id of (view slot, detector bin); -1 if the ray belongs to the other group (only in
    # fan-beam views straddling 45 degrees: parallel views lie entirely in one group).
    local = torch.full((n_views * n_det,), -1, dtype=torch.long)
    local[ray_global] = torch.arange(R)
    local_of_view = local.view(n_views, n_det)[views].reshape(-1)
    whole_views = R == V * n_det
    n_pad = n * width
    crow = torch.zeros(n_pad + 1, dtype=torch.long)
    cols, w0s, w1s = [], [], []
    kept = nonzero = 0
    p_step = max(width, (_CHUNK // (2 * V)) // width * width)  # whole padded rows per chunk
    for p0 in range(0, n_pad, p_step):
        pix = torch.arange(p0, min(n_pad, p0 + p_step))
        kk = (pix // width).double()
        j0 = (pix % width).double() - 1.0  # samples with floor(u) == j0 live here
        yc = (c - kk)[:, None]
        xa, xb = (j0 - c)[:, None], (j0 + 1.0 - c)[:, None]
        if transposed:  # group-frame (x', y') -> original (-y', -x')
            end_a, end_b = det_index(views, -yc, -xa), det_index(views, -yc, -xb)
        else:
            end_a, end_b = det_index(views, xa, yc), det_index(views, xb, yc)
        d_lo = (torch.minimum(end_a, end_b) - 1e-6).ceil_().clamp_(0, n_det).long().reshape(-1)
        d_hi = (torch.maximum(end_a, end_b) + 1e-6).floor_().clamp_(-1, n_det - 1).long().reshape(-1)
        cnt = (d_hi - d_lo + 1).clamp_min_(0)
        # No pixel in column n + 1 (j0 = n) or beyond the image rows is ever a sample's home.
        cnt.view(-1, V)[j0 > n - 1.0] = 0
        total = int(cnt.sum())
        pair = torch.repeat_interleave(torch.arange(cnt.numel()), cnt, output_size=total)
        q = pair // V  # padded pixel within the chunk
        slot_d = (pair - q * V) * n_det + torch.arange(total) - (cnt.cumsum(0) - cnt - d_lo).index_select(0, pair)
        lid = slot_d if whole_views else local_of_view.index_select(0, slot_d)
        if not whole_views:
            ok = (lid >= 0).nonzero().squeeze(1)
            lid, q = lid.index_select(0, ok), q.index_select(0, ok)
        j0f, w0, w1 = _sample_weights(alpha.index_select(0, lid), g.index_select(0, lid),
                                      length.index_select(0, lid), kk.index_select(0, q))
        sel = (j0f == j0.index_select(0, q)).nonzero().squeeze(1)
        cols.append(lid.index_select(0, sel).to(torch.int32))
        w0s.append(w0.index_select(0, sel))
        w1s.append(w1.index_select(0, sel))
        nonzero += int(torch.count_nonzero(w0s[-1])) + int(torch.count_nonzero(w1s[-1]))
        counts = torch.bincount(q.index_select(0, sel), minlength=pix.numel())
        crow[p0 + 1 : p0 + 1 + pix.numel()] = kept + counts.cumsum(0)
        kept += int(sel.numel())
    # Stack M0^T over M1^T: same pattern, the second block's row pointers continue after the first.
    col = torch.empty(2 * kept, dtype=torch.int32)
    val = torch.empty(2 * kept, dtype=torch.float64)
    pos = 0
    for c_part, w0_part, w1_part in zip(cols, w0s, w1s):
        m = c_part.numel()
        col[pos : pos + m] = c_part
        col[kept + pos : kept + pos + m] = c_part
        val[pos : pos + m] = w0_part
        val[kept + pos : kept + pos + m] = w1_part
        pos += m
    return torch.cat([crow, crow[1:] + kept]), col, val, nonzero


@contextlib.contextmanager
def _cpu_threads(n_threads: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Temporarily use ``n_threads`` intra-op CPU threads (None or a CUDA device: leave as is).

    On a small machine shared with other jobs every OpenMP region (elementwise ops, MKL sparse
    matmuls) waits for a busy core: on the 2-core dev box A+AH took 0.45 s with 2 threads vs 0.11 s
    with 1, and tiny products 12 ms vs 13 us. The setting is process-wide, so it is restored on exit.
    """
    if n_threads is None or (device is not None and device.type != "cpu"):
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class _Group:
    """Rays of one dominance class: global ray ids, [M0 | M1] and its transpose [M0^T ; M1^T]."""

    def __init__(self, ray_ids: Tensor, transposed: bool, mat: Tensor, mat_t: Tensor) -> None:
        self.ray_ids, self.transposed, self.mat, self.mat_t = ray_ids, transposed, mat, mat_t

    def to(self, device: torch.device, dtype: torch.dtype) -> "_Group":
        def conv(m: Tensor) -> Tensor:
            # Rebuild from the parts so that a dtype-only change shares the index tensors.
            return _csr(m.crow_indices().to(device), m.col_indices().to(device),
                        m.values().to(device=device, dtype=dtype), tuple(m.shape))  # type: ignore[arg-type]

        return _Group(self.ray_ids.to(device), self.transposed, conv(self.mat), conv(self.mat_t))


def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
    # int32 indices: MKL / cuSPARSE use them natively; int64 made CPU matmuls ~3x slower (measured).
    # (.to(int32) is a no-op on tensors that already are int32.)
    with warnings.catch_warnings():  # torch flags CSR as "beta" on first use; the ops used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.to(torch.int32), col.to(torch.int32), val, shape,
                                       check_invariants=False)


def _build_groups(n: int, rays: Rays, n_views: int, n_det: int, det_index: DetIndexFn,
                  scale: float) -> list[_Group]:
    """Split rays by dominant axis and build the sample matrices of each group (weights x scale)."""
    ox, oy, dx, dy = rays
    ydom = dy.abs() >= dx.abs()
    groups = []
    n_pad = n * (n + 2)
    for transposed, sel in ((False, ydom), (True, ~ydom)):
        ids = sel.nonzero().squeeze(1)
        if ids.numel() == 0:
            continue
        alpha, g, length = _ray_coeffs(n, _group_rays((ox[ids], oy[ids], dx[ids], dy[ids]), transposed))
        length = length * scale  # path length per step in mm: both enumerations use these values
        crow, col, val, nz = _forward_samples(n, alpha, g, length)
        crow_t, col_t, val_t, nz_t = _adjoint_samples(n, alpha, g, length, ids, n_det, n_views, transposed,
                                                      det_index)
        # Both enumerations must find the same weights (cheap guard against a geometry bug).
        if nz != nz_t or not bool(torch.isclose(val.sum(), val_t.sum(), rtol=1e-12)):
            raise RuntimeError("internal error: CT matrix and its transpose disagree")  # pragma: no cover
        groups.append(_Group(ids, transposed, _csr(crow, col, val, (2 * ids.numel(), n_pad)),
                             _csr(crow_t, col_t, val_t, (2 * n_pad, ids.numel()))))
    return groups


def _matmul(groups: list[_Group], x: Tensor, n: int, m: int) -> Tensor:
    """Forward: x (B, 1, n, n) -> y (B, m) using the group matrices (already on x's device/dtype)."""
    b = x.shape[0]
    img = x.reshape(b, n, n)
    y = x.new_zeros(m, b)
    for grp in groups:
        # Zero column on each side, flattened, items as columns: z (n (n + 2), B).
        z = torch.nn.functional.pad(img.transpose(1, 2) if grp.transposed else img, (1, 1)).reshape(b, -1).T
        both = grp.mat @ z.contiguous()  # [M0 z ; M1 S z]
        r = grp.ray_ids.numel()
        y[grp.ray_ids] = both[:r] + both[r:]
    return y.T


def _matmul_t(groups: list[_Group], y: Tensor, n: int) -> Tensor:
    """Adjoint: y (B, m) -> x (B, 1, n, n)."""
    b = y.shape[0]
    yt = y.T.contiguous()
    n_pad = n * (n + 2)
    x = y.new_zeros(b, 1, n, n)
    for grp in groups:
        zz = grp.mat_t @ yt.index_select(0, grp.ray_ids)  # (2 n_pad, B): [M0^T y ; M1^T y]
        z = y.new_zeros(n_pad + 1, b)
        z[:-1] += zz[:n_pad]
        z[1:] += zz[n_pad:]  # adjoint of the shift
        img = z[:-1].T.reshape(b, n, n + 2)[:, :, 1:-1]  # adjoint of the padding: crop
        x = x + (img.transpose(1, 2) if grp.transposed else img).unsqueeze(1)
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

    def _init_common(self, n: int, angles_deg: Tensor, n_det: int, pixel_size_mm: float,
                     cpu_threads: int | None) -> None:
        if int(n_det) != n_det or n_det < 1:
            raise MediffError(f"n_detectors must be a positive integer, got {n_det!r}")
        if not (math.isfinite(float(pixel_size_mm)) and float(pixel_size_mm) > 0):
            raise MediffError(f"pixel_size_mm must be > 0, got {pixel_size_mm!r}")
        if cpu_threads is not None and (int(cpu_threads) != cpu_threads or cpu_threads < 1):
            raise MediffError(f"cpu_threads must be a positive integer or None, got {cpu_threads!r}")
        self._set(n=n, angles_deg=angles_deg, n_detectors=int(n_det), pixel_size_mm=float(pixel_size_mm),
                  cpu_threads=None if cpu_threads is None else int(cpu_threads))
        with _cpu_threads(self.cpu_threads):
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
        """Stored samples (each holds two interpolation weights); the transpose stores as many again."""
        return sum(int(grp.mat.values().numel()) // 2 for grp in self._groups)

    def _mats(self, device: torch.device, dtype: torch.dtype) -> list[_Group]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = [grp.to(device, dtype) for grp in self._groups]
        return self._cache[key]

    @staticmethod
    def _work_dtype(t: Tensor) -> torch.dtype:
        if t.is_complex() or not t.is_floating_point():
            raise MediffError(f"CT operators need a real floating-point tensor, got {t.dtype}")
        return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32

    def _forward_raw(self, x: Tensor) -> Tensor:
        dt = self._work_dtype(x)
        with _cpu_threads(self.cpu_threads, x.device):
            y = _matmul(self._mats(x.device, dt), x.to(dt), self.n, self.n_views * self.n_detectors)
        return y.reshape(x.shape[0], 1, self.n_views, self.n_detectors).to(x.dtype)

    def _adjoint_raw(self, y: Tensor) -> Tensor:
        dt = self._work_dtype(y)
        with _cpu_threads(self.cpu_threads, y.device):
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
    ``cpu_threads``: intra-op threads for CPU construction / products (default 1, best on small
    shared machines; None keeps torch's setting, e.g. on a dedicated many-core CPU). CUDA ignores it.
    Memory: ~0.9 N^2 n_views samples, ~48 bytes each for A and A^T in float64 (256^2 x 180 views:
    ~0.5 GB); a float32 copy (made on first float32 use) adds ~16 bytes per sample.
    """

    def __init__(
        self,
        n: int,
        angles_deg: Tensor | Sequence[float] | np.ndarray,
        n_detectors: int | None = None,
        pixel_size_mm: float = 1.0,
        cpu_threads: int | None = 1,
    ) -> None:
        n = _check_n(n)
        if n_detectors is None:
            n_detectors = math.ceil(n * math.sqrt(2.0) - 1e-9)
            n_detectors += (n_detectors - n) % 2
        self._init_common(n, _as_angles(angles_deg), n_detectors, pixel_size_mm, cpu_threads)

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
    ``cpu_threads`` as for ParallelBeamCT. Fan angles of 90 degrees or more are rejected.
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
        cpu_threads: int | None = 1,
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
        self._init_common(n, _as_angles(angles_deg), int(n_detectors), px, cpu_threads)

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
    if not hasattr(op, "n_views") or not hasattr(op, "n_detectors"):
        raise MediffError(f"{type(op).__name__} is not a CT operator (no n_views / n_detectors)")
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
    step = max(1, _CHUNK // (n * n))  # views per chunk, temporaries kept cache-sized
    for v0 in range(0, n_views, step):
        v1 = min(n_views, v0 + step)
        # Same mapping as FanBeamCT._det_index, sharing the denominator with the distance weight.
        inv = 1.0 / (op._rs + (ys * cos_b[v0:v1] - xs * sin_b[v0:v1]))  # 1 / (R_s + X.e), (N*N, Vc)
        along_t = xs * cos_b[v0:v1] + ys * sin_b[v0:v1]
        idx = (along_t * inv).mul_((op._rs + op._rd) / op._spacing).add_((n_det - 1) / 2.0).clamp_(-1.0, float(n_det))
        i0 = torch.floor(idx)
        # Flat index into the padded views; idx == n_det reads the right pad, whose +1 neighbour
        # (next view's left pad, or clamped to the very last pad) is 0 as well.
        lin = (i0.long() + 1).add_(torch.arange(v0, v1)[None, :] * (n_det + 2)).to(dev)
        lin1 = (lin + 1).clamp_max_(n_views * (n_det + 2) - 1)
        f = (idx - i0).to(device=dev, dtype=dt)
        weight = (inv * op._rs).square_().to(device=dev, dtype=dt)
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
    with _cpu_threads(op.cpu_threads, sino.device):
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
    mag = (op._rs + op._rd) / op._rs
    p = op._det_offsets() / mag  # virtual detector coordinates, pixels
    pre = (op._rs / torch.sqrt(op._rs**2 + p**2)).to(device=sino.device, dtype=sino.dtype)
    # 1/2: over 360 degrees every line is measured twice.
    q = 0.5 * filter_sinogram(sino * pre, filter, spacing=op._spacing / mag)
    return _fan_backproject(op, q) * (2.0 * math.pi / op.n_views) / px


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
    # Validate everything before the (possibly large) projection.
    if dose_I0 is None:
        if electronic_noise_sigma:
            raise MediffError("electronic_noise_sigma is in detector counts and needs dose_I0")
        return op.A(mu_image)
    if not (math.isfinite(float(dose_I0)) and float(dose_I0) > 0):
        raise MediffError(f"dose_I0 must be a positive photon count, got {dose_I0!r}")
    if not (math.isfinite(float(electronic_noise_sigma)) and float(electronic_noise_sigma) >= 0):
        raise MediffError(f"electronic_noise_sigma must be >= 0, got {electronic_noise_sigma!r}")
    if generator is None:
        raise MediffError("simulate_sinogram needs an explicit torch.Generator for reproducible noise")
    p = op.A(mu_image)
    # Poisson sampling in float64: float32 rates lose integer resolution above ~1.6e7 counts.
    rate = float(dose_I0) * torch.exp(-p.detach().double())
    counts = torch.poisson(rate, generator=generator)
    if electronic_noise_sigma > 0:
        counts = counts + float(electronic_noise_sigma) * torch.randn(
            counts.shape, dtype=counts.dtype, device=counts.device, generator=generator
        )
    counts = counts.clamp_min(1.0)
    return (-torch.log(counts / float(dose_I0))).to(p.dtype)
