"""k-space sampling masks (the only place masks live).

Conventions
-----------
* A mask is a boolean array of shape (H, W) over *centred* k-space, i.e. the layout produced by
  :func:`mediff.physics.mri.fft2c`: DC sits at index (H // 2, W // 2). ``True`` means "sampled".
* 1D (Cartesian) masks select phase-encode columns along the last axis (W); every row is identical.
* Randomness always comes from an explicit ``numpy.random.Generator`` or an integer seed, never the
  global RNG, so the same seed gives the same mask on every machine.
* Every sampler returns a :class:`Mask`: the read-only boolean array plus the *achieved*
  acceleration H * W / (number of sampled points), the kind and the parameters used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mediff.errors import MediffError

__all__ = [
    "MASK_KINDS",
    "Mask",
    "achieved_acceleration",
    "equispaced_1d",
    "make_mask",
    "poisson_disc_2d",
    "radial",
    "random_1d",
]

Seed = int | np.random.Generator
GOLDEN_ANGLE = math.pi * (math.sqrt(5.0) - 1.0) / 2.0  # 180 deg / golden ratio ~ 111.25 deg, for spokes


@dataclass(frozen=True, eq=False)
class Mask:
    """A sampling mask with its provenance.

    mask: read-only bool array (H, W), True = sampled, DC at (H // 2, W // 2).
    accel: achieved acceleration H * W / mask.sum() (>= 1).
    kind: sampler name ("random1d", "equispaced1d", "poisson2d", "radial").
    params: read-only mapping of the parameters that produced it (requested accel, seed, ...).
    """

    mask: np.ndarray
    accel: float
    kind: str
    params: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def n_sampled(self) -> int:
        return int(self.mask.sum())

    def tensor(self, device: object = None):  # noqa: ANN201 - torch imported lazily
        """The mask as a torch bool tensor (H, W) (a copy, so the Mask stays immutable)."""
        import torch

        return torch.from_numpy(self.mask.copy()).to(device=device)


def achieved_acceleration(mask: object) -> float:
    """H * W / number of sampled points for a (H, W) mask (Mask, numpy or torch; nonzero = sampled)."""
    if isinstance(mask, Mask):
        arr = mask.mask
    elif hasattr(mask, "detach"):  # torch tensor
        arr = mask.detach().cpu().numpy()
    else:
        arr = np.asarray(mask)
    n = int(np.count_nonzero(arr))
    if n == 0:
        raise MediffError("mask samples no k-space points")
    return float(arr.size / n)


# ----------------------------------------------------------------------------- helpers


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise MediffError(f"seed must be an int or numpy.random.Generator, got {type(seed).__name__}")


def _seed_repr(seed: Seed) -> object:
    return int(seed) if isinstance(seed, (int, np.integer)) else "generator"


def _shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise MediffError(f"mask shape must be two positive ints (H, W), got {shape!r}") from None
    if h < 1 or w < 1:
        raise MediffError(f"mask shape must be two positive ints (H, W), got {shape!r}")
    return h, w


def _check_accel(accel: float) -> float:
    accel = float(accel)
    if not math.isfinite(accel) or accel <= 1.0:
        raise MediffError(f"acceleration must be a finite number > 1, got {accel}")
    return accel


def _check_fraction(center_fraction: float) -> float:
    cf = float(center_fraction)
    if not (0.0 <= cf < 1.0):
        raise MediffError(f"center_fraction must be in [0, 1), got {cf}")
    return cf


def _finish(mask: np.ndarray, kind: str, **params: object) -> Mask:
    mask = np.ascontiguousarray(mask, dtype=bool)
    mask.flags.writeable = False  # the Mask is frozen; so is its array
    return Mask(mask=mask, accel=achieved_acceleration(mask), kind=kind, params=MappingProxyType(dict(params)))


def _centre_slice(n: int, width: int) -> slice:
    """Indices of a centred block of ``width`` samples around DC (index n // 2)."""
    start = n // 2 - width // 2
    return slice(start, start + width)


def _centre_columns(w: int, accel: float, center_fraction: float) -> tuple[int, int]:
    """(fully-sampled centre columns, total columns wanted) for the 1D samplers."""
    num_low = int(round(w * center_fraction))
    target = max(int(round(w / accel)), 1)
    if num_low > target:
        raise MediffError(
            f"center_fraction {center_fraction} already samples {num_low} of {w} columns, "
            f"more than accel {accel} allows ({target})"
        )
    return num_low, target


# ----------------------------------------------------------------------------- 1D Cartesian


def random_1d(shape: Sequence[int], accel: float, center_fraction: float = 0.08, seed: Seed = 0) -> Mask:
    """Random phase-encode columns (fastMRI RandomMaskFunc style), shape (H, W).

    round(W * center_fraction) centre columns are always sampled; the remaining columns are drawn
    uniformly without replacement. Unlike fastMRI's per-column Bernoulli draw we draw the *exact*
    number round(W / accel) - n_centre, so the achieved rate is 1/accel up to rounding rather than
    only in expectation (at W = 128, accel 8 a Bernoulli draw misses the rate by ~20% one time in three).
    """
    h, w = _shape(shape)
    accel, cf = _check_accel(accel), _check_fraction(center_fraction)
    rng = _rng(seed)
    num_low, target = _centre_columns(w, accel, cf)
    cols = np.zeros(w, dtype=bool)
    cols[_centre_slice(w, num_low)] = True
    outer = np.flatnonzero(~cols)
    cols[rng.choice(outer, size=target - num_low, replace=False)] = True
    return _finish(np.broadcast_to(cols, (h, w)), "random1d", requested_accel=accel,
                   center_fraction=cf, n_center=num_low, seed=_seed_repr(seed))


def equispaced_1d(shape: Sequence[int], accel: float, center_fraction: float = 0.08, seed: Seed = 0) -> Mask:
    """Equispaced phase-encode columns with a random offset plus a fully-sampled centre, shape (H, W).

    fastMRI EquispacedMaskFractionFunc style: the spacing a' is enlarged so that centre + outer lines
    give the requested rate. Lines are spread over all W columns, so a fraction n_low / W of them lands
    in the centre block; the outer region (W - n_low columns) must then supply W/accel - n_low lines:
        (W - n_low) / a' = W / accel - n_low   =>   a' = (W - n_low) / (W / accel - n_low).
    """
    h, w = _shape(shape)
    accel, cf = _check_accel(accel), _check_fraction(center_fraction)
    rng = _rng(seed)
    num_low = int(round(w * cf))
    _centre_columns(w, accel, cf)  # validates that the centre fits in the budget
    cols = np.zeros(w, dtype=bool)
    cols[_centre_slice(w, num_low)] = True
    need = w / accel - num_low
    spacing = (w - num_low) / need if need > 0 else math.inf
    if math.isfinite(spacing):
        offset = int(rng.integers(0, max(int(round(spacing)), 1)))
        lines = np.around(np.arange(offset, w, spacing)).astype(int)
        cols[lines[lines < w]] = True
    return _finish(np.broadcast_to(cols, (h, w)), "equispaced1d", requested_accel=accel,
                   center_fraction=cf, n_center=num_low, spacing=spacing, seed=_seed_repr(seed))


# ----------------------------------------------------------------------------- 2D Poisson disc


def _disc_stencils(max_radius: float, step: float) -> tuple[list[np.ndarray], int]:
    """Boolean discs |d| < r for r = 0, step, 2*step, ..., all of size (2P+1)^2, P = ceil(max_radius)."""
    pad = int(math.ceil(max_radius))
    d = np.arange(-pad, pad + 1)
    dist = np.hypot(d[:, None], d[None, :])
    n = int(math.ceil(max_radius / step)) + 1
    return [dist < k * step for k in range(n)], pad


def _poisson_once(radius: np.ndarray, order: np.ndarray, calib: np.ndarray) -> np.ndarray:
    """Random sequential Poisson-disc sampling on the grid.

    Visits grid points in the (fixed) random ``order``; a point is accepted unless it lies inside the
    exclusion disc of an earlier accepted point, whose radius is that point's ``radius`` (pixels).
    The calibration points are accepted first so the random points keep their distance from them.
    """
    h, w = radius.shape
    step = 0.125  # radius quantisation; fine enough that the density varies smoothly
    stencils, pad = _disc_stencils(float(radius.max()), step)
    size = 2 * pad + 1
    blocked = np.zeros((h + 2 * pad, w + 2 * pad), dtype=bool)  # padded so stamps never clip
    rq = np.rint(radius / step).astype(np.int64).ravel()
    out = np.zeros(h * w, dtype=bool)

    def accept(k: int) -> None:
        i, j = divmod(k, w)
        out[k] = True
        blocked[i:i + size, j:j + size] |= stencils[rq[k]]

    for k in np.flatnonzero(calib.ravel()).tolist():
        accept(k)
    inner = blocked[pad:pad + h, pad:pad + w]  # a view: sees every later stamp
    for k in order.tolist():
        if not inner.flat[k]:
            accept(k)
    return out.reshape(h, w)


def poisson_disc_2d(
    shape: Sequence[int], accel: float, calib: int | Sequence[int] = 24, seed: Seed = 0,
    density_slope: float = 2.0, tol: float = 0.02,
) -> Mask:
    """Variable-density Poisson-disc mask (H, W) with a fully-sampled calib x calib centre square.

    The exclusion radius grows linearly with the normalised k-space radius rho (rho = 1 at the edge
    midpoints): r(k) = r0 * (1 + density_slope * rho), so the density falls ~ 1/r^2 towards the
    periphery. r0 is found by bisection (same random visiting order every try, so the mask is a
    deterministic function of the seed) until the achieved rate is within ``tol`` of 1/accel.
    Own implementation (sigpy.mri.poisson needs numba JIT time and is not a declared dependency).
    """
    h, w = _shape(shape)
    accel = _check_accel(accel)
    ch, cw = (int(calib), int(calib)) if np.isscalar(calib) else (int(calib[0]), int(calib[1]))
    if ch < 0 or cw < 0 or ch > h or cw > w:
        raise MediffError(f"calib {calib!r} must be non-negative and fit in the mask shape {(h, w)}")
    target = h * w / accel
    if ch * cw > target:
        raise MediffError(f"calibration region {ch}x{cw} alone exceeds the sampling budget of accel {accel}")
    rng = _rng(seed)
    order = rng.permutation(h * w)
    ky = (np.arange(h) - h // 2) / (h / 2)
    kx = (np.arange(w) - w // 2) / (w / 2)
    rho = np.hypot(ky[:, None], kx[None, :])
    profile = 1.0 + float(density_slope) * rho
    calib_mask = np.zeros((h, w), dtype=bool)
    calib_mask[_centre_slice(h, ch), _centre_slice(w, cw)] = True

    # Bisection in log r0. The count decreases (almost monotonically) with r0; we keep the try closest
    # to the target in case the discrete count never lands inside the tolerance.
    lo, hi = math.log(0.05), math.log(float(max(h, w)))
    best, best_err, best_r0 = None, math.inf, 0.0
    for _ in range(30):
        r0 = math.exp(0.5 * (lo + hi))
        m = _poisson_once(r0 * profile, order, calib_mask)
        n = int(m.sum())
        err = abs(n - target) / target
        if err < best_err:
            best, best_err, best_r0 = m, err, r0
        if err <= tol:
            break
        if n > target:
            lo = math.log(r0)
        else:
            hi = math.log(r0)
    assert best is not None
    return _finish(best, "poisson2d", requested_accel=accel, calib=(ch, cw), r0=best_r0,
                   density_slope=float(density_slope), seed=_seed_repr(seed))


# ----------------------------------------------------------------------------- radial


def _spokes(h: int, w: int, angles: np.ndarray) -> np.ndarray:
    """Rasterise full-diameter spokes through DC at the given angles (radians) onto (H, W)."""
    radius = min(h, w) / 2.0
    t = np.arange(-radius, radius + 0.25, 0.25)  # quarter-pixel steps: no holes after rounding
    rows = np.rint(h // 2 + np.sin(angles)[:, None] * t[None, :]).astype(int).ravel()
    cols = np.rint(w // 2 + np.cos(angles)[:, None] * t[None, :]).astype(int).ravel()
    keep = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    mask = np.zeros((h, w), dtype=bool)
    mask[rows[keep], cols[keep]] = True
    return mask


def _spoke_angles(n_lines: int, golden: bool, offset: float) -> np.ndarray:
    n = np.arange(n_lines)
    step = GOLDEN_ANGLE if golden else math.pi / n_lines
    return np.mod(offset + n * step, math.pi)  # a spoke covers angle and angle + pi


def radial(shape: Sequence[int], n_lines: int, seed: Seed = 0, golden: bool = True) -> Mask:
    """``n_lines`` radial spokes (full diameters through DC) rasterised on the Cartesian grid, (H, W).

    Spoke n has angle offset + n * golden_angle (default; any prefix of the sequence covers the
    circle nearly uniformly) or offset + n * pi / n_lines (uniform), with a seed-drawn random offset.
    Spokes span the inscribed circle, so k-space corners stay unsampled.
    """
    h, w = _shape(shape)
    if int(n_lines) < 1:
        raise MediffError(f"n_lines must be >= 1, got {n_lines}")
    offset = float(_rng(seed).uniform(0.0, math.pi))
    mask = _spokes(h, w, _spoke_angles(int(n_lines), golden, offset))
    return _finish(mask, "radial", n_lines=int(n_lines), golden=bool(golden), offset=offset, seed=_seed_repr(seed))


def _radial_for_accel(shape: Sequence[int], accel: float, seed: Seed) -> Mask:
    """Golden-angle radial mask whose number of spokes gives the acceleration closest to ``accel``."""
    h, w = _shape(shape)
    accel = _check_accel(accel)
    offset = float(_rng(seed).uniform(0.0, math.pi))
    target = h * w / accel
    # Golden-angle sets are nested (n spokes are a prefix of n + 1), so the count is monotone in n
    # and a binary search finds the first n reaching the target.
    lo, hi = 1, 4 * max(h, w)
    count = lambda n: int(_spokes(h, w, _spoke_angles(n, True, offset)).sum())  # noqa: E731
    if count(hi) < target:
        raise MediffError(f"radial spokes cannot reach accel {accel} on a {h}x{w} grid (corners are never sampled)")
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    n = lo if lo == 1 or abs(count(lo) - target) <= abs(count(lo - 1) - target) else lo - 1
    mask = _spokes(h, w, _spoke_angles(n, True, offset))
    return _finish(mask, "radial", n_lines=n, golden=True, offset=offset, requested_accel=accel,
                   seed=_seed_repr(seed))


# ----------------------------------------------------------------------------- registry


MASK_KINDS: dict[str, Callable[..., Mask]] = {
    "random1d": lambda shape, accel, cf, seed: random_1d(shape, accel, cf, seed),
    "equispaced1d": lambda shape, accel, cf, seed: equispaced_1d(shape, accel, cf, seed),
    # calibration square side = round(min(H, W) * center_fraction)
    "poisson2d": lambda shape, accel, cf, seed: poisson_disc_2d(shape, accel, int(round(min(_shape(shape)) * cf)), seed),
    # radial sampling is dense at the centre by construction: center_fraction is ignored
    "radial": lambda shape, accel, cf, seed: _radial_for_accel(shape, accel, seed),
}


def make_mask(kind: str, shape: Sequence[int], accel: float, center_fraction: float = 0.08, seed: Seed = 0) -> Mask:
    """Build a mask by name (for the CLI): kind in ``MASK_KINDS``.

    Raises MediffError for an unknown kind, accel <= 1, center_fraction outside [0, 1) or a bad shape.
    """
    if kind not in MASK_KINDS:
        raise MediffError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    _shape(shape)
    accel, cf = _check_accel(accel), _check_fraction(center_fraction)
    return MASK_KINDS[kind](shape, accel, cf, seed)


def mask_tensor(mask: object) -> Tensor:
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
