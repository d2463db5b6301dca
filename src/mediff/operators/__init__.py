"""Forward models: the LinearOperator base and its MRI and CT implementations."""

from mediff.operators.base import (
    Adjoint,
    CenterCrop,
    Composed,
    Identity,
    LinearOperator,
    Matrix,
    PhaseModulated,
    Weighted,
    adjoint_check,
    conjugate_gradient,
    inner,
)

__all__ = [
    "Adjoint",
    "CenterCrop",
    "Composed",
    "Identity",
    "LinearOperator",
    "Matrix",
    "PhaseModulated",
    "Weighted",
    "adjoint_check",
    "conjugate_gradient",
    "inner",
]
