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
from mediff.physics.operators import LinearOperator


# Temporary elements per chunk while building matrices: cache-sized, because on small VMs fresh
# large temporaries cost more in page faults than the arithmetic itself.
CHUNK = 1 << 17

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
        r1 = min(max(int(torch.searchsorted(crow, s0 + CHUNK, right=True)) - 1, r0 + 1), R)
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
    p_step = max(width, (CHUNK // (2 * V)) // width * width)  # whole padded rows per chunk
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
def limit_cpu_threads(n_threads: int | None, device: torch.device | None = None) -> Iterator[None]:
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
        with limit_cpu_threads(self.cpu_threads):
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
        with limit_cpu_threads(self.cpu_threads, x.device):
            y = _matmul(self._mats(x.device, dt), x.to(dt), self.n, self.n_views * self.n_detectors)
        return y.reshape(x.shape[0], 1, self.n_views, self.n_detectors).to(x.dtype)

    def _adjoint_raw(self, y: Tensor) -> Tensor:
        dt = self._work_dtype(y)
        with limit_cpu_threads(self.cpu_threads, y.device):
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
                  detector_spacing=spacing * px, fan_angle_deg=fan, source_px=r_s, detector_px=r_d, spacing_px=spacing)
        self._init_common(n, _as_angles(angles_deg), int(n_detectors), px, cpu_threads)

    def _frame(self) -> tuple[Tensor, Tensor]:
        b = torch.deg2rad(self.angles_deg)
        return torch.cos(b), torch.sin(b)

    def detector_offsets_px(self) -> Tensor:
        """Detector bin positions along the detector, in pixels (n_det,)."""
        return (torch.arange(self.n_detectors, dtype=torch.float64) - (self.n_detectors - 1) / 2.0) * self.spacing_px

    def _rays(self) -> Rays:
        cos, sin = (t[:, None] for t in self._frame())
        u = self.detector_offsets_px()[None, :]
        # source S = -rs e, detector point D = rd e + u t, e = (-sin, cos), t = (cos, sin)
        sx, sy = self.source_px * sin, -self.source_px * cos
        px_, py_ = -self.detector_px * sin + u * cos, self.detector_px * cos + u * sin
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
        u = (self.source_px + self.detector_px) * along_t / (along_e + self.source_px)
        return u / self.spacing_px + (self.n_detectors - 1) / 2.0


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
