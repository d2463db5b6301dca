"""Denoisers: the one interface every sampler and solver uses.

A denoiser is any callable ``D(x, sigma) -> x0_hat`` with ``x`` of shape (B, ...) and ``sigma`` of
shape (B,) (noise standard deviation per item, in the data's units). It returns the estimate of the
clean image E[x0 | x]. The score follows as ``(D(x, sigma) - x) / sigma**2`` (Tweedie). Networks are
wrapped by a preconditioner (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", EDM, Table 1) or, for eps-prediction networks trained on a discrete VP schedule,
by :class:`EpsAdapter`.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mediff.nets import coordinate_grid


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma) -> x0_hat``; x (B, ...), sigma (B,)."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class EDMPrecond(nn.Module):
    """EDM preconditioning of a raw network ``F(c_in x, c_noise, cond)``.

    D(x, s) = mean + c_skip (x - mean) + c_out F(c_in (x - mean), ln(s)/4), with
    c_skip = sd^2/(s^2+sd^2), c_out = s sd / sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2).
    ``sigma_data`` (sd) and ``data_mean`` are measured on the training data; subtracting the mean keeps
    the EDM derivation (which assumes zero-mean data) valid for non-negative MR intensities.
    ``cond`` is a covariate vector (B, K); zeros mean "unconditional". ``pos`` (Patch Diffusion) is
    the crop's coordinate channels and is not scaled: positions are not noisy data.

    ``tile`` (a position-aware net trained on crops only, never on whole images): images larger than
    ``tile`` are denoised tile by tile, each tile with its coordinates in the whole image, so the
    network sees inputs of the sizes and statistics it was trained on (its GroupNorm statistics and
    attention span differ on a whole 512-px slice). ``tile_multiple``: the net's size divisor.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, data_mean: float = 0.0, tile: int | None = None,
                 tile_multiple: int = 16) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.data_mean = float(data_mean)
        self.tile, self.tile_multiple = tile, int(tile_multiple)

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """``pos``: pixel coordinates of a training patch, passed to a position-aware net (else omitted)."""
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        if pos is None and self.tile is not None and max(x.shape[-2:]) > self.tile:
            return self._tiled(x, sigma, cond)
        s, sd = _bcast(sigma, x), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        xc = x - self.data_mean
        f = self.net(c_in * xc, sigma.log() / 4, cond) if pos is None else self.net(c_in * xc, sigma.log() / 4, cond, pos)
        return self.data_mean + c_skip * xc + c_out * f.to(x.dtype)

    def _tiled(self, x: Tensor, sigma: Tensor, cond: Tensor | None, chunk: int = 16) -> Tensor:
        """D on x (B, C, H, W) as a mosaic of tiles of at most ``tile`` pixels a side. The tile grid
        is shifted by an offset that is a function of sigma (``tile_edges``), so from one noise level
        to the next the seams move and no pixel stays on a seam: D remains a pure function of (x, sigma).
        Tiles of one shape run as batches of at most ``chunk``."""
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        s0 = float(sigma[0])
        rows = tile_edges(h, self.tile, self.tile_multiple, s0, 0)
        cols = tile_edges(w, self.tile, self.tile_multiple, s0, 1)
        grid = coordinate_grid(h, w, x.device, x.dtype)
        boxes = [(r0, r1, c0, c1) for r0, r1 in zip(rows, rows[1:]) for c0, c1 in zip(cols, cols[1:])]
        done: dict[tuple[int, int, int, int], Tensor] = {}
        by_shape: dict[tuple[int, int], list] = {}
        for box in boxes:
            by_shape.setdefault((box[1] - box[0], box[3] - box[2]), []).append(box)
        for group in by_shape.values():
            for k in range(0, len(group), max(1, chunk // b)):
                part = group[k: k + max(1, chunk // b)]
                xs = torch.cat([x[..., r0:r1, c0:c1] for r0, r1, c0, c1 in part])
                ps = torch.cat([grid[..., r0:r1, c0:c1].expand(b, -1, -1, -1) for r0, r1, c0, c1 in part])
                den = self.forward(xs, sigma.repeat(len(part)), None if cond is None else cond.repeat(len(part), 1), ps)
                done.update(zip(part, den.split(b)))
        return torch.cat([torch.cat([done[(r0, r1, c0, c1)] for c0, c1 in zip(cols, cols[1:])], dim=-1)
                          for r0, r1 in zip(rows, rows[1:])], dim=-2)


def tile_edges(n: int, tile: int, multiple: int, sigma: float, axis: int) -> list[int]:
    """Edges 0 = e_0 < ... < e_k = n of the tiles along one axis of length n: tiles of ``tile``
    pixels from an offset o, a multiple of ``multiple`` in [tile / 4, 3 tile / 4] (so the edge tiles
    keep at least a quarter tile), picked by hashing log(sigma) (golden-ratio steps, another per axis)."""
    if n <= tile:
        return [0, n]
    choices = list(range(-(-(tile // 4) // multiple) * multiple, 3 * tile // 4 + 1, multiple)) or [0]
    frac = (math.log(max(sigma, 1e-30)) * 1000.0 * (0.6180339887 + axis * 0.1415926536)) % 1.0
    o = choices[int(frac * len(choices)) % len(choices)]
    return sorted({0, n, *range(o, n, tile)})


class TwoScale(nn.Module):
    """A fine denoiser whose coarse content comes from a whole-image denoiser on a grid ``factor``
    times coarser: D(x, s) = D_f(x, s) + up(D_c(down x, s / factor) - down D_f(x, s)) for s >= from_sigma,
    D_f(x, s) below it.

    Why: a prior trained on crops of a large image never sees the whole of it, so at high noise, where
    the clean image's layout is what is unknown, it guesses the layout tile by tile. A prior of the whole
    image on a coarser grid knows the layout. ``down`` averages factor x factor blocks, which turns white
    noise of std s into white noise of std s / factor, so D_c(down x, s / factor) is that prior's
    estimate of the block means of the clean image; the fine denoiser keeps what lies within the blocks
    (``up``: bilinear, so the correction is as smooth as the coarse grid). At low noise the fine
    denoiser's own block means are the better ones, hence ``from_sigma`` (chosen by measurement:
    ``benchmarks/two_scale.py`` per noise level, then by reconstruction). If D_c's block means agree
    with D_f's, D is D_f.
    x (B, C, H, W) with H and W multiples of ``factor``; sigma (B,); ``cond`` goes to both.
    """

    def __init__(self, fine: nn.Module, coarse: nn.Module, factor: int, from_sigma: float) -> None:
        super().__init__()
        self.fine, self.coarse, self.factor, self.from_sigma = fine, coarse, int(factor), float(from_sigma)

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        fine = self.fine(x, sigma, cond)
        use = sigma >= self.from_sigma
        if not bool(use.any()):
            return fine
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"a two-scale denoiser needs image sides that are multiples of {self.factor}, "
                             f"got {tuple(x.shape[-2:])}")
        delta = self.coarse(self.down(x), sigma / self.factor, cond) - self.down(fine)
        return fine + _bcast(use, x) * self.up(delta)

    def down(self, x: Tensor) -> Tensor:
        """Means of factor x factor blocks: (B, C, H, W) -> (B, C, H / factor, W / factor)."""
        return F.avg_pool2d(x, self.factor)

    def up(self, z: Tensor) -> Tensor:
        """Bilinear upsampling by ``factor``, the inverse direction of ``down``."""
        return F.interpolate(z, scale_factor=self.factor, mode="bilinear", align_corners=False)


class EpsAdapter(nn.Module):
    """Turn an eps-prediction network trained on a discrete VP schedule into a denoiser.

    The VP state x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps equals sqrt(a_t) (x0 + sigma eps) with
    sigma = sqrt((1 - a_t)/a_t). So D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)),
    with t(sigma) interpolated (in log sigma) between the discrete steps. Works for MONAI's
    ``DiffusionModelUNet`` (``net(x, timesteps)``).
    """

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.net = net
        sig = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().double()
        self.register_buffer("log_sigmas", sig.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def timestep(self, sigma: Tensor) -> Tensor:
        """Continuous timestep index for each sigma (clamped to the trained range)."""
        ls = sigma.double().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, ls).clamp(1, len(self.log_sigmas) - 1)
        lo = hi - 1
        w = (ls - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return lo.double() + w

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        s = _bcast(sigma, x)
        t = self.timestep(sigma).to(x.dtype)
        eps = self.net(x / (1 + s**2).sqrt(), t) if cond is None else self.net(x / (1 + s**2).sqrt(), t, cond)
        return x - s * eps.to(x.dtype)


def linear_beta_alphas_cumprod(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020) as cumulative alpha products, shape (n,)."""
    betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


class GaussianDenoiser:
    """Exact denoiser of the prior N(mu, s^2 I): D = (s^2 x + sigma^2 mu) / (s^2 + sigma^2).

    The oracle for testing samplers and posterior solvers; ``mu`` broadcasts against x (B, ...).
    """

    def __init__(self, mu: Tensor | float, std: float) -> None:
        self.mu = mu
        self.var = float(std) ** 2

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s2 = _bcast(sigma, x) ** 2
        return (self.var * x + s2 * self.mu) / (self.var + s2)


def extrapolate(weak: Tensor, strong: Tensor, weight: float) -> Tensor:
    """``weak + w (strong - weak)``: the guidance step that CFG and autoguidance share."""
    return weak + weight * (strong - weak)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D_w = D(x|0) + w (D(x|c) - D(x|0)).

    ``model(x, sigma, cond)`` is a conditional denoiser whose zero covariate vector is the null
    condition; ``cond`` (B, K) is fixed at construction. w = 1 is plain conditional sampling.
    """

    def __init__(self, model: nn.Module, cond: Tensor, guidance: float = 1.0) -> None:
        self.model, self.cond, self.guidance = model, cond, float(guidance)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.guidance == 1.0:
            return self.model(x, sigma, self.cond)
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([torch.zeros_like(self.cond), self.cond]))
        uncond, cond = both.chunk(2)
        return extrapolate(uncond, cond, self.guidance)


class AutoGuidedDenoiser:
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself",
    arXiv 2406.02507): D_w = D_bad + w (D_good - D_bad).

    ``bad`` is a weaker model of the same data and conditioning (smaller or trained for less). Where
    both err alike the difference cancels; where the weak one errs more (blurry, off-manifold mass) it
    points away from the error, so w > 1 sharpens samples without narrowing them to a condition as
    CFG does. For Gaussian priors N(mu, s^2) and N(mu, b^2) the probability-flow ODE ends at std
    ~ s^w b^(1-w). w = 1 is ``good`` alone (``bad`` is not called).
    """

    def __init__(self, good: Denoiser, bad: Denoiser, weight: float) -> None:
        self.good, self.bad, self.weight = good, bad, float(weight)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.weight == 1.0:
            return self.good(x, sigma)
        return extrapolate(self.bad(x, sigma), self.good(x, sigma), self.weight)


def edm_sigma_range(sigma_data: float) -> tuple[float, float]:
    """Default (sigma_min, sigma_max) for data of std ``sigma_data``: EDM's 0.002..80 for sd = 0.5, scaled."""
    return 0.002 * sigma_data / 0.5, 80.0 * sigma_data / 0.5


__all__ = ["Denoiser", "EDMPrecond", "tile_edges", "TwoScale", "EpsAdapter", "GaussianDenoiser", "CFGDenoiser", "AutoGuidedDenoiser",
           "extrapolate", "linear_beta_alphas_cumprod", "edm_sigma_range"]
