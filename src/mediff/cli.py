"""The ``mediff`` command line (typer + rich).

Every user-input problem surfaces as a ``MediffError``: one line on stderr, exit code 2, never a
traceback (``--debug`` shows it). Output folders are built in a temporary sibling and renamed into
place, so a failed command leaves nothing half-written; an existing output needs ``--overwrite``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console

from mediff import __version__
from mediff.errors import MediffError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Diffusion models for medical imaging: train, sample, reconstruct, evaluate, audit.")
console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"mediff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite (checked before any work is done)."""
    if Path(out).exists() and not overwrite:
        raise MediffError(f"{out} exists: pass --overwrite to replace it")


@contextmanager
def output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only if the body succeeds."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


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
    trainer = run(data, out, cfg, covariates=covariates, resume=resume, progress=progress, device=device)
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
    console.print(f"[green]wrote[/] {n} samples to {out}")


_MRI_DEFAULTS = {"--accel": 4.0, "--mask": "random1d", "--center-fraction": 0.08, "--coils": 1, "--noise": 0.0}


@app.command()
def reconstruct(
    input: Path = typer.Option(..., "--input", help="Image (NIfTI/DICOM/PNG/NPY/NPZ), fastMRI HDF5, NPZ with "
                               "kspace+mask, or (CT) NPZ with sinogram+angles_deg+image_size."),
    out: Path = typer.Option(..., help="Output folder (created atomically)."),
    model: str = typer.Option("brain-t1", help="Built-in prior name or checkpoint path."),
    solver: str = typer.Option("dds", help="dds | ddnm | dps | mcg | langevin | zero-filled | tv | l1wavelet (MRI) "
                               "| fbp (CT)."),
    accel: float = typer.Option(4.0, help="MRI: acceleration when k-space is simulated or retrospectively "
                                "undersampled."),
    mask: str = typer.Option("random1d", help="MRI: random1d | equispaced1d | poisson2d | radial."),
    center_fraction: float = typer.Option(0.08, help="MRI: fully-sampled centre fraction."),
    views: Optional[int] = typer.Option(None, help="CT: projection views simulated over 180 degrees (default 60)."),
    limited_angle: Optional[float] = typer.Option(None, "--limited-angle", metavar="DEG",
                                                  help="CT: views only over [0, DEG) degrees (missing wedge)."),
    dose: Optional[float] = typer.Option(None, metavar="I0", help="CT: low dose, I0 photons per detector bin "
                                         "(Poisson noise); for a sinogram file, its I0 (noise model)."),
    steps: int = typer.Option(50, help="Sampler steps."),
    seed: int = typer.Option(0, help="Seed of mask, noise and sampler."),
    samples: int = typer.Option(1, help="Posterior samples (>1 adds a std map and 90% coverage)."),
    noise: float = typer.Option(0.0, help="MRI: simulated k-space noise std, as a fraction of the image's 99.5th "
                                "percentile."),
    coils: int = typer.Option(1, help="MRI: simulated coils for image input (1 = single-coil)."),
    slice_index: Optional[int] = typer.Option(None, "--slice", help="Axial slice of a volume (default: middle)."),
    compare: str = typer.Option("zero-filled,tv", help="Baselines to run beside the solver (comma-separated; "
                                "CT always adds fbp, the other modality's baselines are skipped)."),
    lam: Optional[float] = typer.Option(None, help="Regularisation weight for tv/l1wavelet (default: tuned value; "
                                        "CT tv: relative to ||A||^2)."),
    cg_iters: Optional[int] = typer.Option(None, "--cg-iters", help="CG steps per data-consistency update of "
                                           "dds/ddnm/dps/mcg (default: tuned per operator; fewer is faster and "
                                           "less accurate)."),
    dicom: bool = typer.Option(False, "--dicom", help="Also write recon_dicom/ (CT in HU)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Reconstruct an undersampled MRI or sparse-view / limited-angle / low-dose CT scan with a diffusion
    prior; writes recon.nii.gz, metrics.json, report.html.

    CT mode when the prior is a CT prior (HU window), --views/--limited-angle/--dose is given, the
    solver is fbp, or the input is CT (sinogram/hu NPZ, DICOM Modality CT). CT outputs are in HU.
    """
    from mediff.recon import BASELINES, CT_BASELINES, reconstruct_file

    extra = tuple(c for c in compare.split(",") if c)
    known = dict.fromkeys([*BASELINES, *CT_BASELINES])
    bad = [c for c in extra if c not in known]
    if bad:
        raise MediffError(f"--compare takes baselines ({', '.join(known)}), got {', '.join(bad)}")
    if not input.exists():
        raise MediffError(f"input not found: {input}")
    given = {"--accel": accel, "--mask": mask, "--center-fraction": center_fraction, "--coils": coils, "--noise": noise}
    mri_options = tuple(k for k, v in given.items() if v != _MRI_DEFAULTS[k])
    with output_dir(out, overwrite) as tmp:
        rec = reconstruct_file(input, tmp, model, solver, accel, mask, center_fraction, steps, seed, samples, noise,
                               coils, slice_index, extra, lam, command=" ".join(["mediff", *sys.argv[1:]]),
                               views=views, limited_angle=limited_angle, dose=dose, dicom=dicom,
                               mri_options=mri_options, cg_iters=cg_iters)
    if rec.get("ignored_options"):
        console.print(f"note: MRI options ignored in CT mode: {', '.join(rec['ignored_options'])}", highlight=False)
    for row in rec["metrics"]:
        vals = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        console.print(vals, highlight=False)
    console.print(f"[green]wrote[/] {out}/report.html")


@app.command()
def demo(
    out: Path = typer.Option(Path("mediff-demo"), help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Reconstruct a real brain MR slice (MNI152 T1, shipped in nilearn) from 4x undersampled k-space."""
    from mediff.demo import run_demo

    run_demo(out, overwrite)


def main() -> None:
    """Entry point: run the app, turning user errors into one-line messages.

    Typer's standalone mode already prints usage errors in one line and exits 2 via SystemExit.
    """
    try:
        app()
    except MediffError as exc:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback for users
        if _state["debug"]:
            raise
        console.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for details)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)
