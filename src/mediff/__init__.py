"""mediff: diffusion models as the engine of medical imaging."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: ``import mediff`` (and ``mediff --version``) stays light; torch loads on first use.
    if name == "load_prior":
        from mediff.prior import load_prior

        return load_prior
    raise AttributeError(f"module 'mediff' has no attribute {name!r}")


__all__ = ["__version__", "load_prior"]
