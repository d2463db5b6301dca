"""A cohort: ``mediff reconstruct --input DIR`` on a folder of scans, one output folder per scan and a
summary (cohort.json), split over the processes of a ``torchrun`` launch.

What is a scan: a folder that directly holds DICOM files is one scan (a series), never a cohort.
Any other folder is a cohort; its scans are its files in a format ``mediff reconstruct`` reads
(NIfTI, DICOM file, PNG/TIFF, NPY/NPZ, HDF5) and its subfolders that hold DICOM files (one series
each). Hidden entries are skipped and nothing deeper is searched.

Processes: under torchrun the ranks split the sorted scans statically (scan i goes to rank
i mod WORLD_SIZE); gloo barriers order the start (output checked, then created) and the end (rank 0
merges the ranks' records into cohort.json once all have finished).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from mediff import io
from mediff.errors import MediffError
from mediff.io.image import path_suffix
from mediff.recon.options import ReconRequest

SCAN_FORMATS = ("nifti", "dicom", "png", "tiff", "npy", "npz", "hdf5")


def is_cohort(path: Path) -> bool:
    """Whether ``path`` is a folder of scans rather than one scan (module docstring)."""
    return Path(path).is_dir() and not io.holds_dicom(path)


def scans(folder: Path) -> list[tuple[str, Path]]:
    """(name, path) of each scan in ``folder``, sorted by name; the name (the file name without its
    format suffix) is the scan's output folder. MediffError when there is none or two share a name."""
    found: dict[str, Path] = {}
    for entry in sorted(Path(folder).iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not io.holds_dicom(entry):
                continue
            name = entry.name
        else:
            try:
                fmt = io.detect_format(entry)
            except MediffError:  # not a format mediff reads (a note, a previous cohort.json): not a scan
                continue
            if fmt not in SCAN_FORMATS:
                continue
            name = entry.name[: len(entry.name) - len(path_suffix(entry))] or entry.name
        if name in found:
            raise MediffError(f"{folder}: scans {found[name].name} and {entry.name} would share the output folder "
                              f"{name}/; rename one")
        found[name] = entry
    if not found:
        raise MediffError(f"no scans in {folder}: expected image or k-space files (NIfTI, DICOM, PNG, TIFF, NPY, "
                          "NPZ, HDF5) or folders of DICOM files")
    return sorted(found.items())


class _Group:
    """The processes of a torchrun launch (a gloo group) or this process alone."""

    def __init__(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.world = int(os.environ.get("RANK", "0")), world
        self.dist = None
        if world > 1:
            if "MASTER_ADDR" not in os.environ:
                raise MediffError("WORLD_SIZE > 1 but no MASTER_ADDR: launch several processes with torchrun")
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            self.dist = dist

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()


def reconstruct_cohort(req: ReconRequest, out: Path, overwrite: bool,
                       run: Callable[[ReconRequest, Path], dict]) -> dict | None:
    """Reconstruct every scan of the folder ``req.input`` into ``out/<scan>/`` with ``run`` (a request
    and an output folder -> the metrics record; it writes the folder atomically), this process taking
    its share of the scans. Rank 0 writes ``out/cohort.json`` after all ranks finish and returns its
    record (other ranks: None). A scan whose input is bad is listed with its error and the others go
    on; MediffError at the end names how many failed. ``out`` must not exist unless ``overwrite``
    (then it is replaced) or it is an empty folder."""
    from mediff.cli.output import check_output

    listed = scans(Path(req.input))
    group = _Group()
    check_output(out, overwrite)
    group.barrier()  # every rank has checked before rank 0 touches ``out``
    if group.rank == 0:
        if out.exists() and overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True, exist_ok=True)
    group.barrier()
    mine = [_one_scan(req, name, path, out, run, group.rank) for name, path in listed[group.rank:: group.world]]
    (out / f".rank{group.rank}.json").write_text(json.dumps(mine))
    group.barrier()  # every rank's scans are written
    if group.rank != 0:
        return None
    rows = [row for r in range(group.world) for row in json.loads((out / f".rank{r}.json").read_text())]
    for r in range(group.world):
        (out / f".rank{r}.json").unlink()
    record = _summary(req, sorted(rows, key=lambda row: row["scan"]), group.world)
    io.atomic_write(out / "cohort.json", True, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    return record


def _one_scan(req: ReconRequest, name: str, path: Path, out: Path, run: Callable[[ReconRequest, Path], dict],
              rank: int) -> dict:
    """One scan's row of cohort.json: its volume metrics, or the one-line error that stopped it."""
    from mediff.cli.output import output_dir

    row: dict = {"scan": name, "input": str(path), "output": name, "rank": rank}
    try:
        with output_dir(out / name, False) as tmp:
            rec = run(replace(req, input=path), tmp)
    except MediffError as exc:
        return {**row, "status": "error", "error": str(exc)}
    return {**row, "status": "ok", "metrics": rec["metrics"], "slices": rec["slices"], "seconds": rec["seconds"]}


def _summary(req: ReconRequest, rows: list[dict], world: int) -> dict:
    """cohort.json: each scan's row, and per method the mean of each metric over the scans that have it."""
    from mediff import __version__

    done = [r for r in rows if r["status"] == "ok"]
    mean: list[dict] = []
    for method in dict.fromkeys(m["method"] for r in done for m in r["metrics"]):
        per = [m for r in done for m in r["metrics"] if m["method"] == method]
        keys = [k for k in per[0] if k not in ("method", "NFE", "seconds") and all(k in m for m in per)]
        mean.append({"method": method, "scans": len(per), **{k: float(np.mean([m[k] for m in per])) for k in keys}})
    return {"input": str(req.input), "solver": req.solver, "model": req.model, "seed": req.seed, "steps": req.steps,
            "command": req.command, "mediff": __version__, "processes": world, "scans": rows,
            "failed": len(rows) - len(done), "metrics": mean}
