"""The ``mediff reconstruct`` job: pick the modality, build the chosen slices' tasks, run the solver
(batched over slices) and the baselines beside it, score, and write everything into one output
folder."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from mediff import io, metrics
from mediff.errors import MediffError
from mediff.prior_meta import spacing_text
from mediff.recon.ct import ct_source
from mediff.recon.mri import mri_source
from mediff.recon.options import ReconRequest
from mediff.recon.outputs import write_outputs
from mediff.recon.run import ReconResult, check_method, default_cg_iters, run_batch, run_solver
from mediff.recon.task import SliceSource, Task
from mediff.recon.volume import SliceRun, chosen_slices, chunks, common, groups, volume_rows
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


def slice_source(req: ReconRequest, prior=None) -> SliceSource:
    """The slices of ``req.input``. CT when the prior's normalisation is a HU window, a CT option is
    given, the solver is fbp, or the input declares itself CT (``is_ct_input``); MRI otherwise. MRI
    options the user set are ignored with a note in CT mode."""
    path = Path(req.input)
    ct = (prior is not None and prior.meta.is_hu) or req.ct.given or req.solver == "fbp" or is_ct_input(path)
    if not ct:
        source = mri_source(path, prior.image_size if prior is not None else MRI_BASELINE_SIZE, req.mri, req.seed)
        ignored: tuple[str, ...] = ()
    else:
        source = ct_source(path, prior.image_size if prior is not None else None, req.ct, req.seed,
                           normalization=None if prior is None else prior.meta.normalization,
                           prior_name=None if prior is None else prior.name)
        ignored = req.mri.changed()
    trained = None if prior is None else prior.meta.data.pixel_spacing_mm
    if not ignored and trained is None:
        return source

    def build(k: int) -> Task:
        task = source.build(k)
        if ignored:
            task.notes.append(f"MRI options ignored for CT: {', '.join(ignored)}")
        if trained is not None and (note := scale_note(task.info.get("pixel_size_mm"), trained, prior.name)):
            task.notes.append(note)
        return task

    return SliceSource(source.n, build, source.what)


SCALE_TOLERANCE = 1.25  # a working pixel this much outside the prior's trained range gets a warning


def scale_note(pixel_mm: float | None, trained: tuple[float, float] | None, name: str) -> str | None:
    """A warning when the working grid's pixel (mm) lies outside the range of pixel sizes the prior
    learnt (``PriorMeta.data.pixel_spacing_mm``) by more than SCALE_TOLERANCE: a network learns
    anatomy at a scale, and structures shown at another size are not what it learnt. None when
    either is unknown or they agree."""
    if pixel_mm is None or trained is None:
        return None
    lo, hi = trained
    if lo / SCALE_TOLERANCE <= pixel_mm <= hi * SCALE_TOLERANCE:
        return None
    size = lo / pixel_mm if pixel_mm < lo else hi / pixel_mm
    return (f"warning: the working grid's pixel is {pixel_mm:.3g} mm, but {name} learnt from {spacing_text(trained)} mm "
            f"pixels: anatomy appears at {size:.2g}x the size it learnt, so the prior may not fit this scan")


def reconstruct(req: ReconRequest, out_dir: Path) -> dict:
    """Run ``req`` on the chosen slices (``req.slices``, default all) and write the recon volume (+
    zero-filled for MRI / fbp for CT, std with samples), metrics.json and report.html (+ recon_dicom/
    with ``req.dicom``) into ``out_dir`` (which the caller creates atomically). Returns the metrics
    record."""
    from mediff.prior import load_prior
    from mediff.synthesis import progress_callback

    _check_request(req)
    prior = load_prior(req.model) if req.solver in SOLVERS else None
    source = slice_source(req, prior)
    indices = chosen_slices(req.slices, source.n, source.what)
    steps = req.steps if req.solver in SOLVERS else 1
    label = f"{req.solver}, {len(indices)} of {source.n} {source.what}"
    runs: list[SliceRun] = []
    with progress_callback(len(indices) * steps, label) as cb:
        for chunk in chunks(indices, req.samples):
            runs += _run_chunk(req, prior, source, chunk, cb)
    record = _record(req, prior, runs, source)
    path = Path(req.input)
    fmt = io.detect_format(path)
    write_outputs(Path(out_dir), runs, record, dicom=req.dicom,
                  dicom_reference=path if fmt == "dicom" else io.first_dicom(path) if fmt == "dicom-series" else None)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(record, indent=2))
    return record


def _cg_iters(req: ReconRequest, task: Task) -> int | None:
    if req.solver not in SOLVERS:
        return None
    return default_cg_iters(task, req.solver) if req.cg_iters is None else req.cg_iters


def _run_chunk(req: ReconRequest, prior, source: SliceSource, chunk: range, progress: Callable) -> list[SliceRun]:
    """Build and solve the slices ``chunk``: batchable neighbours share a solver run, whose sampler
    noise is drawn from ``req.seed`` plus the run's first slice index (runs never share noise); the
    baselines run per slice."""
    tasks = [source.build(k) for k in chunk]
    if req.solver not in SOLVERS:
        tasks[0].check_baseline(req.solver)
    runs = []
    for group in groups(tasks):
        members = [tasks[i] for i in group]
        if req.solver in SOLVERS:
            results = run_batch(members, req.solver, prior, req.steps, req.seed + chunk[group[0]], req.samples,
                                progress=partial(progress, advance=len(group)), cg_iters=_cg_iters(req, members[0]))
        else:
            results = [run_solver(t, req.solver, lam=req.lam) for t in members]
            progress(0, None, None, advance=len(group))
        runs += [_score(req, chunk[i], t, r) for i, t, r in zip(group, members, results)]
    return runs


def _score(req: ReconRequest, index: int, task: Task, res: ReconResult) -> SliceRun:
    """Slice ``index``'s run: the baselines beside the solver and the metric rows of all."""
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
    cover = None
    if res.std is not None and task.reference is not None:
        cover = float(metrics.coverage(res.samples, task.reference, level=0.9)[0])
    return SliceRun(index, task, res, others[task.companion], rows, cover)


def _record(req: ReconRequest, prior, runs: list[SliceRun], source: SliceSource) -> dict:
    """metrics.json: the volume's mean row per method (``metrics``), and per slice its rows and
    whatever of its notes and problem differs from the other slices (``per_slice``)."""
    from mediff import __version__

    task, res = runs[0].task, runs[0].result
    # A note every slice has (how data were simulated, the grid) is the job's; the others (a slice's
    # index, its noise estimate) are the slice's. Notes as dict keys: ``common`` compares entries.
    notes, slice_notes = common([dict.fromkeys(r.task.notes) for r in runs])
    problem, slice_problems = common([r.task.info for r in runs])
    a, b = runs[0].index, runs[-1].index + 1
    notes = list(notes)
    if len(runs) > 1:
        notes.insert(0, f"{source.what} {a}:{b} of {source.n} reconstructed; the outputs cover these slices "
                        "(per-slice figures in metrics.json)")
    record = {"solver": req.solver, "modality": task.kind, "model": None if prior is None else prior.name,
              "nfe": res.nfe, "seconds": round(sum(r.result.seconds for r in runs), 3),
              "metrics": volume_rows(runs), "notes": notes, "problem": problem, "units": task.units,
              "seed": req.seed, "samples": req.samples, "steps": req.steps, "cg_iters": _cg_iters(req, task),
              "mediff": __version__, "command": req.command, "slices": [a, b], "input_slices": source.n}
    if task.kind == "ct" and req.mri.changed():
        record["ignored_options"] = list(req.mri.changed())
    covers = [r.coverage90 for r in runs if r.coverage90 is not None]
    if covers:
        record["coverage90"] = float(np.mean(covers))
    record["per_slice"] = [{"slice": r.index, "metrics": r.rows, "notes": list(n), "problem": p,
                            **({} if r.coverage90 is None else {"coverage90": r.coverage90})}
                           for r, n, p in zip(runs, slice_notes, slice_problems)]
    return record
