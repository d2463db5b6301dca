"""The ``reconstruct`` command: a thin layer from options to a ``recon.ReconRequest``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from mediff.cli.app import app, console
from mediff.cli.output import output_dir
from mediff.errors import MediffError
from mediff.recon.options import CTOptions, MRIOptions, ReconRequest, parse_slices

_MRI, _REQ = MRIOptions(), ReconRequest(input=Path())


@app.command()
def reconstruct(
    input: Path = typer.Option(..., "--input", help="Image or volume (NIfTI/DICOM file or series folder/PNG/NPY/"
                               "NPZ), fastMRI HDF5, NPZ with kspace+mask, (CT) NPZ with sinogram+angles_deg+"
                               "image_size, or a folder of such scans (a cohort: one output folder per scan "
                               "and cohort.json; a folder holding DICOM files is one series, not a cohort)."),
    out: Path = typer.Option(..., help="Output folder (created atomically; for a cohort, the folder of "
                              "one folder per scan, each created atomically)."),
    model: str = typer.Option(_REQ.model, help="Built-in prior name or checkpoint path."),
    solver: str = typer.Option(_REQ.solver, help="dds | ddnm | dps | mcg | langevin | zero-filled | tv | l1wavelet "
                               "(MRI) | fbp (CT)."),
    accel: float = typer.Option(_MRI.accel, help="MRI: acceleration when k-space is simulated or retrospectively "
                                "undersampled."),
    mask: str = typer.Option(_MRI.mask, help="MRI: random1d | equispaced1d | poisson2d | radial."),
    center_fraction: float = typer.Option(_MRI.center_fraction, help="MRI: fully-sampled centre fraction."),
    views: Optional[int] = typer.Option(None, help=f"CT: projection views simulated over 180 degrees (fan beam: "
                                        f"360; default {CTOptions.DEFAULT_VIEWS})."),
    limited_angle: Optional[float] = typer.Option(None, "--limited-angle", metavar="DEG",
                                                  help="CT: views only over [0, DEG) degrees (missing wedge)."),
    dose: Optional[float] = typer.Option(None, metavar="I0", help="CT: low dose, I0 photons per detector bin "
                                         "(Poisson noise); for a sinogram file, its I0 (noise model)."),
    geometry: Optional[str] = typer.Option(None, help="CT: parallel (default) | fan (flat detector, views over "
                                           "360 degrees)."),
    source_distance: Optional[float] = typer.Option(None, "--source-distance", metavar="MM", help="CT fan beam: "
                                                    f"source to isocentre (default {CTOptions.FAN_DISTANCES[0]:g})."),
    detector_distance: Optional[float] = typer.Option(None, "--detector-distance", metavar="MM", help="CT fan "
                                                      f"beam: isocentre to detector (default "
                                                      f"{CTOptions.FAN_DISTANCES[1]:g})."),
    steps: int = typer.Option(_REQ.steps, help="Sampler steps."),
    seed: int = typer.Option(_REQ.seed, help="Seed of mask and noise; a solver run over slices k.. draws its "
                             "sampler noise from seed + k."),
    samples: int = typer.Option(_REQ.samples, help="Posterior samples (>1 adds a std map and 90% coverage)."),
    noise: float = typer.Option(_MRI.noise, help="MRI: simulated k-space noise std, as a fraction of the image's "
                                "99.5th percentile."),
    coils: int = typer.Option(_MRI.coils, help="MRI: simulated coils for image input (1 = single-coil)."),
    slices: Optional[str] = typer.Option(None, "--slices", metavar="START:STOP", help="Slices of a volume or "
                                         "multi-slice k-space file to reconstruct, half-open as in Python (e.g. "
                                         "40:50, 40:, :10; default: all). The outputs cover only these slices, "
                                         "their affine moved to the first."),
    slice_index: Optional[int] = typer.Option(None, "--slice", help="One slice: the same as --slices K:K+1."),
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

    A volume (or multi-slice k-space file) is reconstructed slice by slice, all slices by default
    (--slices picks a range), several slices per solver batch; recon.nii.gz holds them on the input's
    voxel grid. --dicom writes a DICOM series (for a DICOM series input: each slice with its source
    slice's geometry, a new SeriesInstanceUID in the source's study). Under torchrun the processes
    split a cohort's scans (RANK / WORLD_SIZE); rank 0 writes cohort.json when all are done.

    CT mode when the prior is a CT prior (HU window), --views/--limited-angle/--dose is given, the
    solver is fbp, or the input is CT (sinogram/hu NPZ, DICOM Modality CT). CT outputs are in HU.
    """
    from mediff.recon import ALL_BASELINES, reconstruct as run
    from mediff.recon.cohort import is_cohort

    extra = tuple(c for c in compare.split(",") if c)
    if bad := [c for c in extra if c not in ALL_BASELINES]:
        raise MediffError(f"--compare takes baselines ({', '.join(ALL_BASELINES)}), got {', '.join(bad)}")
    if not input.exists():
        raise MediffError(f"input not found: {input}")
    if slices is not None and slice_index is not None:
        raise MediffError("give --slice K or --slices START:STOP, not both")
    if slice_index is not None and slice_index < 0:
        raise MediffError(f"--slice must be >= 0, got {slice_index}")
    chosen = parse_slices(slices) if slices is not None else None if slice_index is None else \
        (slice_index, slice_index + 1)
    req = ReconRequest(input=input, model=model, solver=solver, steps=steps, seed=seed, samples=samples,
                       slices=chosen, compare=extra, lam=lam, cg_iters=cg_iters, dicom=dicom,
                       command=" ".join(["mediff", *sys.argv[1:]]),
                       mri=MRIOptions(accel=accel, mask=mask, center_fraction=center_fraction, coils=coils,
                                      noise=noise),
                       ct=CTOptions(views=views, limited_angle=limited_angle, dose=dose, geometry=geometry,
                                    source_distance=source_distance, detector_distance=detector_distance))
    if is_cohort(input):
        _cohort(req, out, overwrite)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would write the same output folder
        raise MediffError("several processes (torchrun) split the scans of a folder; run one scan in one process")
    with output_dir(out, overwrite) as tmp:
        rec = run(req, tmp)
    if rec.get("ignored_options"):
        console.print(f"note: MRI options ignored in CT mode: {', '.join(rec['ignored_options'])}", highlight=False)
    print_metrics(rec["metrics"])
    console.print(f"[green]wrote[/] {out}/report.html")


def _cohort(req: ReconRequest, out: Path, overwrite: bool) -> None:
    """A folder of scans (``recon.cohort``): this process's share, and rank 0's summary."""
    from mediff.recon import reconstruct as run
    from mediff.recon.cohort import reconstruct_cohort

    rec = reconstruct_cohort(req, out, overwrite, run)
    if rec is None:  # not rank 0: rank 0 reports for the cohort
        return
    if rec["failed"]:
        first = next(s for s in rec["scans"] if s["status"] == "error")
        raise MediffError(f"{rec['failed']} of {len(rec['scans'])} scans failed (first: {first['scan']}: "
                          f"{first['error']}); all errors in {out}/cohort.json, the other scans in {out}")
    print_metrics(rec["metrics"])
    console.print(f"[green]wrote[/] {len(rec['scans'])} scans and {out}/cohort.json", highlight=False)


def print_metrics(rows: list[dict]) -> None:
    """One line per method of a metrics record."""
    for row in rows:
        console.print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      highlight=False)
