"""Image-quality and uncertainty metrics, as pure per-item functions.

Conventions shared by every function here:

* Inputs are batches ``(B, ...)``; every metric returns one value per item, a tensor of shape ``(B,)``.
  Averaging over a test set is left to the caller so that per-item spread can be reported.
* ``data_range`` is always explicit (no guessing from the data, which would make PSNR/SSIM depend on
  the reconstruction itself). It may be a float or a per-item tensor ``(B,)``; it is in the same
  intensity units as the images.
* Complex inputs (MRI images) are compared by magnitude ``|x|``: that is what radiologists view and what
  fastMRI-style evaluations report. Pass ``x.real`` yourself if you want the real part instead.
* An optional boolean ``mask`` (foreground region, broadcastable to the image) restricts PSNR/NMSE to
  those pixels, so large air backgrounds do not inflate the scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mediff.errors import MediffError

__all__ = ["coverage", "nmse", "psnr", "ssim", "uncertainty_stats"]


def _real(x: Tensor) -> Tensor:
    """Magnitude of complex input, real input unchanged; integer input promoted to float."""
    if x.is_complex():
        return x.abs()
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _pair(x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != ref.shape:
        raise MediffError(f"shape mismatch: x {tuple(x.shape)} vs ref {tuple(ref.shape)}")
    if x.dim() < 2:
        raise MediffError(f"expected a batch (B, ...), got shape {tuple(x.shape)}")
    a, b = _real(x), _real(ref)
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt), b.to(dt)


def _per_item(v: float | Tensor, like: Tensor) -> Tensor:
    """A scalar or (B,) value as a float tensor of shape (B,) on ``like``'s device."""
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise MediffError(f"data_range must be a float or a (B,) tensor, got shape {tuple(t.shape)}")
    if bool((t <= 0).any()):
        raise MediffError("data_range must be positive")
    return t


def _masked_sum(v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-item sum of ``v`` and number of counted pixels, restricted to ``mask`` if given."""
    if mask is None:
        n = torch.full((v.shape[0],), v[0].numel(), dtype=v.dtype, device=v.device)
        return v.flatten(1).sum(1), n
    m = torch.broadcast_to(mask.to(torch.bool), v.shape).to(v.dtype)
    n = m.flatten(1).sum(1)
    if bool((n == 0).any()):
        raise MediffError("mask selects no pixels for at least one item")
    return (v * m).flatten(1).sum(1), n


def psnr(x: Tensor, ref: Tensor, data_range: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range² / MSE)``, per item.

    x, ref: (B, ...) real or complex (magnitude is used). data_range: float or (B,), intensity units.
    mask: optional foreground mask broadcastable to x; MSE is averaged over the masked pixels only.
    Returns (B,) in dB; ``inf`` for a perfect match.
    """
    a, b = _pair(x, ref)
    se, n = _masked_sum((a - b) ** 2, mask)
    dr = _per_item(data_range, a)
    return 10.0 * torch.log10(dr**2 / (se / n))


def nmse(x: Tensor, ref: Tensor, mask: Tensor | None = None) -> Tensor:
    """Normalised MSE ``||x - ref||² / ||ref||²`` per item (dimensionless), optionally inside ``mask``.

    x, ref: (B, ...), complex inputs compared by magnitude. Returns (B,).
    """
    a, b = _pair(x, ref)
    num, _ = _masked_sum((a - b) ** 2, mask)
    den, _ = _masked_sum(b**2, mask)
    return num / den


def _gaussian_window(sigma: float, truncate: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Same radius rule as scipy.ndimage / skimage: int(truncate * sigma + 0.5) -> 11 taps for sigma 1.5.
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(v: Tensor, w: Tensor, spatial: int) -> Tensor:
    """Separable 'valid' filtering of (N, 1, *spatial) with the 1-D window ``w`` along every spatial dim."""
    conv = F.conv2d if spatial == 2 else F.conv3d
    k = w.numel()
    for d in range(spatial):
        shape = [1, 1] + [1] * spatial
        shape[2 + d] = k
        v = conv(v, w.view(shape))
    return v


def ssim(
    x: Tensor,
    ref: Tensor,
    data_range: float | Tensor,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, per item.

    x, ref: (B, C, H, W) or (B, C, D, H, W), real or complex (magnitude). data_range: float or (B,).
    Window: Gaussian, sigma=1.5 px, truncated at 3.5 sigma -> 11 taps per axis (the Wang et al. setting;
    identical to ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)`` and to MONAI's default SSIMMetric). Local statistics
    use population (biased) variances; the SSIM map is averaged over the 'valid' region (pixels whose
    window fits inside the image) and over channels. Returns (B,).

    Written here rather than calling MONAI because MONAI casts to float32 and takes a scalar data_range;
    this keeps the input precision and allows a per-item range.
    """
    a, b = _pair(x, ref)
    if a.dim() not in (4, 5):
        raise MediffError(f"ssim expects (B, C, H, W) or (B, C, D, H, W), got {tuple(a.shape)}")
    spatial = a.dim() - 2
    w = _gaussian_window(sigma, truncate, a.dtype, a.device)
    if min(a.shape[2:]) < w.numel():
        raise MediffError(f"images of size {tuple(a.shape[2:])} are smaller than the {w.numel()}-tap SSIM window")
    bsz, ch = a.shape[:2]
    # Fold channels into the batch so one single-channel separable filter handles everything.
    stack = torch.stack([a, b, a * a, b * b, a * b], dim=2).reshape(bsz * ch * 5, 1, *a.shape[2:])
    mu_a, mu_b, m_aa, m_bb, m_ab = _filter_valid(stack, w, spatial).reshape(bsz, ch, 5, -1).unbind(2)
    var_a = m_aa - mu_a**2
    var_b = m_bb - mu_b**2
    cov = m_ab - mu_a * mu_b
    dr = _per_item(data_range, a).view(bsz, 1, 1)
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return smap.flatten(1).mean(1)


def _quantile0(s: Tensor, q: float) -> Tensor:
    """Quantile along dim 0 of an already sorted tensor, linear interpolation (numpy's default).

    Written out because ``torch.quantile`` refuses inputs above 2**24 elements (3-D posterior stacks).
    """
    k = s.shape[0]
    pos = q * (k - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, k - 1)
    frac = pos - lo
    return s[lo] + frac * (s[hi] - s[lo])


def coverage(
    samples: Tensor | None,
    ref: Tensor,
    level: float = 0.9,
    *,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Empirical coverage of central ``level`` credible intervals, per item.

    Either ``samples`` (K, B, ...) from the posterior — the interval per pixel is the empirical
    [(1-level)/2, (1+level)/2] quantile range across the K samples (linear interpolation) — or
    ``samples=None`` with ``mean``/``std`` (B, ...), giving the Gaussian interval mean ± z·std.
    ref: (B, ...). Complex values are reduced to magnitude. Returns (B,): the fraction of pixels (inside
    ``mask`` if given) whose reference lies within its interval; a calibrated posterior gives ≈ level.
    """
    if not 0.0 < level < 1.0:
        raise MediffError(f"level must be in (0, 1), got {level}")
    r = _real(ref)
    alpha = (1.0 - level) / 2.0
    if samples is not None:
        if mean is not None or std is not None:
            raise MediffError("pass either samples or mean/std, not both")
        s = _real(samples)
        if s.shape[1:] != r.shape or s.shape[0] < 2:
            raise MediffError(f"samples must be (K>=2, *ref.shape), got {tuple(s.shape)} for ref {tuple(r.shape)}")
        s = s.to(torch.promote_types(s.dtype, r.dtype)).sort(dim=0).values
        lo, hi = _quantile0(s, alpha), _quantile0(s, 1.0 - alpha)
    else:
        if mean is None or std is None:
            raise MediffError("coverage needs samples or both mean and std")
        m, sd = _real(mean), _real(std)
        z = float(torch.special.ndtri(torch.tensor(1.0 - alpha, dtype=torch.float64)))
        lo, hi = m - z * sd, m + z * sd
    inside = ((r >= lo) & (r <= hi)).to(lo.dtype)
    hits, n = _masked_sum(inside, mask)
    return hits / n


def uncertainty_stats(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel-wise posterior mean and standard deviation across samples.

    samples: (K, B, ...) with K >= 2; complex samples are reduced to magnitude first (the displayed
    image). Returns (mean, std), each (B, ...); std uses the unbiased (K-1) normalisation.
    """
    if samples.dim() < 2 or samples.shape[0] < 2:
        raise MediffError(f"uncertainty_stats needs samples (K>=2, B, ...), got {tuple(samples.shape)}")
    s = _real(samples)
    return s.mean(0), s.std(0, correction=1)
