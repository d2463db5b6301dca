"""Synthesis metrics: how close a set of synthetic images is to real ones, and how diverse it is.

All feature-space metrics work on embeddings (N, D) from a feature space trained here on real
medical images (:mod:`mediff.embedding`), not Inception: no ImageNet weights can be downloaded at
run time, and natural-image features describe a brain or CT slice poorly. Numbers are therefore
comparable only between runs that share one embedding file, never with published FIDs.

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets
  (Heusel et al. 2017, arXiv 1706.08500), computed by MONAI's ``FIDMetric``; in squared feature
  units; 0 for identical distributions. For N(m1, S) vs N(m2, S) it is |m1 - m2|^2.
- :func:`frechet_distance_inf`: the same distance extrapolated to an infinite synthetic set (Chong &
  Forsyth 2020), free of the 1 / n bias that keeps FD of a few hundred real images above 0.
- :func:`prdc`: precision, recall (Kynkäänniemi et al. 2019, arXiv 1904.06991), density and coverage
  (Naeem et al. 2020, arXiv 2002.09797) with k-nearest-neighbour balls: precision is the share of
  synthetic images inside some real image's ball (fidelity), recall the share of real images inside
  some synthetic image's ball (diversity); density counts the balls around each synthetic image
  (1 on average for matching distributions) and coverage is the share of real balls holding at
  least one synthetic image. The same definitions as the ``prdc`` package, written in torch so that
  scikit-learn is not needed.
- :func:`ms_ssim_diversity`: the mean MS-SSIM over random pairs within one set (Pinaya et al. 2022,
  arXiv 2209.07162): higher means the images look more alike. A generator should match the real
  data's own value (Pinaya et al.: real 0.6536, their LDM 0.6555), not minimise it: noise has an
  MS-SSIM near 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mediff.errors import MediffError

#: MS-SSIM's scale weights (Wang et al. 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: Gaussian window of MS-SSIM (side in px, std in px). 7 instead of Wang's 11, so that all five
#: scales fit a 128 px image: the coarsest is 8 px, and MONAI needs the window smaller than that.
MS_SSIM_KERNEL, MS_SSIM_SIGMA = 7, 1.5


def _features(x: Tensor, name: str, min_rows: int = 2) -> Tensor:
    if x.dim() != 2:
        raise MediffError(f"{name}: features must be (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise MediffError(f"{name}: needs at least {min_rows} images, got {x.shape[0]}")
    return x.double()


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``feats_a`` (Na, D) and ``feats_b`` (Nb, D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in squared feature units. Unbiased
    covariances (N - 1), so the value has a small positive bias that shrinks as 1 / N: compare sets
    of the same sizes."""
    from monai.metrics import FIDMetric

    a, b = _features(feats_a, "Fréchet distance"), _features(feats_b, "Fréchet distance")
    if a.shape[1] != b.shape[1]:
        raise MediffError(f"Fréchet distance: feature lengths differ ({a.shape[1]} vs {b.shape[1]})")
    return max(float(FIDMetric()(a, b)), 0.0)  # sqrtm's round-off can make a zero distance -1e-12


def frechet_distance_inf(reference: Tensor, feats: Tensor, generator: torch.Generator,
                         fractions: tuple[float, ...] = (0.5, 0.625, 0.75, 0.875, 1.0)) -> float:
    """The Fréchet distance of ``feats`` (N, D) to ``reference`` (M, D) extrapolated to an infinite
    ``feats`` set (Chong & Forsyth 2020, arXiv 1911.07023, "FID_inf"): FD's bias is linear in 1 / n,
    so FD of random subsets of ``fractions`` * N images (drawn with ``generator``) is fitted as
    a + b / n and the intercept a returned. Two sets of one distribution give about 0 where the plain
    FD of n = 200 images does not; the reference's own size still biases it (use a large one). May be
    slightly negative from sampling noise; squared feature units."""
    n = feats.shape[0]
    sizes = sorted({max(2, round(f * n)) for f in fractions})
    if len(sizes) < 2:
        raise MediffError(f"FD_inf needs sets of at least 2 sizes, got {n} images")
    fds = []
    for m in sizes:
        idx = torch.randperm(n, generator=generator)[:m]
        fds.append(frechet_distance(reference, feats[idx]))
    inv = torch.tensor([1.0 / m for m in sizes], dtype=torch.float64)
    design = torch.stack([torch.ones_like(inv), inv], 1)
    coef = torch.linalg.lstsq(design, torch.tensor(fds, dtype=torch.float64)[:, None]).solution
    return float(coef[0, 0])


def _kth_neighbour_distance(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance (N,) from each row of ``x`` to its k-th nearest other row."""
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the smallest is the row itself, at 0
    return torch.cat(out)


def prdc(real_feats: Tensor, fake_feats: Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of fake features (Nf, D) against real ones (Nr, D),
    each ball of radius the distance to its centre's k-th nearest neighbour in its own set (module
    docstring). Returns {"precision", "recall", "density", "coverage"}: shares in [0, 1] except
    density (>= 0, about 1 when the sets match)."""
    real, fake = _features(real_feats, "prdc", k + 1), _features(fake_feats, "prdc", k + 1)
    if real.shape[1] != fake.shape[1]:
        raise MediffError(f"prdc: feature lengths differ ({real.shape[1]} vs {fake.shape[1]})")
    r_real, r_fake = _kth_neighbour_distance(real, k), _kth_neighbour_distance(fake, k)
    d = torch.cdist(real, fake)  # (Nr, Nf)
    in_real_ball = d < r_real[:, None]
    return {"precision": float(in_real_ball.any(dim=0).double().mean()),
            "recall": float((d < r_fake[None, :]).any(dim=1).double().mean()),
            "density": float(in_real_ball.double().sum(dim=0).mean() / k),
            "coverage": float((d.min(dim=1).values < r_real).double().mean())}


def ms_ssim_scales(size: int) -> tuple[float, ...]:
    """The MS-SSIM scale weights used for images of side ``size`` px: all five of Wang et al.'s when
    the coarsest scale still holds the 7 px window (128 px and up), else the finest that do,
    renormalised to the same sum (a 64 px image uses four scales, 32 px three)."""
    for n in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if size // max(1, (n - 1) ** 2) > MS_SSIM_KERNEL - 1:  # MONAI's size check
            w = MS_SSIM_WEIGHTS[:n]
            return tuple(v * sum(MS_SSIM_WEIGHTS) / sum(w) for v in w)
    raise MediffError(f"MS-SSIM needs images of at least {MS_SSIM_KERNEL} px, got {size}")


def ms_ssim_diversity(images: Tensor, n_pairs: int, generator: torch.Generator, data_range: float = 1.0,
                      batch: int = 256) -> float:
    """Mean MS-SSIM over ``n_pairs`` random pairs of distinct images of ``images`` (N, 1, H, W),
    drawn with ``generator`` (pairs with replacement). ``data_range``: the units' dynamic range (1
    for mediff's normalised units, where 1 is an MR slice's 99.5th percentile or +1000 HU).
    Window: :data:`MS_SSIM_KERNEL` px Gaussian, scales: :func:`ms_ssim_scales`. Higher = less
    diverse; compare with the real data's own value."""
    from monai.metrics.regression import compute_ms_ssim

    if images.dim() != 4 or images.shape[1] != 1:
        raise MediffError(f"MS-SSIM expects images (N, 1, H, W), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if n < 2 or n_pairs < 1:
        raise MediffError(f"MS-SSIM diversity needs at least 2 images and 1 pair, got {n} images, {n_pairs} pairs")
    i = torch.randint(n, (n_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (n_pairs,), generator=generator)) % n  # j != i
    weights = ms_ssim_scales(min(images.shape[-2:]))
    total = 0.0
    for s in range(0, n_pairs, batch):
        a, b = images[i[s:s + batch]].float(), images[j[s:s + batch]].float()
        total += float(compute_ms_ssim(a, b, spatial_dims=2, data_range=data_range, kernel_size=MS_SSIM_KERNEL,
                                       kernel_sigma=MS_SSIM_SIGMA, weights=weights).sum())
    return total / n_pairs
