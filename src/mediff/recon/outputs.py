"""What a reconstruction job writes: images in the input's units and grid (NIfTI, optional DICOM)
and the self-contained HTML report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mediff import io
from mediff.recon.run import ReconResult
from mediff.recon.task import Task
from mediff.report import Panel, write_report


def write_outputs(out: Path, task: Task, res: ReconResult, comp: ReconResult, record: dict, dicom: bool = False,
                  dicom_reference: Path | None = None) -> None:
    """recon.nii.gz, the companion baseline (zero_filled / fbp .nii.gz), std.nii.gz, recon_dicom/ and
    report.html into ``out``. NIfTI/DICOM are in input units (CT: HU); NIfTI on the input's voxel grid
    (its voxel order and affine), DICOM as a slice with its world geometry."""
    io.write_nifti(out / "recon.nii.gz", *task.on_input_grid(res.mean))
    io.write_nifti(out / f"{task.companion.replace('-', '_')}.nii.gz", *task.on_input_grid(comp.mean))
    if res.std is not None:
        io.write_nifti(out / "std.nii.gz", *task.on_input_grid(res.std, shift=False))
    if dicom:
        recon = task.input_units(res.mean)
        io.write_dicom(out / "recon_dicom", np.asarray(recon, dtype=np.float32)[..., None],
                       modality=task.dicom_modality, affine=task.affine, reference=dicom_reference,
                       series_description=f"mediff {record['solver']}")
    meta = {k: record[k] for k in ("command", "model", "seed", "steps", "mediff")}
    write_report(out / "report.html", task.title, report_panels(task, res, comp, record), record["metrics"],
                 task.notes, meta)


def report_panels(task: Task, res: ReconResult, comp: ReconResult, record: dict) -> list[Panel]:
    """The report's figures on the working grid, in the task's display units: reference, result,
    companion baseline, the measurement, |error| maps and the posterior std."""
    lo, hi = task.display_range(res.mean)
    solver, companion = record["solver"], task.companion
    panels = []
    if task.reference is not None:
        panels.append(Panel("reference", task.shown(task.reference), vmin=lo, vmax=hi))
    panels += [Panel(f"{solver} (NFE {res.nfe})", task.shown(res.mean), vmin=lo, vmax=hi),
               Panel(companion, task.shown(comp.mean), vmin=lo, vmax=hi), *task.data_panels()]
    if task.reference is not None:
        ref = task.shown(task.reference)
        err = task.error_fraction * (hi - lo)
        panels += [Panel(f"|error| {solver}", np.abs(task.shown(res.mean) - ref), kind="error", vmin=0, vmax=err),
                   Panel(f"|error| {companion}", np.abs(task.shown(comp.mean) - ref), kind="error", vmin=0, vmax=err)]
    if res.std is not None:
        panels.append(Panel(f"posterior std ({record['samples']} samples)", task.shown_std(res.std), kind="uncertainty",
                            caption=f"90% interval coverage {record.get('coverage90', float('nan')):.3f}"))
    return panels
