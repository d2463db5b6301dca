"""What a reconstruction job writes: volumes of the reconstructed slices in the input's units and grid
(NIfTI, optional DICOM series) and the self-contained HTML report (a few representative slices)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from mediff import io
from mediff.recon.volume import SliceRun, dicom_stack, shown_slices, stack
from mediff.report import Panel, write_report


def write_outputs(out: Path, runs: list[SliceRun], record: dict, dicom: bool = False,
                  dicom_reference: Path | None = None) -> None:
    """recon.nii.gz, the companion baseline (zero_filled / fbp .nii.gz), std.nii.gz, recon_dicom/ and
    report.html into ``out``, for the reconstructed slices ``runs`` (consecutive). NIfTI/DICOM are in
    input units (CT: HU); NIfTI on the input's voxel grid (``volume.stack``), DICOM as a series
    (``volume.dicom_stack``) joining ``dicom_reference``'s study."""
    task = runs[0].task
    io.write_nifti(out / "recon.nii.gz", *stack(runs, lambda r: r.result.mean))
    io.write_nifti(out / f"{task.companion.replace('-', '_')}.nii.gz", *stack(runs, lambda r: r.companion.mean))
    if runs[0].result.std is not None:
        io.write_nifti(out / "std.nii.gz", *stack(runs, lambda r: r.result.std, shift=False))
    if dicom:
        volume, affine = dicom_stack(runs, lambda r: r.result.mean)
        io.write_dicom(out / "recon_dicom", np.asarray(volume, dtype=np.float32), modality=task.dicom_modality,
                       affine=affine, reference=dicom_reference, series_description=f"mediff {record['solver']}")
    meta = {k: record[k] for k in ("command", "model", "seed", "steps", "mediff")}
    shown = [runs[i] for i in shown_slices(len(runs))]
    panels = [p for r in shown for p in report_panels(r, record, f"slice {r.index}: " if len(runs) > 1 else "")]
    notes = [*record["notes"], f"metrics: {record['units']}"]  # which grid the table's figures are on
    write_report(out / "report.html", task.title, panels, record["metrics"], notes, meta)


def report_panels(run: SliceRun, record: dict, prefix: str = "") -> list[Panel]:
    """One slice's figures on the working grid, in the task's display units, titles after ``prefix``:
    reference, result, companion baseline, the measurement, |error| maps and the posterior std."""
    task, res, comp = run.task, run.result, run.companion
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
        cover = float("nan") if run.coverage90 is None else run.coverage90
        panels.append(Panel(f"posterior std ({record['samples']} samples)", task.shown_std(res.std), kind="uncertainty",
                            caption=f"90% interval coverage {cover:.3f}"))
    return [replace(p, title=prefix + p.title) for p in panels]
