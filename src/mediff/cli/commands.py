"""The commands ``info``, ``train`` and ``sample``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mediff.cli.app import app, console
from mediff.cli.output import check_output, output_dir
from mediff.errors import MediffError


@app.command()
def info(path: Path = typer.Argument(..., help="NIfTI, DICOM file or folder, PNG/TIFF, NPY/NPZ or HDF5.")) -> None:
    """Shape, dtype, spacing, modality and value range of a medical image or k-space file."""
    from mediff.io import describe

    d = describe(path)
    for k, v in d.items():
        print(f"{k:>14}: {v}")


@app.command()
def train(
    data: Path = typer.Option(..., help="NPZ with 'images' (+ 'subject_index'), or a folder of NIfTI/DICOM/PNG."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, logs and plots."),
    size: int = typer.Option(128, help="Image side in pixels (images are padded or downsampled)."),
    steps: int = typer.Option(100_000, help="Total optimiser steps."),
    batch: int = typer.Option(16, help="Global batch size (split across torchrun processes)."),
    lr: float = typer.Option(2e-4, help="AdamW learning rate."),
    decay_steps: int = typer.Option(0, help="Decay the learning rate linearly to 0 over the last N of --steps "
                                    "(0: constant). May change on --resume: finish a long run with a short decay."),
    covariates: Optional[Path] = typer.Option(None, help="CSV: subject id, then covariate columns (e.g. Age, Sex)."),
    val_subjects: int = typer.Option(20, help="Subjects held out for validation."),
    checkpoint_every: int = typer.Option(200, help="Steps between checkpoints."),
    val_every: int = typer.Option(1000, help="Steps between validation runs."),
    seed: int = typer.Option(0, help="Seed of the data order, noise and split."),
    channels: str = typer.Option("32,64,128,160", help="UNet channels per level (comma-separated)."),
    blocks: str = typer.Option("1,1,1,2", help="Residual blocks per level (comma-separated)."),
    intensity: str = typer.Option("auto", help="Units: percentile (per-slice 99.5th pct = 1, MR) | hu (CT window "
                                   "[-1000, 1000] HU -> [0, 1]) | auto (hu for CT data in HU)."),
    patch_sizes: str = typer.Option("", help="Patch Diffusion crop sizes, e.g. 32,64 (needs --position); "
                                    "empty: whole images only."),
    full_prob: float = typer.Option(0.5, help="With --patch-sizes: probability of a whole-image step."),
    position: bool = typer.Option(False, "--position", help="Pixel coordinates as extra network inputs."),
    pixel_spacing: Optional[float] = typer.Option(None, "--pixel-spacing", metavar="MM", help="In-plane pixel "
                                                  "size of data whose files do not say (NPZ without "
                                                  "'pixel_spacing_mm', PNG); recorded in the prior."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    device: str = typer.Option("auto", help="auto (CUDA when available) | cpu | cuda. A run may resume on "
                               "another device; random draws stay on CPU generators."),
) -> None:
    """Train a diffusion prior (EDM loss, EMA, AdamW). Under torchrun, trains with DDP."""
    from mediff.train import TrainConfig, train as run

    from mediff.nets import UNetConfig

    ch, bl = _ints(channels, "--channels"), _ints(blocks, "--blocks")
    if len(ch) != len(bl):
        raise MediffError("--channels and --blocks need one entry per level")
    net = UNetConfig(channels=ch, blocks=bl, attention_levels=(len(ch) - 1,), pos_channels=2 if position else 0)
    cfg = TrainConfig(size=size, batch=batch, steps=steps, lr=lr, decay_steps=decay_steps, n_val_subjects=val_subjects,
                      checkpoint_every=checkpoint_every, val_every=val_every, seed=seed, net=net.to_dict(),
                      intensity=intensity, patch_sizes=_ints(patch_sizes, "--patch-sizes") if patch_sizes else (),
                      full_prob=full_prob)
    trainer = run(data, out, cfg, covariates=covariates, resume=resume, progress=progress, device=device,
                  pixel_spacing=pixel_spacing)
    if trainer.rank == 0:
        console.print(f"[green]done[/]: step {trainer.step}, prior at {Path(out) / 'prior.safetensors'}")


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise MediffError(f"{name} takes comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise MediffError(f"{name} needs positive integers, got {text!r}")
    return vals


@app.command()
def sample(
    model: str = typer.Option("brain-t1", help="Built-in prior name or checkpoint path."),
    n: int = typer.Option(16, help="Number of images."),
    steps: int = typer.Option(50, help="Sampler steps."),
    sampler: str = typer.Option("heun", help="heun | ddim | ddpm | dpmpp2m | pc."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(..., help="Output folder."),
    age: Optional[float] = typer.Option(None, help="Condition on age (years), if the prior knows it."),
    sex: Optional[str] = typer.Option(None, help="Condition on sex (M/F), if the prior knows it."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance weight (1 = plain conditional)."),
    autoguidance: Optional[float] = typer.Option(
        None, metavar="W", help="Autoguidance weight: D_guide + W (D - D_guide) (arXiv 2406.02507); default: the "
        "weight the prior ships with its guide model, 1 = off."),
    guide: Optional[str] = typer.Option(None, metavar="NAME|PATH", help="Guide model for autoguidance: a weaker "
                                        "version of --model (e.g. an earlier checkpoint of its run)."),
    dicom: bool = typer.Option(False, "--dicom", help="Also write a DICOM series."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Draw synthetic images from a prior: PNG grid, NIfTI stack and NPZ (and DICOM with --dicom)."""
    from mediff.synthesis import sample_images, write_samples

    check_output(out, overwrite)
    images, meta = sample_images(model, n=n, steps=steps, sampler=sampler, seed=seed, age=age, sex=sex,
                                 guidance=guidance, autoguidance=autoguidance, guide=guide)
    with output_dir(out, overwrite) as tmp:
        write_samples(tmp, images, meta, dicom=dicom)
    if "note" in meta:
        console.print(f"[yellow]note:[/] {meta['note']}")
    console.print(f"[green]wrote[/] {n} samples to {out}")
