"""MRI reconstruction of measured complex k-space (real phase, real noise): every solver and baseline
side by side, scored on the scan's own grid against the fully-sampled image (RSS for multi-coil).

Cases (fully-sampled k-space written as fastMRI-style HDF5 and read back through the CLI's reader,
``recon.prepare_mri``, then undersampled retrospectively, 1D random, 8 % centre):

- ``kellman``: real single-coil complex images with their true phase (P. Kellman, NIH; 1.5 T
  multi-echo GRE, cardiac/abdominal, not brain; the first echo of each ``kellman_PKdata*.mat``), at
  their own grid (256 x 192 or so). Credit as in ``../shared/data/real_mri/README.md``.
- ``alias8ch``: the real 8-coil brain k-space of ``brain_alias_8ch.mat`` (ESPIRiT demo, M. Lustig),
  its fully-sampled central 160 x 128 (the acquisition left the outer phase-encode lines empty). The
  object wraps along the phase-encode direction, which one set of SENSE maps cannot model.
- ``ixi+phase``: IXI tuning-subject magnitude slices (the prior's validation subjects kept for
  tuning) times real phase maps (Kellman images, low-pass filtered to 128 px), 8 simulated coils,
  noise 0.5 % of the 99.5th percentile: brain anatomy with real-looking phase, simulated coils.
- ``--kspace FILE ...``: any fully-sampled HDF5 (``kspace`` (C, H, W) or (S, C, H, W), middle slice).

``prepare_s``: seconds to read the file and set the problem up (coil maps, noise, the phase's TV
reconstruction), which ``mediff reconstruct`` spends before any method; ``seconds``: the method (the
TV baseline of measured k-space is that set-up reconstruction, so its own seconds are ~0).

The phase the solvers reconstruct through is compared on ``--phase-methods``: the pipeline's
(``recon.mri.data_phase``, rows named by the solver), the fully-sampled centre's low-resolution
phase (``solver/centre-phase``, the previous design) and the fully-sampled image's phase
(``solver/oracle-phase``, a diagnosis only: it needs the reference). ``true-maps`` (``ixi+phase``
only, whose coils are simulated) replaces the ESPIRiT maps estimated from the data with the true
sensitivities, the phase again from the pipeline: the cost of estimating the maps.

    python benchmarks/mri_real.py --data ../shared/data --accels 4,8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import scipy.io as sio
import torch
import torch.nn.functional as F
from PIL import Image

from common import RESULTS, machine, write_table
from mri import tuning_slices
from mediff.physics.mri import MultiCoilMRI, fft2c, ifft2c, lowres_phase, simulate_coil_maps, simulate_kspace, \
    unit_phase
from mediff.physics.operators import Composed
from mediff.prior import load_prior
from mediff.recon import MRIOptions, MRITask, prepare_mri, run_solver
from mediff.recon.mri import calib_region, data_phase
from mediff.solvers import SOLVERS

REAL_MRI = "real_mri"
PHASE_LOWPASS = 16  # half-width (k-space lines at 128 px) of the triangular window on the phase maps
IXI_NOISE = 0.005


def _family(case: str) -> str:
    """A case's family: its name without the index (``kellman3`` -> ``kellman``)."""
    return case.rstrip("0123456789")


def _write_h5(path: Path, kspace: np.ndarray, true_maps: np.ndarray | None = None) -> Path:
    """A fastMRI-style file; ``true_maps`` (C, H, W), the simulated coils' sensitivities, go in a
    dataset of their own that only this benchmark reads (the ``true-maps`` variant)."""
    with h5py.File(path, "w") as f:
        f["kspace"] = kspace.astype(np.complex64)
        if true_maps is not None:
            f["true_coil_maps"] = true_maps.astype(np.complex64)
    return path


def _kellman_images(data: Path) -> list[np.ndarray]:
    """First echo (H, W) complex of each Kellman file."""
    out = []
    for p in sorted((data / REAL_MRI).glob("kellman_PKdata*.mat")):
        im = np.asarray(sio.loadmat(p, squeeze_me=True, struct_as_record=False)["data"].images)
        out.append(im.reshape(im.shape[0], im.shape[1], -1)[..., 0])
    return out


def kellman_cases(data: Path, tmp: Path) -> list[tuple[str, Path]]:
    cases = []
    for i, im in enumerate(_kellman_images(data)):
        k = fft2c(torch.from_numpy(im.astype(np.complex64))[None, None])[0].numpy()
        cases.append((f"kellman{i + 1}", _write_h5(tmp / f"kellman{i + 1}.h5", k)))
    return cases


def alias_case(data: Path, tmp: Path) -> list[tuple[str, Path]]:
    d = np.transpose(sio.loadmat(data / REAL_MRI / "brain_alias_8ch.mat")["DATA"], (2, 0, 1))  # (8, 320, 256)
    h, w = d.shape[1:]
    return [("alias8ch", _write_h5(tmp / "alias8ch.h5", d[:, h // 2 - 80: h // 2 + 80, w // 2 - 64: w // 2 + 64]))]


def _phase_map(im: np.ndarray, size: int) -> torch.Tensor:
    """Unit phase (size, size) of a complex image resized to ``size`` and low-pass filtered."""
    z = torch.from_numpy(im.astype(np.complex64))
    zz = F.interpolate(torch.stack([z.real, z.imag])[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    r = (torch.arange(size) - size // 2).abs().float()
    tri = torch.clamp(1 - r / PHASE_LOWPASS, 0)
    return unit_phase(ifft2c(fft2c(torch.complex(zz[0], zz[1])[None, None]) * (tri[:, None] * tri[None, :]))[0, 0])


def ixi_phase_cases(prior, data: Path, tmp: Path, n: int) -> list[tuple[str, Path]]:
    imgs, _ = tuning_slices(prior, data, n)
    phases = _kellman_images(data)
    cases = []
    for i, im in enumerate(imgs):
        ph = _phase_map(phases[i % len(phases)], im.shape[0])
        x = (torch.from_numpy(im) * ph)[None, None].to(torch.complex64)
        maps = simulate_coil_maps(im.shape, 8, seed=i)
        full = simulate_kspace(x, np.ones(im.shape, bool), coil_maps=maps,
                               noise_sigma=IXI_NOISE * float(np.percentile(im, 99.5)),
                               generator=torch.Generator().manual_seed(i))
        cases.append((f"ixi+phase{i + 1}", _write_h5(tmp / f"ixi{i + 1}.h5", full[0].numpy(), maps.numpy())))
    return cases


def _on_working_grid(task: MRITask, phase_of) -> torch.Tensor:
    """``phase_of(sense_op)``, a phase (1, 1, h, w) on the scan's grid computed with the task's SENSE
    operator, brought onto the working grid (1 where ``prepare_mri`` padded the scan's grid)."""
    sense, crop = (task.op.outer, task.op.inner_op) if isinstance(task.op, Composed) else (task.op, None)
    phase = phase_of(sense)
    return phase if crop is None else unit_phase(crop.AH(phase))


def centre_phase(task: MRITask) -> torch.Tensor:
    """The previous design: the low-resolution phase of the fully-sampled k-space centre."""
    return _on_working_grid(task, lambda sense: lowres_phase(task.y, sense, calib_region(task.mask)))


def oracle_phase(task: MRITask, path: Path) -> torch.Tensor:
    """Phase of the fully-sampled image in the task's frame (coils combined with its maps)."""
    k = torch.from_numpy(h5py.File(path)["kspace"][()]).to(torch.complex64)
    coil = ifft2c((k[k.shape[0] // 2] if k.dim() == 4 else k)[None])

    def combined(sense) -> torch.Tensor:
        return unit_phase((sense.coil_maps.conj() * coil).sum(1, keepdim=True) if isinstance(sense, MultiCoilMRI)
                          else coil)

    return _on_working_grid(task, combined)


def true_maps(task: MRITask, path: Path) -> MRITask | None:
    """The task with the simulated coils' true sensitivities in place of ESPIRiT's, and the pipeline's
    phase through them (``data_phase``); None for a file without them (measured data) or a padded grid."""
    with h5py.File(path) as f:
        if "true_coil_maps" not in f or isinstance(task.op, Composed):
            return None
        op = MultiCoilMRI(task.mask, torch.from_numpy(f["true_coil_maps"][()]))
    return dataclasses.replace(task, op=op, phase=data_phase(op, task.y), support=None)


def figure(name: str, task: MRITask, images: dict[str, torch.Tensor]) -> Path:
    """Greyscale PNG results/figures/NAME.png: reference and each method (top), |error| x 5 (bottom),
    one grey window."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref = task.reference[0, 0].numpy()
    vmax = float(np.percentile(ref, 99.5))
    cols = {"reference": ref, **{k: v[0, 0].float().numpy() for k, v in images.items()}}
    fig = Figure(figsize=(2.2 * len(cols), 4.6))
    for j, (label, a) in enumerate(cols.items()):
        ax = fig.add_subplot(2, len(cols), j + 1)
        ax.imshow(a, cmap="gray", vmin=0, vmax=vmax)
        score = "" if label == "reference" else f"\n{task.score(images[label])['PSNR']:.2f} dB"
        ax.set_title(label + score, fontsize=8)
        ax.axis("off")
        if label != "reference":
            ax = fig.add_subplot(2, len(cols), len(cols) + j + 1)
            ax.imshow(np.abs(a - ref), cmap="gray", vmin=0, vmax=vmax / 5)
            ax.axis("off")
    fig.tight_layout()
    out = RESULTS / "figures" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).convert("L").save(out, optimize=True)
    return out


def run_case(prior, name: str, path: Path, accel: float, seed: int, methods: list[str],
             phase_methods: list[str], steps: int, figure_prefix: str | None) -> list[dict]:
    """Every method on one case (and each solver through each of ``phase_methods``), and its figure
    results/figures/PREFIX{name}_x{accel}.png unless ``figure_prefix`` is None."""
    t0 = time.perf_counter()
    task = prepare_mri(path, prior.image_size, MRIOptions(accel=accel), seed=seed)
    base = {"case": name, "grid": "x".join(map(str, task.shape)), "coils": task.info["coils"], "accel": accel,
            "prepare_s": time.perf_counter() - t0}
    variants = {"centre-phase": lambda: dataclasses.replace(task, phase=centre_phase(task)),
                "oracle-phase": lambda: dataclasses.replace(task, phase=oracle_phase(task, path)),
                "true-maps": lambda: true_maps(task, path)}
    made = {p: variants[p]() for p in phase_methods}
    rows, images = [], {}
    for m in methods:
        tasks = [("", task)] + [(f"/{p}", t) for p, t in made.items() if t is not None and m in SOLVERS]
        for suffix, t in tasks:
            r = run_solver(t, m, prior, steps, seed=seed)
            rows.append({**base, "method": m + suffix, **t.score(r.mean), "seconds": r.seconds, "NFE": r.nfe})
            print(json.dumps(rows[-1]), flush=True)
            images[m + suffix] = r.mean
    if figure_prefix is not None:
        figure(f"{figure_prefix}{name}_x{accel:g}", task, {k: v for k, v in images.items() if "/" not in k})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--cases", default="kellman,alias8ch,ixi+phase")
    ap.add_argument("--kspace", type=Path, nargs="*", default=[], help="more fully-sampled HDF5 k-space files")
    ap.add_argument("--n-ixi", type=int, default=6, help="IXI slices of the ixi+phase case")
    ap.add_argument("--accels", default="4,8")
    ap.add_argument("--solvers", default="dds,mcg")
    ap.add_argument("--baselines", default=",".join(MRITask.baselines))
    ap.add_argument("--phase-methods", default="centre-phase,oracle-phase")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--name", default="mri_real")
    args = ap.parse_args()
    prior = load_prior(args.model)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        makers = {"kellman": lambda: kellman_cases(args.data, tmp), "alias8ch": lambda: alias_case(args.data, tmp),
                  "ixi+phase": lambda: ixi_phase_cases(prior, args.data, tmp, args.n_ixi)}
        cases = [c for key in args.cases.split(",") if key for c in makers[key]()]
        cases += [(p.stem, p) for p in args.kspace]
        methods = [m for m in args.baselines.split(",") + args.solvers.split(",") if m]
        phase_methods = [p for p in args.phase_methods.split(",") if p]
        rows, drawn = [], set()
        for accel in (float(a) for a in args.accels.split(",")):
            for i, (name, path) in enumerate(cases):
                rows += run_case(prior, name, path, accel, i, methods, phase_methods, args.steps,
                                 # one figure per family and acceleration; a run under another --name
                                 # prefixes its figures so it does not replace the README's
                                 figure_prefix=None if (_family(name), accel) in drawn else
                                 "" if args.name == "mri_real" else f"{args.name}_")
                drawn.add((_family(name), accel))
    write_table(args.name, summarise(rows) + rows, {"machine": machine(), "steps": args.steps, "cases":
                [c[0] for c in cases], "mask": "random1d, 8 % centre", "scored": "input grid vs fully-sampled"})


def summarise(rows: list[dict]) -> list[dict]:
    """Mean set-up seconds, PSNR, SSIM and seconds per (case family, accel, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((_family(r["case"]), r["accel"], r["method"]), []).append(r)
    return [{"case": f"{fam} (mean of {len(g)})", "grid": g[0]["grid"] if len({x['grid'] for x in g}) == 1 else "mixed",
             "coils": g[0]["coils"], "accel": acc, "method": m,
             **{k: float(np.mean([x[k] for x in g])) for k in ("prepare_s", "PSNR", "SSIM", "seconds")},
             "NFE": g[0]["NFE"]}
            for (fam, acc, m), g in groups.items()]


if __name__ == "__main__":
    main()
