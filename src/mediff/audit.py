"""Memorization audit: which synthetic images copy a training patient (Dar et al., arXiv 2402.01054).

Every score here compares a *query* image with a *reference* set and says how much the query looks
like a copy of its closest reference image (higher = more copy-like):

- ``embedding``: the Pearson correlation of embeddings (:mod:`mediff.embedding`), maximised over the
  reference set (Dar et al.) and over the query's views (``embedding.VIEWS``: +-5 degree rotations
  and a left-right flip), so a copy that was rotated or mirrored is matched in the view that undoes
  it rather than left to the embedding's partial invariance.
- ``ncc``: the normalised cross-correlation of the pixels (zero shift), maximised over the reference
  set: a pixel-space baseline, blind to flips and rotations.
- ``carlini``: minus the ratio of the l2 distance to the nearest reference image to the mean distance
  to the ``n`` nearest (Carlini et al., arXiv 2301.13188, section 4: a copy is much closer to one
  training image than to the rest); a pixel-space baseline.

A threshold ``tau`` is the ``quantile`` (``QUANTILE``) of scores of real image pairs that are not copies, and a
synthetic image scoring above it against the training set is flagged with the training image (and
subject) it is closest to. Two rules say which real scores (``RULES``):

- ``heldout`` (default): the held-out images' scores against the training set. They are scored
  exactly as the synthetic images are, against the same reference set, so ``tau`` flags a new real
  patient's image with probability 1 - quantile.
- ``dar``: Dar et al.'s rule, the training images' scores against the held-out set. When the
  training set is much larger than the held-out one, a query's best match among it is closer than
  a training image's best match among the few held-out images, and this rule flags many genuinely
  new images (measured by ``benchmarks/audit.py``; the test suite shows it on random images).

Shapes: images (N, 1, H, W) in one set of units (the prior's); feature stacks (V, N, D), V views of
N images (``features``; V = 1 for the pixel methods); scores (N,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mediff.embedding import Encoder, embed_views, transform
from mediff.errors import MediffError

METHODS = ("embedding", "ncc", "carlini")
CARLINI_N = 50
PERTURBATIONS = ("exact", "flip", "rotate", "noise", "intensity")
RULES = ("heldout", "dar")
#: The default threshold quantile. A threshold set on a few held-out subjects varies with them, so
#: its nominal false-alarm rate needs a margin: at 0.95 more than 5 % of other unseen subjects'
#: images were flagged in benchmarks/audit.py, at 0.98 fewer, with every planted copy still found
#: (copies score far above either threshold).
QUANTILE = 0.98


def _standardise(x: Tensor) -> Tensor:
    """Rows of ``x`` flattened, centred and scaled to unit norm (float32), so a dot product is a
    Pearson correlation."""
    x = x.flatten(1).float()
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


def _chunks(n: int, size: int = 256):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of every row of ``a`` (Na, ...) with every row of ``b`` (Nb, ...): (Na, Nb)."""
    return _standardise(a) @ _standardise(b).T


def nearest_correlation(query: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """For each query row, the largest Pearson correlation with a reference row and that row's index:
    ((Nq,), (Nq,) long). Rows are flattened, so images (N, 1, H, W) and embeddings (N, D) both work."""
    ref = _standardise(reference)
    vals, idx = [], []
    for s in _chunks(query.shape[0]):
        v, i = (_standardise(query[s]) @ ref.T).max(dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def carlini_score(query: Tensor, reference: Tensor, n: int = CARLINI_N) -> tuple[Tensor, Tensor]:
    """-d_1 / mean(d_1..d_n) per query, with d_k the l2 distance to its k-th nearest reference image,
    and the nearest one's index: ((Nq,), (Nq,) long). n is capped at the reference size."""
    n = min(n, reference.shape[0])
    r = reference.flatten(1).float()
    r2 = (r * r).sum(1)
    vals, idx = [], []
    for s in _chunks(query.shape[0]):
        q = query[s].flatten(1).float()
        d = ((q * q).sum(1, keepdim=True) + r2[None] - 2 * q @ r.T).clamp_min(0).sqrt()
        dk, ik = d.topk(n, dim=1, largest=False)
        vals.append((-dk[:, 0] / dk.mean(1).clamp_min(1e-12)).float())
        idx.append(ik[:, 0])
    return torch.cat(vals), torch.cat(idx)


def features(method: str, images: Tensor, encoder: Encoder | None = None) -> Tensor:
    """The feature stack (V, N, D) of images (N, 1, H, W) that ``method`` compares: the embeddings of
    each image under each of ``embedding.VIEWS`` (view 0: the image itself) for ``embedding``; the
    flattened pixels (1, N, H*W) for the pixel methods."""
    if method == "embedding":
        if encoder is None:
            raise MediffError("the embedding method needs an encoder")
        return embed_views(encoder, images)
    if method in METHODS:
        return images.flatten(1).float()[None]
    raise MediffError(f"unknown audit method {method!r}; choose from {', '.join(METHODS)}")


def score(method: str, query: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """(copy score (Nq,), index of the closest reference item (Nq,)) of ``method`` (module doc) for
    feature stacks (``features``): each query's best view against the reference images themselves
    (view 0), so a copy that was rotated or flipped is matched in the view that undoes it."""
    if method not in METHODS:
        raise MediffError(f"unknown audit method {method!r}; choose from {', '.join(METHODS)}")
    one = carlini_score if method == "carlini" else nearest_correlation
    best, where = None, None
    for view in query:
        v, i = one(view, reference[0])
        if best is None:
            best, where = v, i
        else:
            better = v > best
            best, where = torch.where(better, v, best), torch.where(better, i, where)
    return best, where


@dataclass(frozen=True)
class AuditResult:
    """One method's audit. tau: the threshold; rule: how it was set (:data:`RULES`); null: the real
    scores whose ``quantile`` it is; scores: synthetic images' scores against the training set (S,);
    nearest: the closest training image of each (S,); flagged: scores > tau (S,)."""

    method: str
    rule: str
    tau: float
    quantile: float
    null: Tensor
    scores: Tensor
    nearest: Tensor

    @property
    def flagged(self) -> Tensor:
        return self.scores > self.tau


def null_scores(method: str, train: Tensor, heldout: Tensor, rule: str = "heldout") -> Tensor:
    """The real scores a threshold is a quantile of: held-out images against the training set
    (``heldout``) or training images against the held-out set (``dar``)."""
    if rule == "heldout":
        return score(method, heldout, train)[0]
    if rule == "dar":
        return score(method, train, heldout)[0]
    raise MediffError(f"unknown threshold rule {rule!r}; choose from {', '.join(RULES)}")


def audit(method: str, train: Tensor, heldout: Tensor, synthetic: Tensor, quantile: float = QUANTILE,
          rule: str = "heldout") -> AuditResult:
    """Audit ``synthetic`` against ``train`` with the threshold set on ``heldout`` by ``rule`` (module
    doc). Inputs are feature stacks (V, N, D) of each set (``features``)."""
    if not 0 < quantile < 1:
        raise MediffError(f"quantile must be in (0, 1), got {quantile}")
    for name, x in (("training", train), ("held-out", heldout), ("synthetic", synthetic)):
        if x.dim() != 3:
            raise MediffError(f"audit inputs are feature stacks (V, N, D), got {name} of shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise MediffError(f"the audit needs {name} images, got none")
    if not train.shape[2] == heldout.shape[2] == synthetic.shape[2]:
        raise MediffError(f"audit inputs differ in size: training {train.shape[2]}, held-out {heldout.shape[2]}, "
                          f"synthetic {synthetic.shape[2]} features per image")
    null = null_scores(method, train, heldout, rule)
    scores, nearest = score(method, synthetic, train)
    return AuditResult(method, rule, float(torch.quantile(null.double(), quantile)), quantile, null, scores, nearest)


def cross_validated_false_alarm(method: str, train: Tensor, heldout: Tensor, groups: np.ndarray,
                                quantile: float = QUANTILE, rule: str = "heldout") -> float:
    """The fraction of real images of unseen subjects that the audit would flag, estimated out of
    sample: the held-out subjects (``groups`` (H,), e.g. subject ids) are split in two halves, the
    threshold set on one half flags the other, and the two ways are averaged. 0.0..1.0; NaN with
    fewer than two held-out subjects."""
    uniq = np.unique(groups)
    if len(uniq) < 2:
        return float("nan")
    first = torch.from_numpy(np.isin(groups, uniq[: len(uniq) // 2]))
    # Each held-out image's score against the training set does not depend on the halving: once.
    held_scores = score(method, heldout, train)[0]
    rates = []
    for calib in (first, ~first):
        null = held_scores[calib] if rule == "heldout" else null_scores(method, train, heldout[:, calib], rule)
        tau = float(torch.quantile(null.double(), quantile))
        rates.append(float((held_scores[~calib] > tau).float().mean()))
    return float(np.mean(rates))


def agreement(a: AuditResult, b: AuditResult) -> dict[str, float]:
    """How two methods' flags agree on the same synthetic set: both, either, Cohen's kappa."""
    fa, fb = a.flagged, b.flagged
    n = fa.numel()
    po = float((fa == fb).float().mean())
    pa, pb = float(fa.float().mean()), float(fb.float().mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    kappa = 1.0 if pe >= 1 else (po - pe) / (1 - pe)
    return {"both": int((fa & fb).sum()), "either": int((fa | fb).sum()), "n": n, "kappa": kappa}


def perturb(images: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Planted copies for validating an audit: images (N, 1, H, W) in normalised units (1 ~ bright
    tissue) changed the way a leaked copy might be. exact; flip (left-right); rotate (+-5 degrees,
    random sign); noise (Gaussian, std 0.02); intensity (x 0.9 + 0.05)."""
    if kind == "exact":
        return images.clone()
    if kind == "flip":
        return images.flip(-1)
    if kind == "noise":
        return images + 0.02 * torch.randn(images.shape, generator=generator)
    if kind == "intensity":
        return images * 0.9 + 0.05
    if kind == "rotate":
        n = images.shape[0]
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        return transform(images, sign * math.radians(5.0), torch.zeros(n, dtype=torch.bool))
    raise MediffError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")
