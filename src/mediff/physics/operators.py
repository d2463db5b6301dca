"""Linear operators y = A x for imaging inverse problems.

An operator is immutable: everything that defines it (masks, coil maps, angles) is fixed at
construction. ``A`` maps an image batch to measurements, ``AH`` is the exact adjoint (conjugate
transpose) with respect to the real inner product Re<u, v> summed over all elements except the batch
dimension. Complex data use native complex dtypes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def inner(u: Tensor, v: Tensor) -> Tensor:
    """Per-item inner product <u, v> = sum conj(u) v over all non-batch dims. Shape (B,)."""
    return (u.conj() * v).flatten(1).sum(1) if u.is_complex() or v.is_complex() else (u * v).flatten(1).sum(1)


class LinearOperator:
    """Base class: subclasses implement ``A`` and ``AH``; ``normal`` may be overridden for speed."""

    def __setattr__(self, name: str, value: object) -> None:
        # Operators are immutable once built; subclasses set fields in __init__ via object.__setattr__
        # (see ``_set``) so that a mask or coil map cannot be swapped under a running solver.
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **fields: object) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def A(self, x: Tensor) -> Tensor:  # noqa: N802 - A is the conventional name
        raise NotImplementedError

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        raise NotImplementedError

    def normal(self, x: Tensor) -> Tensor:
        """A^H A x."""
        return self.AH(self.A(x))

    def __call__(self, x: Tensor) -> Tensor:
        return self.A(x)

    def __matmul__(self, other: "LinearOperator") -> "LinearOperator":
        return Composed(self, other)

    @property
    def H(self) -> "LinearOperator":  # noqa: N802
        return Adjoint(self)


class Composed(LinearOperator):
    """(outer @ inner)(x) = outer(inner(x))."""

    def __init__(self, outer: LinearOperator, inner_op: LinearOperator) -> None:
        self._set(outer=outer, inner_op=inner_op)

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        return self.outer.A(self.inner_op.A(x))

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        return self.inner_op.AH(self.outer.AH(y))

    def normal(self, x: Tensor) -> Tensor:
        # inner^H (outer^H outer) inner: keeps the outer operator's fast normal.
        return self.inner_op.AH(self.outer.normal(self.inner_op.A(x)))


class Adjoint(LinearOperator):
    """The adjoint operator A^H as an operator in its own right."""

    def __init__(self, op: LinearOperator) -> None:
        self._set(op=op)

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        return self.op.AH(x)

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        return self.op.A(y)


class Identity(LinearOperator):
    """Identity (denoising as an inverse problem)."""

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        return x

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        return y


class Matrix(LinearOperator):
    """Dense matrix acting on flattened items: x (B, n) -> y (B, m). For tests and toy problems."""

    def __init__(self, matrix: Tensor) -> None:
        self._set(matrix=matrix.clone())

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        dt = torch.promote_types(x.dtype, self.matrix.dtype)
        return x.to(dt) @ self.matrix.to(dt).T

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        dt = torch.promote_types(y.dtype, self.matrix.dtype)
        return y.to(dt) @ self.matrix.to(dt).conj()


class PhaseModulated(LinearOperator):
    """x real (B, 1, H, W) -> op(phase * x): a magnitude image meets complex data through a fixed phase.

    The adjoint for the real inner product is Re(conj(phase) op^H(y)). ``phase`` is unit-modulus,
    broadcastable to x (e.g. the low-resolution phase from the k-space centre).
    """

    def __init__(self, op: LinearOperator, phase: Tensor) -> None:
        self._set(op=op, phase=phase.clone())

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        return self.op.A(self.phase.to(x.device) * x)

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        return (self.phase.to(y.device).conj() * self.op.AH(y)).real

    def normal(self, x: Tensor) -> Tensor:
        p = self.phase.to(x.device)
        return (p.conj() * self.op.normal(p * x)).real


class Weighted(LinearOperator):
    """W op with W = diag(weights), real and fixed: y -> weights * op(x). Whitens heteroscedastic data
    (penalised weighted least squares): with weights = s / std per entry the noise of weights * y has
    std s everywhere, so every solver's homoscedastic likelihood is the weighted one."""

    def __init__(self, op: LinearOperator, weights: Tensor) -> None:
        if weights.is_complex():
            raise ValueError("Weighted takes real weights")
        self._set(op=op, weights=weights.clone())

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        y = self.op.A(x)
        return self.weights.to(device=y.device, dtype=y.real.dtype) * y

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        return self.op.AH(self.weights.to(device=y.device, dtype=y.real.dtype) * y)


class Stacked(LinearOperator):
    """Block diagonal over the batch: items [i r, (i + 1) r) go through ``ops[i]`` (r = ``repeats``).

    Lets one solver run treat several problems at once (the slices of a volume, each with its own
    phase, coil maps or weights, ``repeats`` posterior samples each), so the network sees them as one
    batch; the operators themselves still run one problem at a time. All ops must map to data of one
    shape. x (len(ops) r, ...) -> y (len(ops) r, ...)."""

    def __init__(self, ops: list[LinearOperator], repeats: int = 1) -> None:
        if not ops or repeats < 1:
            raise ValueError("Stacked needs at least one operator and repeats >= 1")
        self._set(ops=tuple(ops), repeats=int(repeats))

    def _each(self, apply: Callable[[LinearOperator, Tensor], Tensor], x: Tensor) -> Tensor:
        r = self.repeats
        if x.shape[0] != r * len(self.ops):
            raise ValueError(f"Stacked of {len(self.ops)} x {r} items got a batch of {x.shape[0]}")
        return torch.cat([apply(op, x[i * r: (i + 1) * r]) for i, op in enumerate(self.ops)])

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        return self._each(lambda op, v: op.A(v), x)

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        return self._each(lambda op, v: op.AH(v), y)

    def normal(self, x: Tensor) -> Tensor:
        return self._each(lambda op, v: op.normal(v), x)


class CenterCrop(LinearOperator):
    """(…, H, W) -> centred (…, h, w) crop; its adjoint zero-pads. Lets a prior run on a grid of
    network-friendly size while the data live on the scanner's grid: A' = A @ CenterCrop."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        if out_hw[0] > in_hw[0] or out_hw[1] > in_hw[1]:
            raise ValueError(f"crop {out_hw} larger than input {in_hw}")
        top, left = (in_hw[0] - out_hw[0]) // 2, (in_hw[1] - out_hw[1]) // 2
        self._set(in_hw=tuple(in_hw), out_hw=tuple(out_hw), top=top, left=left)

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        return x[..., self.top: self.top + self.out_hw[0], self.left: self.left + self.out_hw[1]]

    def AH(self, y: Tensor) -> Tensor:  # noqa: N802
        h, w = self.in_hw
        pad = (self.left, w - self.out_hw[1] - self.left, self.top, h - self.out_hw[0] - self.top)
        return torch.nn.functional.pad(y, pad)


def adjoint_check(op: LinearOperator, x: Tensor, generator: torch.Generator | None = None) -> float:
    """Relative adjointness error |<Ax, y> - <x, A^H y>| / (||Ax|| ||y||) for random y.

    ``x`` fixes the input shape and dtype (use complex128 for tests). Returns the worst item's error.
    For a real domain with complex range (an R-linear map) the adjoint is taken for the real inner
    product Re<u, v>, so the real parts are compared.
    """
    ax = op.A(x)
    y = torch.randn(ax.shape, dtype=ax.dtype, device=ax.device, generator=generator)
    lhs = inner(ax, y)
    rhs = inner(x, op.AH(y))
    if not x.is_complex():
        lhs, rhs = lhs.real, rhs.real
    scale = ax.flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    return float(((lhs - rhs).abs() / scale.clamp_min(torch.finfo(scale.dtype).tiny)).max())


def conjugate_gradient(
    normal: Callable[[Tensor], Tensor], rhs: Tensor, x0: Tensor, iters: int, tol: float = 0.0,
    precondition: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Solve normal(x) = rhs for a Hermitian positive (semi-)definite ``normal``, batched per item.

    Runs at most ``iters`` iterations from ``x0``. An item stops updating once its residual is below
    max(tol, 10 eps) * ||rhs|| (eps of the dtype): past that point round-off, not information, would
    set the step. ``precondition``: M^-1, a Hermitian positive definite approximation of normal's
    inverse (preconditioned CG; None: plain CG). Shared by DDS/DDNM data consistency and the
    compressed-sensing baselines.
    """
    x = x0
    r = rhs - normal(x)
    z = r if precondition is None else precondition(r)
    p = z
    rz = inner(r, z).real
    rr = rz if precondition is None else inner(r, r).real
    eps = torch.finfo(rz.dtype).eps
    stop = (max(tol, 10 * eps) ** 2) * inner(rhs, rhs).real
    shape = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(iters):
        active = rr > stop
        if not bool(active.any()):
            break
        ap = normal(p)
        denom = inner(p, ap).real
        ok = active & (denom > 0)
        # An item that stopped (or met non-positive curvature) takes alpha = beta = 0 and rz = 0: frozen.
        # Fused multiply-adds and scalar wheres: the loop runs inside every solver step, where each
        # elementwise op on a 128-px image costs about as much as its arithmetic.
        alpha = (torch.where(ok, rz, 0) / torch.where(ok, denom, 1)).view(shape).to(x.dtype)
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, ap, value=-1)
        z = r if precondition is None else precondition(r)
        rz_new = torch.where(ok, inner(r, z).real, 0)
        rr = rz_new if precondition is None else torch.where(ok, inner(r, r).real, 0)
        p = torch.addcmul(z, (rz_new / torch.where(ok, rz, 1)).view(shape).to(z.dtype), p)
        rz = rz_new
    return x
