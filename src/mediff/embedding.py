"""A self-supervised image embedding, trained here, for the memorization audit and the synthesis metrics.

No ImageNet or Inception weights can be downloaded at run time, and natural-image features are a poor
description of a brain slice or a CT slice anyway. So mediff learns its own feature space from the
real images at hand: a small CNN trained with the NT-Xent (SimCLR) loss, Chen et al. 2020, arXiv
2002.05709, with the augmentations of Dar et al. (arXiv 2402.01054): random affine rotations of
+-5 degrees and flips, each with probability 0.5. Two augmented views of one image must map close
together and away from every other image of the batch, so the embedding tells images apart by their
content, whatever their small rotation, flip or intensity scale. A synthetic image that is a copy of
a training image therefore lands next to it.

Each image is standardised on its own (zero mean, unit std) and area-resized to ``EmbeddingConfig.size``
before the network: the embedding ignores global intensity offsets and scales, which are not what
makes an image a copy of a patient.

Shapes: images (N, 1, H, W) float in any units; embeddings (N, dim) float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mediff.checkpoint import load_checkpoint, save_checkpoint, to_dtype
from mediff.data import fit_to_size
from mediff.errors import MediffError

KIND = "mediff-embedding"


@dataclass(frozen=True)
class EmbeddingConfig:
    """size: network input side (px); dim: embedding length; width: channels of the first layer;
    steps, batch, lr: NT-Xent training (steps, not epochs, so a set of 60 images trains as long as one
    of 9000; batches walk through random permutations of the images); temperature: of the softmax;
    rotate_deg / p: augmentations."""

    size: int = 64
    dim: int = 128
    width: int = 16
    steps: int = 500
    batch: int = 256
    lr: float = 1e-3
    temperature: float = 0.1
    rotate_deg: float = 5.0
    p: float = 0.5


class Encoder(nn.Module):
    """(N, 1, size, size) standardised images -> (N, dim) embeddings: four stride-2 conv blocks, global
    average pooling, and a two-layer projection head (the NT-Xent target, used as the embedding)."""

    def __init__(self, cfg: EmbeddingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        chans = [1, w, 2 * w, 4 * w, 8 * w]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(8 * w, 8 * w), nn.SiLU(), nn.Linear(8 * w, cfg.dim))

    def pooled(self, x: Tensor) -> Tensor:
        """The backbone's globally pooled features (N, 8 * width), before the projection head."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pooled(x))


def prepare(images: Tensor, size: int) -> Tensor:
    """(N, 1, H, W) -> (N, 1, size, size): area-resized (longer side to ``size``, zero-padded square),
    then standardised per image (an all-constant image becomes all zeros)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise MediffError(f"embedding expects images (N, 1, H, W), got shape {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        f = size / max(h, w)  # up or down, unlike fit_to_size, which then only pads
        x = fit_to_size(F.interpolate(x, size=(max(1, round(h * f)), max(1, round(w * f))), mode="area"), size)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / std.clamp_min(1e-6)


def transform(x: Tensor, angle: Tensor, flip_lr: Tensor, flip_ud: Tensor | None = None) -> Tensor:
    """Images (N, 1, H, W) rotated by ``angle`` (N,) radians about their centre, after left-right
    ``flip_lr`` (N,) and up-down ``flip_ud`` (N,) bool flips (bilinear, zeros outside)."""
    n = x.shape[0]
    sx = torch.where(flip_lr, -1.0, 1.0)
    sy = torch.ones(n) if flip_ud is None else torch.where(flip_ud, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, torch.zeros(n)], 1),
                         torch.stack([sin * sx, cos * sy, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def augment(x: Tensor, cfg: EmbeddingConfig, gen: torch.Generator) -> Tensor:
    """Random rotation in [-rotate_deg, rotate_deg] and horizontal / vertical flips, each applied with
    probability ``cfg.p`` per image (Dar et al.'s augmentations), on prepared images (N, 1, S, S)."""
    draw = torch.rand((x.shape[0], 3), generator=gen) < cfg.p
    angle = (torch.rand(x.shape[0], generator=gen) * 2 - 1) * math.radians(cfg.rotate_deg) * draw[:, 0]
    return transform(x, angle, draw[:, 1], draw[:, 2])


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """The NT-Xent loss of paired embeddings (B, D): each view's positive is its pair, its negatives
    the other 2B - 2 views of the batch (Chen et al. 2020, eq. 1)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    b = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def train_embedding(images: Tensor, cfg: EmbeddingConfig = EmbeddingConfig(), seed: int = 0,
                    progress: Callable[[int, int, float], None] | None = None) -> Encoder:
    """Train an :class:`Encoder` on ``images`` (N, 1, H, W) with NT-Xent; ``progress(step, total, loss)``
    after every step. Deterministic for a seed (its own generators; the global RNG is not touched)."""
    if images.shape[0] < 4:
        raise MediffError(f"training an embedding needs at least 4 images, got {images.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    x = prepare(images, cfg.size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter initialisation only, inside a forked RNG state
        enc = Encoder(cfg)
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=1e-4)
    batch = min(cfg.batch, x.shape[0])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    enc.train()
    order, pos = torch.randperm(x.shape[0], generator=gen), 0
    for step in range(1, cfg.steps + 1):
        if pos + batch > x.shape[0]:
            order, pos = torch.randperm(x.shape[0], generator=gen), 0
        xb = x[order[pos:pos + batch]]
        pos += batch
        loss = nt_xent(enc(augment(xb, cfg, gen)), enc(augment(xb, cfg, gen)), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, cfg.steps, float(loss.detach()))
    return enc.eval().requires_grad_(False)


@torch.no_grad()
def embed(encoder: Encoder, images: Tensor, batch: int = 512, head: bool = True) -> Tensor:
    """Embeddings (N, dim) of images (N, 1, H, W); with ``head=False`` the pooled backbone features
    (N, 8 * width) instead (``Encoder.pooled``)."""
    encoder.eval()
    net = encoder if head else encoder.pooled
    out = [net(prepare(images[i:i + batch], encoder.cfg.size)) for i in range(0, images.shape[0], batch)]
    return torch.cat(out).float() if out else torch.zeros(0, encoder.cfg.dim if head else 8 * encoder.cfg.width)


#: The views of a query image :func:`embed_views` embeds, (rotation in degrees, left-right flip): the
#: image itself first, then the changes a leaked copy may carry that the embedding is least blind to.
VIEWS = ((0.0, False), (-5.0, False), (5.0, False), (0.0, True), (-5.0, True), (5.0, True))


@torch.no_grad()
def embed_views(encoder: Encoder, images: Tensor, views: tuple[tuple[float, bool], ...] = VIEWS) -> Tensor:
    """Embeddings (V, N, dim) of each image (N, 1, H, W) under each of ``views`` (rotation degrees,
    left-right flip); view 0 should be the image itself (``VIEWS``)."""
    n = images.shape[0]
    out = [embed(encoder, images if (deg, flip) == (0.0, False) else
                 transform(images.float(), torch.full((n,), math.radians(deg)), torch.full((n,), flip)))
           for deg, flip in views]
    return torch.stack(out)


def save_embedding(path: Path, encoder: Encoder, info: dict | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Write the encoder's weights (safetensors, in ``dtype``: fp16 to ship) with its config and ``info``
    (what it was trained on); loading casts back to fp32."""
    save_checkpoint(Path(path), to_dtype(encoder.state_dict(), dtype), {"kind": KIND, "config": asdict(encoder.cfg),
                                                                         "info": info or {}})


def shipped_embedding(prior: str) -> Path | None:
    """The embedding shipped for built-in prior ``prior`` (trained on its training subjects), if any."""
    from importlib import resources

    path = Path(str(resources.files("mediff") / "weights" / "embeddings" / f"{prior}.safetensors"))
    return path if path.is_file() else None


def load_embedding(path: Path) -> tuple[Encoder, dict]:
    """An encoder written by :func:`save_embedding`, and its ``info``; MediffError for other files."""
    tensors, meta = load_checkpoint(Path(path))
    if meta.get("kind") != KIND:
        raise MediffError(f"{path} is not a mediff embedding (kind {meta.get('kind')!r})")
    try:
        enc = Encoder(EmbeddingConfig(**meta["config"]))
        enc.load_state_dict(tensors)
    except (TypeError, KeyError, RuntimeError) as exc:
        raise MediffError(f"{path}: embedding weights do not match their config ({exc})") from exc
    return enc.eval().requires_grad_(False), meta.get("info", {})
