"""The ``mediff evaluate`` job: synthesis metrics of a synthetic set against real images.

The real images are split by subject into two halves (seeded). Half A is the reference; half B and
the synthetic set are each compared with it, on the same number of images ``n`` (the smaller set's
size; the larger is subsampled, seeded). Half B is what a perfect generator would score at that
``n``: the Fréchet distance's floor (it has a positive small-sample bias) and precision / recall
near 1. Precision / recall / density / coverage also take ``n`` images of the reference: their
k-NN radii shrink as a set grows (against all 5146 reference IXI slices, 200 real slices of other
subjects had a coverage of 0.15; against 200 of them, 0.99). Feature-space metrics use the
embedding given, the one shipped with the samples' prior when the real images are its training
data, or one trained here on the real images (both halves), saved so that runs can be compared on
one feature space (:mod:`mediff.synthesis_metrics`).

Units: images are in mediff's normalised units (MR: 1 = a slice's 99.5th percentile; CT: the HU
window [-1000, 1000] -> [0, 1]), so MS-SSIM's data range is 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mediff.data import INTENSITIES, load_slices, split_by_subject
from mediff.embedding import EmbeddingConfig, Encoder, embed
from mediff.errors import MediffError
from mediff.privacy import embedding_for
from mediff.synthesis import grid, read_samples
from mediff.synthesis_metrics import (MS_SSIM_KERNEL, frechet_distance, frechet_distance_inf, ms_ssim_diversity,
                                       ms_ssim_scales, prdc)

EMBEDDING_FILE = "embedding.safetensors"
FEATURE_NOTE = ("Feature space: the pooled backbone of a contrastive (NT-Xent) CNN trained here on real medical "
                "images (mediff.embedding), not Inception: no ImageNet weights exist offline. Fréchet distances "
                "are comparable only between runs on the same embedding file, never with published FIDs.")


@dataclass(frozen=True)
class EvaluateRequest:
    """real: the real images (NPZ with subject labels, or a folder ``load_slices`` reads); synthetic:
    a ``mediff sample`` folder or images; size / intensity: of the real images (default: those of the
    synthetic set); embedding: a saved embedding's path, "train" (a new one on the real images), or
    None (the one shipped with the samples' built-in prior when the real images are its training
    data, else a new one: ``privacy.embedding_for``); k: the neighbourhood of precision / recall /
    density / coverage; pairs: random pairs of MS-SSIM."""

    real: Path
    synthetic: Path
    size: int | None = None
    intensity: str | None = None
    embedding: str | None = None
    embedding_config: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    k: int = 5
    pairs: int = 1000
    seed: int = 0
    command: str = ""


def load_synthetic(path: Path, size: int | None, intensity: str | None) -> tuple[Tensor, dict, str]:
    """(images (N, 1, S, S) in normalised units, the record of how they were made, their intensity)
    of a ``mediff sample`` output or of any images ``load_slices`` reads (then ``size`` is needed)."""
    path = Path(path)
    if not path.exists():
        raise MediffError(f"synthetic images not found: {path}")
    if path.is_dir() and next((p for p in path.iterdir() if not p.name.startswith(".")), None) is None:
        raise MediffError(f"no synthetic images in {path}: the folder is empty")
    if (got := read_samples(path)) is not None:
        images, record, is_hu = got
        units = "hu" if is_hu else "percentile"
        if intensity not in (None, "auto", units):
            raise MediffError(f"{path} holds samples in {units} units, not --intensity {intensity}")
        if size is not None and images.shape[-1] != size:
            raise MediffError(f"{path} holds {images.shape[-1]} px samples, not --size {size}: "
                              "real and synthetic images must have one size")
        return images, record, units
    if size is None:
        raise MediffError(f"{path} is not a 'mediff sample' output: give --size (and --intensity) of its images")
    data = load_slices(path, size=size, intensity=intensity or "auto", min_foreground=0.0)
    return data.images, {}, "hu" if data.is_hu else "percentile"


def subsample(images: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` of ``images`` (N, ...) drawn without replacement (all of them, in order, when n >= N)."""
    if n >= images.shape[0]:
        return images
    return images[torch.randperm(images.shape[0], generator=generator)[:n].sort().values]


@torch.no_grad()
def features(encoder: Encoder, images: Tensor, batch: int = 512) -> Tensor:
    """Feature vectors (N, 8 * width) of images (N, 1, H, W) for FD and PRDC: the embedding's pooled
    backbone, before its NT-Xent projection head. The head learns to discard what the augmentations
    change, and the layer before it is the better representation (Chen et al. 2020, section 4.2); on
    IXI it separates the early checkpoint from the final prior more (its FD 1.6x the autoguided
    samples', against 1.2x with the head's output; benchmarks/synthesis.py)."""
    return embed(encoder, images, batch, head=False)


def evaluate_sets(encoder: Encoder, reference: Tensor, sets: dict[str, Tensor], n: int, k: int = 5,
                  pairs: int = 1000, seed: int = 0) -> list[dict]:
    """One metrics row per named set (N, 1, S, S) against ``reference`` (M, 1, S, S), each set
    subsampled to ``n`` images (seeded) so that the rows are comparable: set, n, FD (squared
    :func:`features` units, against the whole reference) and FD_inf (the same extrapolated to an
    infinite set, ``frechet_distance_inf``), precision, recall, density, coverage (against
    ``n`` reference images, one seeded subsample for every row: both sets of PRDC have one size, as
    in Naeem et al.), its MS-SSIM and the reference's own."""
    ref = features(encoder, reference)
    ref_n = subsample(ref, n, torch.Generator().manual_seed(seed))
    real_ms = ms_ssim_diversity(reference, pairs, torch.Generator().manual_seed(seed))
    rows = []
    for i, (name, images) in enumerate(sets.items()):
        x = subsample(images, n, torch.Generator().manual_seed(seed + 1 + i))
        feats = features(encoder, x)
        ms = ms_ssim_diversity(x, pairs, torch.Generator().manual_seed(seed))
        rows.append({"set": name, "n": int(x.shape[0]), "FD": frechet_distance(ref, feats),
                     "FD_inf": frechet_distance_inf(ref, feats, torch.Generator().manual_seed(seed)), **prdc(ref_n, feats, k),
                     "MS-SSIM": ms, "real MS-SSIM": real_ms})
    return rows


def run_evaluate(req: EvaluateRequest, out: Path) -> dict:
    """Evaluate ``req.synthetic`` against ``req.real``; write metrics.json, report.html and (when
    trained here) embedding.safetensors into the folder ``out``. Returns the metrics record."""
    if req.intensity is not None and req.intensity not in INTENSITIES:
        raise MediffError(f"unknown --intensity {req.intensity!r}; choose from {', '.join(INTENSITIES)}")
    if req.k < 1 or req.pairs < 1:
        raise MediffError("--k and --pairs must be positive")
    if not Path(req.real).exists():
        raise MediffError(f"real images not found: {req.real}")
    if req.embedding not in (None, "train") and not Path(req.embedding).is_file():
        raise MediffError(f"embedding not found: {req.embedding}")
    syn, record, units = load_synthetic(req.synthetic, req.size, req.intensity)
    size = int(syn.shape[-1])
    real = load_slices(req.real, size=size, intensity=units)
    n_subjects = len(np.unique(real.subjects))
    if n_subjects < 2:
        raise MediffError(f"{req.real} holds one subject: the real-vs-real baseline splits the real images "
                          "by subject, give images of at least 2 subjects")
    idx_a, idx_b = split_by_subject(real.subjects, n_subjects // 2, req.seed)
    ref, half_b = real.images[torch.from_numpy(idx_a)], real.images[torch.from_numpy(idx_b)]
    n = min(half_b.shape[0], syn.shape[0])
    if min(n, ref.shape[0]) < req.k + 1:
        raise MediffError(f"too few images: {min(n, ref.shape[0])} in the smallest set (real half or synthetic), "
                          f"precision / recall with k = {req.k} need at least {req.k + 1}")
    info = {"trained_on": str(req.real), "data_fingerprint": real.fingerprint, "n_images": int(real.images.shape[0]),
            "size": size, "intensity": units, "seed": req.seed}
    model = str(record.get("model", ""))
    encoder, emb_info = embedding_for(req.embedding, model, real.images, real.fingerprint, req.embedding_config,
                                      req.seed, Path(out) / EMBEDDING_FILE, info)
    emb_file = (f"shipped with {model}" if emb_info.get("shipped") else
                EMBEDDING_FILE if req.embedding in (None, "train") else str(req.embedding))
    rows = evaluate_sets(encoder, ref, {"real (other subjects)": half_b, "synthetic": syn}, n, req.k,
                         req.pairs, req.seed)
    rec = {"rows": rows, "real": str(req.real), "synthetic": str(req.synthetic), "size": size, "units": units,
           "reference": {"images": int(ref.shape[0]), "subjects": int(len(np.unique(real.subjects[idx_a])))},
           "other_half": {"images": int(half_b.shape[0]), "subjects": int(len(np.unique(real.subjects[idx_b])))},
           "n_synthetic": int(syn.shape[0]), "k": req.k, "pairs": req.pairs, "seed": req.seed,
           "ms_ssim": {"kernel": MS_SSIM_KERNEL, "weights": list(ms_ssim_scales(size)), "data_range": 1.0},
           "embedding": {"file": emb_file,
                         "config": asdict(encoder.cfg), "info": emb_info},
           "sample_record": record, "command": req.command}
    (Path(out) / "metrics.json").write_text(json.dumps(rec, indent=2))
    write_evaluate_report(Path(out) / "report.html", rec, ref, syn)
    return rec


def write_evaluate_report(path: Path, rec: dict, real: Tensor, synthetic: Tensor, show: int = 16) -> None:
    """report.html: grids of ``show`` real (reference) and synthetic images in one window [0, 1],
    the metrics table and notes on how to read it."""
    from mediff.report import Panel, write_report

    def tile(x: Tensor) -> np.ndarray:
        step = max(1, x.shape[0] // show)
        return grid(x[::step][:show, 0].numpy())

    gap = abs(rec["rows"][-1]["MS-SSIM"] - rec["rows"][-1]["real MS-SSIM"])
    panels = [Panel(f"real (reference, {rec['reference']['images']} images)", tile(real), vmin=0.0, vmax=1.0),
              Panel(f"synthetic ({rec['n_synthetic']} images)", tile(synthetic), vmin=0.0, vmax=1.0)]
    notes = [FEATURE_NOTE,
             f"The real images are split by subject: {rec['reference']['subjects']} subjects are the reference, "
             f"the other {rec['other_half']['subjects']} give the real-vs-real row, what a perfect generator "
             f"would score on n = {rec['rows'][0]['n']} images (every row uses that n; precision, recall, density "
             "and coverage use n reference images too). FD: lower is better, "
             "the real row is its floor; precision / recall / coverage: higher is better, near 1 for real "
             "data; density: about 1 when the distributions match.",
             f"MS-SSIM: mean over {rec['pairs']} random pairs within a set ({MS_SSIM_KERNEL} px window, "
             f"{len(rec['ms_ssim']['weights'])} scales). The target is the real data's own value, not the "
             f"minimum (noise scores near 0); the synthetic set is {gap:.4f} away from it.",
             f"k = {rec['k']} nearest neighbours for precision, recall, density and coverage."]
    sample = rec["sample_record"]
    meta = {"command": rec["command"], "real": rec["real"], "synthetic": rec["synthetic"],
            "embedding": rec["embedding"]["file"], "units": rec["units"], "seed": rec["seed"]}
    meta.update({f"sample {k}": sample[k] for k in ("model", "sampler", "steps", "autoguidance") if k in sample})
    write_report(path, "mediff evaluate: synthesis metrics", panels, rec["rows"], notes, meta)
