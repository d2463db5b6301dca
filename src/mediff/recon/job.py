"""The ``mediff reconstruct`` job: pick the modality, build the task, run the solver and the
baselines beside it, score, and write everything into one output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mediff import io, metrics
from mediff.errors import MediffError
from mediff.recon.ct import prepare_ct
from mediff.recon.mri import prepare_mri
from mediff.recon.options import ReconRequest
from mediff.recon.outputs import write_outputs
from mediff.recon.run import check_method, default_cg_iters, run_solver
from mediff.recon.task import Task
from mediff.solvers import SOLVERS

# Working grid of MRI baselines run without a prior.
MRI_BASELINE_SIZE = 128


def is_ct_input(path: Path) -> bool:
    """Whether the input is CT by its own account: an NPZ with ``sinogram`` or ``hu``, or a DICOM file /
    series whose Modality is CT (headers only; anything unreadable is left to the readers)."""
    try:
        fmt = io.detect_format(path)
        if fmt == "npz":
            with np.load(path) as z:
                return "sinogram" in z.files or "hu" in z.files
        if fmt in ("dicom", "dicom-series"):
            return io.dicom_modality(path) == "CT"
    except Exception:  # noqa: BLE001 - detection only; the reader reports the real problem
        return False
    return False


def _check_request(req: ReconRequest) -> None:
    if req.samples < 1 or req.steps < 1:
        raise MediffError("--samples and --steps must be positive")
    check_method(req.solver)
    if req.cg_iters is not None:
        with_cg = [k for k, v in SOLVERS.items() if v.guidance != "none"]
        if req.solver not in with_cg:
            raise MediffError(f"--cg-iters sets the data-consistency CG of {', '.join(with_cg)}, not {req.solver}")
        if req.cg_iters < 1:
            raise MediffError(f"--cg-iters must be >= 1, got {req.cg_iters}")


def prepare(req: ReconRequest, prior=None) -> Task:
    """The task of ``req.input``. CT when the prior's normalisation is a HU window, a CT option is
    given, the solver is fbp, or the input declares itself CT (``is_ct_input``); MRI otherwise. MRI
    options the user set are ignored with a note in CT mode."""
    path = Path(req.input)
    ct = (prior is not None and prior.meta.is_hu) or req.ct.given or req.solver == "fbp" or is_ct_input(path)
    if not ct:
        size = prior.image_size if prior is not None else MRI_BASELINE_SIZE
        return prepare_mri(path, size, req.mri, req.seed, req.slice_index)
    task = prepare_ct(path, prior.image_size if prior is not None else None, req.ct, req.seed,
                      normalization=None if prior is None else prior.meta.normalization, slice_index=req.slice_index,
                      prior_name=None if prior is None else prior.name)
    if ignored := req.mri.changed():
        task.notes.append(f"MRI options ignored for CT: {', '.join(ignored)}")
    return task


def reconstruct(req: ReconRequest, out_dir: Path) -> dict:
    """Run ``req`` and write recon NIfTI (+ zero-filled for MRI / fbp for CT), metrics.json and
    report.html (+ recon_dicom/ with ``req.dicom``) into ``out_dir`` (which the caller creates
    atomically). Returns the metrics record."""
    from mediff import __version__
    from mediff.prior import load_prior
    from mediff.synthesis import progress_callback

    _check_request(req)
    prior = load_prior(req.model) if req.solver in SOLVERS else None
    task = prepare(req, prior)
    if req.solver not in SOLVERS:
        task.check_baseline(req.solver)
    cg = (default_cg_iters(task, req.solver) if req.cg_iters is None else req.cg_iters) \
        if req.solver in SOLVERS else None
    with progress_callback(req.steps, f"{req.solver} {task.summary}") as cb:
        res = run_solver(task, req.solver, prior, req.steps, req.seed, req.samples, req.lam,
                         progress=cb if req.solver in SOLVERS else None, cg_iters=cg)
    rows = [{"method": req.solver, **task.score(res.mean), "NFE": res.nfe, "seconds": round(res.seconds, 2)}]
    others = {req.solver: res}
    # Baselines of the other modality in ``compare`` are skipped; CT always lists FBP, MRI computes the
    # zero-filled image for its output file without a row unless asked.
    listed = [c for c in req.compare if c in task.baselines] + ([task.companion] if task.kind == "ct" else [])
    for name in dict.fromkeys(listed + [task.companion]):
        if name not in others:
            others[name] = r = run_solver(task, name)
            if name in listed:
                rows.append({"method": name, **task.score(r.mean), "NFE": 0, "seconds": round(r.seconds, 2)})
    record = {"solver": req.solver, "modality": task.kind, "model": None if prior is None else prior.name,
              "nfe": res.nfe, "seconds": round(res.seconds, 3), "metrics": rows, "notes": task.notes,
              "problem": task.info, "units": task.units, "seed": req.seed, "samples": req.samples,
              "steps": req.steps, "cg_iters": cg, "mediff": __version__, "command": req.command}
    if task.kind == "ct" and req.mri.changed():
        record["ignored_options"] = list(req.mri.changed())
    if res.std is not None and task.reference is not None:
        record["coverage90"] = float(metrics.coverage(res.samples, task.reference, level=0.9)[0])
    path = Path(req.input)
    write_outputs(Path(out_dir), task, res, others[task.companion], record, dicom=req.dicom,
                  dicom_reference=path if io.detect_format(path) == "dicom" else None)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(record, indent=2))
    return record
