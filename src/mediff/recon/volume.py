"""The slices of one job: which ones are reconstructed (``--slices``), how they share solver runs, and
how their images stack back into volumes on the input's grid.

A 2D image is a volume of one slice, so every job goes through here: a slice's task, solver run,
metrics and output are the same whether it is reconstructed alone or with its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import Tensor

from mediff.errors import MediffError
from mediff.recon.grid import stack_on_input_grid
from mediff.recon.run import ReconResult, batchable
from mediff.recon.task import Task

# Images (slices x samples) per solver run. Batching the network over slices beat one run per slice
# on CPU, and 8 beat 16 (benchmarks/slice_batch.py); a bounded batch also keeps memory flat for any
# volume.
BATCH_IMAGES = 8

def chosen_slices(spec: tuple[int | None, int | None] | None, n: int, what: str = "slices") -> range:
    """The slice indices of ``spec`` (None: all ``n``), a non-empty range within [0, n)."""
    if spec is None:
        return range(n)
    a = 0 if spec[0] is None else spec[0]
    b = n if spec[1] is None else spec[1]
    if not 0 <= a < b <= n:
        raise MediffError(f"--slices {'' if spec[0] is None else spec[0]}:{'' if spec[1] is None else spec[1]} "
                          f"is not a non-empty range within 0:{n}: the input has {n} {what}")
    return range(a, b)


def chunks(indices: range, samples: int) -> list[range]:
    """``indices`` cut into consecutive runs of at most BATCH_IMAGES // samples slices (at least 1)."""
    size = max(1, BATCH_IMAGES // samples)
    return [indices[i: i + size] for i in range(0, len(indices), size)]


def groups(tasks: list[Task]) -> list[list[int]]:
    """Positions of ``tasks`` in consecutive groups of tasks that can share a solver run (``batchable``)."""
    out: list[list[int]] = []
    for i, t in enumerate(tasks):
        if out and batchable(tasks[out[-1][0]], t):
            out[-1].append(i)
        else:
            out.append([i])
    return out


@dataclass
class SliceRun:
    """One reconstructed slice: its index in the input, its task, the solver's result, the companion
    baseline's result (``Task.companion``), the metric rows (one per method) and the 90% coverage of
    the posterior samples (None: one sample or no reference)."""

    index: int
    task: Task
    result: ReconResult
    companion: ReconResult
    rows: list[dict]
    coverage90: float | None = None


def stack(runs: list[SliceRun], image: Callable[[SliceRun], Tensor], shift: bool = True
          ) -> tuple[np.ndarray, np.ndarray]:
    """The images ``image(run)`` (1, 1, H, W), normalised, of consecutive slices as one array in input
    units and its 4x4 affine: on the input's voxel grid (the chosen slices only, the affine moved to
    the first of them). Inputs without a voxel grid of their own (k-space files, numpy stacks): one
    slice as (H, W), several as (H, W, slices), the affine's third column stepping through them from
    the first chosen slice.
    ``shift=False`` for differences such as a posterior std (``Task.input_units``)."""
    first = runs[0].task
    if first.grid is not None and len(runs) == 1:
        return first.on_input_grid(image(runs[0]), shift)
    slices = [r.task.input_units(image(r), shift) for r in runs]
    if first.grid is not None:
        return stack_on_input_grid([r.task.grid for r in runs], slices)
    affine = np.array(first.affine, dtype=np.float64)
    affine[:3, 3] += runs[0].index * affine[:3, 2]
    return (slices[0] if len(slices) == 1 else np.stack(slices, axis=-1)), affine


def dicom_stack(runs: list[SliceRun], image: Callable[[SliceRun], Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols, slices) in input units and the affine of a DICOM series of the images. When the
    slices lie along the input's last voxel axis (a DICOM series, an axial NIfTI), the input's own
    grid: each written slice has the geometry of the source slice (position, orientation, spacing).
    Inputs without a voxel grid: as ``stack`` places them. Otherwise the slices as reconstructed,
    each with its world geometry."""
    first = runs[0].task
    if first.grid is None or first.grid.input_axis == 2:
        volume, affine = stack(runs, image)
        return np.atleast_3d(volume), affine
    affine = np.array(first.affine, dtype=np.float64)  # the first slice's: its third column steps to the next
    return np.stack([r.task.input_units(image(r)) for r in runs], axis=-1), affine


def shown_slices(n: int) -> list[int]:
    """Positions (into n slices) the report shows: the quartiles and the middle, each once."""
    return sorted({n // 4, n // 2, (3 * n) // 4}) if n > 2 else list(range(n))


def common(items: list[dict]) -> tuple[dict, list[dict]]:
    """(the entries every dict shares, each dict's other entries)."""
    shared = {k: v for k, v in items[0].items() if all(k in d and _same(d[k], v) for d in items[1:])}
    return shared, [{k: v for k, v in d.items() if k not in shared} for d in items]


def _same(a: object, b: object) -> bool:
    try:
        return bool(np.all(a == b)) if not isinstance(a, (dict, list, tuple)) else a == b
    except (TypeError, ValueError):
        return False


def volume_rows(runs: list[SliceRun]) -> list[dict]:
    """One row per method over all slices: the mean of each metric every slice has, the NFE, and the
    summed seconds (the job's time in that method)."""
    rows = []
    for i, row in enumerate(runs[0].rows):
        per = [r.rows[i] for r in runs]
        out: dict = {"method": row["method"]}
        for key in row:
            if key in ("method", "NFE", "seconds"):
                continue
            if all(key in p for p in per):
                out[key] = float(np.mean([p[key] for p in per]))
        out["NFE"] = row["NFE"]
        out["seconds"] = round(sum(p["seconds"] for p in per), 2)
        rows.append(out)
    return rows
