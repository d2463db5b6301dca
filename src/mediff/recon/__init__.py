"""Reconstruction: one trained prior solves the imaging inverse problem of a user's file.

Layout: ``options`` (what a user asks: ``MRIOptions``, ``CTOptions``, ``ReconRequest``), ``task``
(the ``Task`` every method works on, one per slice), ``mri`` / ``ct`` (each modality's task and how
files become slices of tasks), ``grid`` (input grid <-> working grid), ``policy`` (tuned CG steps
and baseline weights), ``run`` (a solver or baseline on a task, a solver on a batch of tasks),
``volume`` (chosen slices, batches, stacking slices back into volumes), ``outputs`` (NIfTI, DICOM,
report) and ``job`` (the ``mediff reconstruct`` job).

Names load lazily, so that the CLI can read ``options`` without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ALL_BASELINES": "run", "ReconResult": "run", "run_solver": "run",
    "CTOptions": "options", "MRIOptions": "options", "ReconRequest": "options",
    "CTTask": "ct", "prepare_ct": "ct", "simulate_ct": "ct",
    "MRITask": "mri", "prepare_mri": "mri", "simulate_mri": "mri",
    "SliceSource": "task", "Task": "task", "reconstruct": "job", "slice_source": "job",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mediff.recon' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mediff.recon.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
