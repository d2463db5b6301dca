"""A lean 2D UNet for diffusion priors sized for CPU training at 128 px.

Speed comes from three choices, measured in ``benchmarks/train_throughput.py``:
- the image is first folded 2x2 into channels (pixel-unshuffle, as FFDNet does for fast denoising),
  so the widest convolutions run at 64x64, not 128x128; the output is unfolded the same way;
- channel counts stay low at high resolution and grow only where the grid is small;
- self-attention only at the coarsest level (8x8 for 128 px input).

The network is the raw function F of EDM preconditioning (see ``mediff.denoiser``): it takes the
scaled input, a noise embedding value ``c_noise`` per item and an optional covariate vector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters; stored in every checkpoint's metadata."""

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128, 160)  # per level, after the 2x2 fold
    blocks: tuple[int, ...] = (1, 1, 1, 2)  # residual blocks per level on the way down
    attention_levels: tuple[int, ...] = (3,)
    fold: int = 2  # pixel-unshuffle factor at the input
    emb_dim: int = 128
    cond_dim: int = 0  # length of the covariate vector (0: unconditional)
    groups: int = 16
    pos_channels: int = 0  # 2: pixel coordinates as extra input channels (Patch Diffusion), else 0

    @property
    def multiple(self) -> int:
        """What image sides must be divisible by: the fold times one halving per level below the top."""
        return self.fold * 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def coordinate_grid(h: int, w: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(1, 2, h, w): row and column coordinates of pixel centres in [-1, 1] (the whole image)."""
    rows = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h * 2 - 1
    cols = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w * 2 - 1
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))[None]


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, c), c)


class ResBlock(nn.Module):
    """GN-SiLU-conv, FiLM from the embedding, GN-SiLU-conv, residual."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)


class Attention(nn.Module):
    """Multi-head self-attention over the spatial grid (used only at the coarsest level)."""

    def __init__(self, c: int, groups: int, head_dim: int = 32) -> None:
        super().__init__()
        self.heads = max(1, c // head_dim)
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class LeanUNet(nn.Module):
    """F(x, c_noise, cond) -> same shape as x. Input H and W must be divisible by fold * 2**(levels-1)."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = cfg = config
        ch, nlev = cfg.channels, len(cfg.channels)
        self.freqs = nn.Parameter(torch.randn(cfg.emb_dim // 2) * 4.0, requires_grad=False)  # fixed Fourier features
        self.emb = nn.Sequential(nn.Linear(cfg.emb_dim, cfg.emb_dim), nn.SiLU(), nn.Linear(cfg.emb_dim, cfg.emb_dim))
        self.cond = nn.Linear(cfg.cond_dim, cfg.emb_dim, bias=False) if cfg.cond_dim else None
        folded = cfg.in_channels * cfg.fold**2
        self.inp = nn.Conv2d(folded + cfg.pos_channels * cfg.fold**2, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c = [], ch[0]
        for lev in range(nlev):
            for _ in range(cfg.blocks[lev]):
                self.down.append(self._level_block(c, ch[lev], lev))
                c = ch[lev]
                skips.append(c)
            if lev < nlev - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([ResBlock(c, c, cfg.emb_dim, cfg.groups), Attention(c, cfg.groups),
                                  ResBlock(c, c, cfg.emb_dim, cfg.groups)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lev in reversed(range(nlev)):
            for _ in range(cfg.blocks[lev]):
                self.up.append(self._level_block(c + skips.pop(), ch[lev], lev))
                c = ch[lev]
            if lev > 0:
                self.upsample.append(nn.Conv2d(c, ch[lev - 1], 1))  # 1x1 after nearest upsampling: a 3x3 here costs as much as a block
                c = ch[lev - 1]
        self.out_norm = _norm(c, cfg.groups)
        self.out = nn.Conv2d(c, folded, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _level_block(self, cin: int, cout: int, lev: int) -> nn.ModuleList:
        mods = [ResBlock(cin, cout, self.config.emb_dim, self.config.groups)]
        if lev in self.config.attention_levels:
            mods.append(Attention(cout, self.config.groups))
        return nn.ModuleList(mods)

    def _embed(self, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        ang = c_noise[:, None].float() * self.freqs[None] * (2 * math.pi)
        e = torch.cat([ang.cos(), ang.sin()], dim=1)
        if self.cond is not None:
            # A zero covariate vector means "unconditional" (classifier-free guidance null token).
            e = e + self.cond(cond if cond is not None else e.new_zeros(e.shape[0], self.config.cond_dim))
        return self.emb(e)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """``pos`` (B or 1, 2, H, W): coordinates of x's pixels in the whole image (a training patch's
        crop of ``coordinate_grid``); None = x is the whole image. Ignored without ``pos_channels``."""
        cfg, nlev = self.config, len(self.config.channels)
        emb = self._embed(c_noise, cond)
        if cfg.pos_channels:
            if pos is None:
                pos = coordinate_grid(x.shape[-2], x.shape[-1], x.device, x.dtype)
            x = torch.cat([x, pos.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        h = self.inp(F.pixel_unshuffle(x, cfg.fold))
        skips, i = [], 0
        for lev in range(nlev):
            for _ in range(cfg.blocks[lev]):
                h = self._run(self.down[i], h, emb)
                skips.append(h)
                i += 1
            if lev < nlev - 1:
                h = self.downsample[lev](h)
        for m in self.mid:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        i = 0
        for k, lev in enumerate(reversed(range(nlev))):
            for _ in range(cfg.blocks[lev]):
                h = self._run(self.up[i], torch.cat([h, skips.pop()], dim=1), emb)
                i += 1
            if lev > 0:
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), cfg.fold)

    @staticmethod
    def _run(block: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        h = block[0](h, emb)
        for m in block[1:]:
            h = m(h)
        return h
