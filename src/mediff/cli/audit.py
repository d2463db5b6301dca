"""The ``audit`` command: find synthetic images that copy a training patient before they are shared."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mediff.cli.app import app, console
from mediff.cli.output import check_output, output_dir
from mediff.errors import MediffError

EXIT_COPIES = 3


@app.command()
def audit(
    model: str = typer.Option("brain-t1", help="Built-in prior name or checkpoint path (the model whose samples "
                              "are audited)."),
    train: Path = typer.Option(..., help="The prior's training data (NPZ or folder, as given to mediff train). "
                               "Without --heldout it is split by the prior's recorded held-out subjects."),
    heldout: Optional[Path] = typer.Option(None, help="Real images of subjects the prior never saw (sets the "
                                           "threshold); default: the prior's held-out subjects in --train."),
    synthetic: Optional[Path] = typer.Option(None, help="Synthetic images to audit: a mediff sample folder, an "
                                             "NPZ, or a folder of images. Omit to draw --n new ones."),
    n: int = typer.Option(1000, help="Samples to draw when --synthetic is not given (written to OUT/synthetic)."),
    steps: int = typer.Option(32, help="Sampler steps when drawing samples."),
    sampler: str = typer.Option("dpmpp2m", help="Sampler when drawing samples (see mediff sample)."),
    embedding: Optional[str] = typer.Option(None, metavar="PATH|train", help="A saved embedding (the "
                                            "embedding.safetensors of an earlier audit), or 'train' for a new one; "
                                            "default: the one shipped with a built-in prior when --train is its "
                                            "training data, else a new one trained on the training images."),
    embedding_steps: int = typer.Option(500, help="Optimiser steps when training the embedding."),
    quantile: float = typer.Option(0.98, help="Threshold: this quantile of the real scores of --threshold (a "
                                    "margin over 0.95: a threshold from few held-out subjects varies with them)."),
    threshold: str = typer.Option("heldout", help="heldout: held-out images scored against the training set (like "
                                  "the synthetic ones) | dar: training images against the held-out set (Dar et al.)."),
    seed: int = typer.Option(0, help="Seed of embedding training and sampling."),
    fail_on_copies: bool = typer.Option(False, "--fail-on-copies", help=f"Exit with code {EXIT_COPIES} when "
                                        "any copy is found (to gate an export); the report is written first."),
    out: Path = typer.Option(..., help="Output folder: report.html, audit.json, embedding.safetensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Memorization audit (Dar et al., arXiv 2402.01054): flag synthetic images closer to a training
    image than any two different real patients' images come (self-supervised embedding, threshold
    from held-out subjects), with pixel-space NCC and Carlini et al.'s nearest-neighbour ratio beside it."""
    from dataclasses import replace

    from mediff.audit import RULES
    from mediff.audit_job import AuditRequest, run_audit
    from mediff.embedding import EmbeddingConfig
    from mediff.prior import load_prior
    from mediff.privacy import synthetic_images

    check_output(out, overwrite)
    emb = None if embedding in (None, "train") else Path(embedding)
    for p, name in ((train, "--train"), (heldout, "--heldout"), (synthetic, "--synthetic"), (emb, "--embedding")):
        if p is not None and not p.exists():
            raise MediffError(f"{name} not found: {p}")
    if embedding_steps < 1 or n < 1:
        raise MediffError("--embedding-steps and --n must be positive")
    if threshold not in RULES:
        raise MediffError(f"--threshold takes {' or '.join(RULES)}, got {threshold!r}")
    prior = load_prior(model)
    with output_dir(out, overwrite) as tmp:
        if synthetic is not None:
            images, source = synthetic_images(synthetic, prior.meta), str(synthetic)
        else:
            images, source = _draw(model, n, steps, sampler, seed, tmp / "synthetic")
        if images.shape[0] == 0:
            raise MediffError(f"no synthetic images in {synthetic}")
        req = AuditRequest(meta=prior.meta, model=prior.name, train=train, heldout=heldout, synthetic=images,
                           embedding=embedding, quantile=quantile, rule=threshold, seed=seed,
                           config=replace(EmbeddingConfig(), steps=embedding_steps), source=source)
        rec = run_audit(req, tmp)
    from mediff.audit_job import verdict_line

    m = rec["methods"]
    console.print(f"{verdict_line(rec)}; pixel NCC flags {m['ncc']['flagged']}, Carlini ratio {m['carlini']['flagged']}",
                  highlight=False)
    console.print(f"[green]wrote[/] {out}/report.html")
    if fail_on_copies and rec["copies"]:
        console.print(f"[red]copies found[/]: {rec['copies']} synthetic images copy training subjects "
                      f"{', '.join(rec['copied_subjects'][:5])}", highlight=False)
        sys.exit(EXIT_COPIES)


def _draw(model: str, n: int, steps: int, sampler: str, seed: int, folder: Path):
    from mediff.synthesis import sample_images, write_samples

    images, meta = sample_images(model, n=n, steps=steps, sampler=sampler, seed=seed)
    folder.mkdir(parents=True)
    write_samples(folder, images, meta)
    return images, f"{n} new samples ({sampler}, {steps} steps, seed {seed}) in synthetic/"
