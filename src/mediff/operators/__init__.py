"""Forward models: the LinearOperator base and its MRI and CT implementations."""

from mediff.operators.base import (
    Adjoint,
    Composed,
    Identity,
    LinearOperator,
    Matrix,
    adjoint_check,
    conjugate_gradient,
    inner,
)

__all__ = [
    "Adjoint",
    "Composed",
    "Identity",
    "LinearOperator",
    "Matrix",
    "adjoint_check",
    "conjugate_gradient",
    "inner",
]
