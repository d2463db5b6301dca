"""Centred orthonormal 2D DFT and coil combination, the transforms every MRI module shares.

Images are complex tensors (B, 1, H, W) (real input is promoted: float64 -> complex128, anything else
-> complex64); k-space is centred (DC at (H // 2, W // 2)). The DFT is orthonormal, so ||F x|| = ||x||.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIMS = (-2, -1)


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2D DFT over the last two dims: fftshift(fft2(ifftshift(x), norm="ortho"))."""
    x = as_complex(x)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=DIMS), dim=DIMS, norm="ortho"), dim=DIMS)


def ifft2c(y: Tensor) -> Tensor:
    """Inverse of :func:`fft2c` (also its adjoint, the transform being unitary)."""
    y = as_complex(y)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(y, dim=DIMS), dim=DIMS, norm="ortho"), dim=DIMS)



def as_complex(x: Tensor) -> Tensor:
    """Promote real tensors to complex (float64 -> complex128, other real -> complex64)."""
    if x.is_complex():
        return x
    return x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)


def rss(coil_images: Tensor, dim: int = 1) -> Tensor:
    """Root-sum-of-squares sqrt(sum_c |x_c|^2) over ``dim`` (kept): (B, C, H, W) -> (B, 1, H, W), real."""
    return coil_images.abs().square().sum(dim=dim, keepdim=True).sqrt()
