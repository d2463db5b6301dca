"""mediff: diffusion models as the engine of medical imaging."""

__version__ = "0.1.0"
