"""The ``evaluate`` command: synthesis metrics of a synthetic set against real images."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mediff.cli.app import app, console
from mediff.cli.output import check_output, output_dir
from mediff.cli.reconstruct import print_metrics
from mediff.errors import MediffError


@app.command()
def evaluate(
    real: Path = typer.Option(..., help="Real images: NPZ with 'images' or 'hu' and subject labels, or a folder of "
                              "NIfTI/DICOM/PNG (one subject per file or subfolder)."),
    synthetic: Path = typer.Option(..., help="A 'mediff sample' output folder, or images in any format --real takes."),
    out: Path = typer.Option(..., help="Output folder: metrics.json, report.html (and embedding.safetensors)."),
    size: Optional[int] = typer.Option(None, help="Image side in px (default: the synthetic samples')."),
    intensity: Optional[str] = typer.Option(None, help="Units, as for 'mediff train': percentile | hu | auto "
                                            "(default: those of the synthetic samples; one for both sets)."),
    embedding: Optional[str] = typer.Option(None, metavar="PATH|train", help="A saved embedding (an earlier "
                                            "evaluate's or audit's embedding.safetensors) to compare runs on one "
                                            "feature space, or 'train' for a new one; default: the one shipped with "
                                            "the samples' built-in prior when --real is its training data, else a "
                                            "new one trained on the real images."),
    embedding_steps: int = typer.Option(500, help="Optimiser steps when training the embedding."),
    k: int = typer.Option(5, help="Nearest neighbours for precision / recall / density / coverage."),
    pairs: int = typer.Option(1000, help="Random image pairs for MS-SSIM diversity."),
    seed: int = typer.Option(0, help="Seed of the subject split, subsampling, pairs and embedding training."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Fréchet distance, precision / recall / density / coverage (in a feature space trained on the real
    images, not Inception) and MS-SSIM diversity of synthetic images, beside real images of other subjects."""
    from dataclasses import replace

    from mediff.embedding import EmbeddingConfig
    from mediff.evaluate import EvaluateRequest, run_evaluate

    check_output(out, overwrite)
    if embedding_steps < 1:
        raise MediffError(f"--embedding-steps must be positive, got {embedding_steps}")
    cfg = replace(EmbeddingConfig(), steps=embedding_steps)
    req = EvaluateRequest(real=real, synthetic=synthetic, size=size, intensity=intensity, embedding=embedding,
                          embedding_config=cfg, k=k, pairs=pairs, seed=seed,
                          command=" ".join(["mediff", *sys.argv[1:]]))
    with output_dir(out, overwrite) as tmp:
        rec = run_evaluate(req, tmp)
    print_metrics(rec["rows"])
    console.print(f"[green]wrote[/] {out}/report.html")
