"""The audit's data: the training and held-out real images of a prior, and the embedding learnt on them.

A prior records which subjects it never saw (``meta.data.val_subjects``), so one data file that holds
all subjects is split the way the prior was trained: the audit compares synthetic images with the
training subjects and sets its threshold with the held-out ones. Images go through the same loader
as training (:func:`mediff.data.load_slices`: the prior's size and units, near-empty slices dropped).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from mediff.data import SliceSet, load_slices
from mediff.embedding import (EmbeddingConfig, Encoder, load_embedding, save_embedding, shipped_embedding,
                              train_embedding)
from mediff.errors import MediffError
from mediff.prior_meta import PriorMeta


def intensity_of(meta: PriorMeta) -> str:
    """The ``load_slices`` intensity that gives a prior's units."""
    return "hu" if meta.is_hu else "percentile"


def real_sets(meta: PriorMeta, train: Path, heldout: Path | None = None) -> tuple[SliceSet, SliceSet]:
    """(training, held-out) images of a prior, in its size and units. Without ``heldout``, ``train``
    holds every subject and is split by the prior's held-out subjects; with it, the two files are
    used as given (a subject in both is an error: held-out must mean never trained on)."""
    kw = {"size": meta.image_size, "intensity": intensity_of(meta)}
    data = load_slices(train, **kw)
    if heldout is not None:
        held = load_slices(heldout, **kw)
        if shared := sorted(set(data.subjects.tolist()) & set(held.subjects.tolist())):
            raise MediffError(f"{len(shared)} subject(s) are in both --train and --heldout (e.g. {shared[0]}): "
                              "held-out subjects must be ones the prior never saw")
        return data, held
    val = set(meta.data.val_subjects) if meta.data is not None else set()
    is_val = np.array([s in val for s in data.subjects.tolist()])
    if not is_val.any():
        raise MediffError(f"none of the prior's held-out subjects is in {train}: give --heldout DATA "
                          "(real images of subjects the prior never saw)")
    if is_val.all():
        raise MediffError(f"{train} holds only the prior's held-out subjects: give its training data")
    return data.subset(np.flatnonzero(~is_val)), data.subset(np.flatnonzero(is_val))


def fit_embedding(images: Tensor, cfg: EmbeddingConfig, seed: int, out: Path | None = None,
                  info: dict | None = None, label: str = "training the embedding") -> Encoder:
    """Train an embedding on ``images`` with a progress bar; saved to ``out`` when given."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None, loss="-")
        enc = train_embedding(images, cfg, seed=seed,
                              progress=lambda k, n, loss: bar.update(task, completed=k, total=n, loss=f"{loss:.3f}"))
    if out is not None:
        save_embedding(out, enc, info)
    return enc


def embedding_for(choice: str | None, prior: str, images: Tensor, fingerprint: str, cfg: EmbeddingConfig,
                  seed: int, out: Path, info: dict) -> tuple[Encoder, dict]:
    """The audit's embedding and its training record. ``choice``: a saved embedding's path; "train" to
    train one on ``images``; None for the one shipped with built-in prior ``prior`` when it was trained
    on the same data (``fingerprint``), else a new one. A trained embedding is written to ``out`` so
    the audit can be repeated on the same feature space. The record's ``file`` says which file it is."""
    if choice not in (None, "train"):
        enc, known = load_embedding(Path(choice))
        return enc, {**known, "file": str(choice)}
    shipped = shipped_embedding(prior) if choice is None else None
    if shipped is not None:
        enc, known = load_embedding(shipped)
        if known.get("data_fingerprint") == fingerprint:
            return enc, {**known, "shipped": True, "file": str(shipped)}
    return fit_embedding(images, cfg, seed, out, info), {**info, "file": str(out)}


def synthetic_images(path: Path, meta: PriorMeta) -> Tensor:
    """Synthetic images (N, 1, S, S) in the prior's units from a ``mediff sample`` folder (its
    samples.npz) or any file / folder ``load_slices`` reads."""
    from mediff.synthesis import read_samples

    if (got := read_samples(path)) is not None:
        x = got[0]
        if x.shape[-2:] != (meta.image_size, meta.image_size):
            raise MediffError(f"{path}: synthetic images of shape {tuple(x.shape)}, the prior's are "
                              f"(N, 1, {meta.image_size}, {meta.image_size})")
        return x
    return load_slices(path, size=meta.image_size, intensity=intensity_of(meta), min_foreground=0.0).images
