"""Measured-k-space benchmark: a held-out IXI volume as a fastMRI-style multi-coil HDF5 file, every
solver and baseline run on it through ``mediff reconstruct`` (the path a user with scanner data takes).

The case: a validation subject of the prior (never trained on), ``--file-slices`` of its axial slices
read from the NIfTI volume in the training orientation (P-S-R, 120 x 90 zero-padded to 128 x 128 like
the training slices), spread over the middle 60 % of the brain slices the training NPZ lists. Each
gets a smooth simulated phase, 8 simulated coils (``simulate_coil_maps``) and complex Gaussian noise
of std ``--noise`` x the 99.5th percentile of the file's magnitudes per k-space entry (E|n|^2 =
sigma^2, one level for the whole file, as on a scanner). The file holds ``kspace`` (S, C, H, W)
complex64, fully sampled, ``reconstruction_rss`` (S, H, W) and fastMRI's attrs; the clean magnitudes
go to ``truth.npz`` beside it.

Then ``mediff reconstruct --input CASE.h5 --slice K --accel 4`` runs for every method on ``--slices``,
a fresh process each, as a user would (the mask seed is the slice's position, the same for every
method). The CLI undersamples retrospectively (1D random, 8 % centre), estimates coil maps (ESPIRiT),
phase and noise from the data, and scores against the RSS of the file's full k-space (noisy, as a
fastMRI reference is); *_clean score the same recon.nii.gz against the noiseless magnitude.
``sigma_est_over_sigma`` is the CLI's noise estimate over the noise added: above 1 where the image
itself has content out to the k-space corners (IXI slices downsampled to 2 mm do).

    python benchmarks/multicoil_case.py --data ../shared/data --out /tmp/multicoil
    python benchmarks/multicoil_case.py --data ../shared/data --out /tmp/multicoil-smoke --smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, write_table
from mediff import io, metrics
from mediff.physics.mri import fft2c, ifft2c, rss, simulate_coil_maps
from mediff.prior import load_prior
from mediff.recon import MRITask

SOLVERS = ("dds", "ddnm", "dps", "mcg", "langevin")
GRID = 128  # the training slices' grid: 120 x 90 axial slices zero-padded to 128 x 128


def axial_slices(volume: Path) -> np.ndarray:
    """All axial slices (n, 128, 128) float32 of a volume in the training orientation (P-S-R, axis 1),
    zero-padded (centred) like the training NPZ."""
    import nibabel.orientations as nio

    from mediff.recon.grid import SLICE_ORIENTATION

    img = io.read_image(volume)
    arr = np.asarray(img.array, dtype=np.float32)
    vol = nio.apply_orientation(arr, nio.ornt_transform(nio.io_orientation(img.affine),
                                                        nio.axcodes2ornt(SLICE_ORIENTATION)))
    sl = np.moveaxis(vol, 1, 0)  # (n, rows, cols)
    n, h, w = sl.shape
    if h > GRID or w > GRID:
        raise SystemExit(f"{volume}: axial slices {h}x{w} exceed the {GRID} grid")
    top, left = (GRID - h) // 2, (GRID - w) // 2
    out = np.zeros((n, GRID, GRID), np.float32)
    out[:, top: top + h, left: left + w] = np.clip(sl, 0, None)
    return out


def brain_slices(npz: Path, subject: str, slices: np.ndarray) -> list[int]:
    """The volume's axial indices that the training data hold for ``subject`` (the brain, not the neck
    or skull cap), middle 60 % of them as in ``common.heldout_slices``; each checked against the
    training NPZ's image of it (correlation > 0.99), which guards the orientation."""
    d = np.load(npz)
    ids = d["subject_ids"][d["subject_index"]].astype(str)
    rows = np.flatnonzero(ids == subject)
    order = rows[np.argsort(d["slice_index"][rows])]
    lo, hi = int(len(order) * 0.2), int(len(order) * 0.8)
    picked = []
    for r in order[lo:hi]:
        k = int(d["slice_index"][r])
        corr = np.corrcoef(slices[k].ravel(), d["images"][r].astype(np.float32).ravel())[0, 1]
        if not corr > 0.99:
            raise SystemExit(f"{subject} slice {k}: volume and training NPZ disagree (correlation {corr:.3f})")
        picked.append(k)
    return picked


def smooth_phase(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth image phase (H, W): a random low-order polynomial, up to ~+-pi/2 over the field of view
    (B0 inhomogeneity and receive phase look like this at low resolution)."""
    yy, xx = (np.mgrid[: shape[0], : shape[1]] - np.array(shape)[:, None, None] / 2) / (np.array(shape)[:, None, None] / 2)
    c = rng.uniform(-1, 1, 6) * np.array([0.6, 0.6, 0.4, 0.3, 0.3, 0.5])
    return c[0] * yy + c[1] * xx + c[2] * xx * yy + c[3] * yy**2 + c[4] * xx**2 + c[5]


def build_case(volume: Path, npz: Path, subject: str, path: Path, n_file_slices: int, coils: int, noise: float,
               seed: int) -> dict:
    """Write the HDF5 case and truth.npz; return what was simulated."""
    import h5py

    all_slices = axial_slices(volume)
    brain = brain_slices(npz, subject, all_slices)
    picks = [brain[i] for i in np.linspace(0, len(brain) - 1, n_file_slices).round().astype(int)]
    mags = all_slices[picks].astype(np.float64)  # (S, H, W), the volume's intensity units
    rng = np.random.default_rng(seed)
    phase = np.stack([smooth_phase(mags.shape[1:], rng) for _ in picks])
    x = torch.from_numpy(mags * np.exp(1j * phase))[:, None]  # (S, 1, H, W)
    maps = simulate_coil_maps(mags.shape[1:], coils, seed=seed, dtype=torch.complex128)
    sigma = noise * float(np.percentile(mags, 99.5))
    k = fft2c(maps[None] * x)
    gen = torch.Generator().manual_seed(seed)
    k = (k + sigma * torch.randn(k.shape, dtype=k.dtype, generator=gen)).to(torch.complex64)  # E|n|^2 = sigma^2
    recon_rss = rss(ifft2c(k)).squeeze(1).numpy().astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=k.numpy())
        f.create_dataset("reconstruction_rss", data=recon_rss)
        f.attrs["acquisition"] = "AXT1"
        f.attrs["max"] = float(recon_rss.max())
        f.attrs["norm"] = float(np.linalg.norm(recon_rss))
        f.attrs["patient_id"] = subject
        f.attrs["simulated"] = (f"mediff benchmarks/multicoil_case.py: IXI {subject} axial slices {picks}, {coils} "
                                f"simulated coils, smooth phase, complex noise sigma {sigma:.6g} per entry")
        f.attrs["credit"] = "IXI dataset, Imperial College London (CC BY-SA 3.0); derived data, same license"
    np.savez(path.with_name("truth.npz"), magnitude=mags.astype(np.float32), volume_slices=np.array(picks))
    return {"volume_slices": picks, "sigma": sigma, "coils": coils, "noise": noise, "shape": list(k.shape)}


def run_cli(args: list[str]) -> tuple[dict, float]:
    """``mediff reconstruct ARGS`` in a fresh process; its metrics.json and the wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mediff", "reconstruct", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mediff reconstruct {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "metrics.json").read_text()), wall


def clean_scores(recon_path: Path, truth: np.ndarray) -> dict[str, float]:
    """PSNR / SSIM / NMSE of recon.nii.gz against the noiseless magnitude, data_range = its max."""
    import nibabel as nib

    rec = torch.from_numpy(np.asarray(nib.load(str(recon_path)).dataobj, dtype=np.float64))[None, None]
    ref = torch.from_numpy(truth.astype(np.float64))[None, None]
    rng = float(ref.max())
    return {"PSNR_clean": float(metrics.psnr(rec, ref, rng)[0]), "SSIM_clean": float(metrics.ssim(rec, ref, rng)[0]),
            "NMSE_clean": float(metrics.nmse(rec, ref)[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True, help="folder for CASE.h5, truth.npz and every reconstruction")
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--subject", default=None, help="IXI id (default: the first validation subject of the prior)")
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.005, help="noise std per entry / 99.5th pct of the magnitudes")
    ap.add_argument("--accel", type=float, default=4.0)
    ap.add_argument("--file-slices", type=int, default=8, help="slices written to the HDF5 file")
    ap.add_argument("--slices", default="2,5", help="file slices reconstructed (--slice K)")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--baselines", default=",".join(MRITask.baselines))
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 50, --smoke 3)")
    ap.add_argument("--smoke", action="store_true", help="3 steps and results named NAME_smoke: checks the plumbing")
    ap.add_argument("--seed", type=int, default=0, help="seed of phase, coils and noise")
    ap.add_argument("--name", default="multicoil")
    args = ap.parse_args()
    steps = args.steps if args.steps is not None else (3 if args.smoke else 50)
    name = args.name + ("_smoke" if args.smoke else "")

    prior = load_prior(args.model)
    val = sorted(prior.meta.data.val_subjects)
    subject = args.subject or val[0]
    if subject not in val:
        raise SystemExit(f"{subject} is not a validation subject of {args.model}: its slices were trained on")
    volume = args.data / "ixi_t1" / "volumes" / f"{subject}_T1.nii.gz"
    if not volume.is_file():
        raise SystemExit(f"volume not found: {volume}")
    case = args.out / "case.h5"
    sim = build_case(volume, args.data / "ixi_t1" / "ixi_t1_axial_128.npz", subject, case, args.file_slices,
                     args.coils, args.noise, args.seed)
    truth = np.load(case.with_name("truth.npz"))["magnitude"]
    slices = [int(s) for s in args.slices.split(",") if s]
    methods = [m for m in args.solvers.split(",") + args.baselines.split(",") if m]
    print(f"case {case}: {subject}, volume slices {sim['volume_slices']}, {args.coils} coils, sigma {sim['sigma']:.4g}",
          flush=True)

    per: dict[str, list[dict]] = {m: [] for m in methods}
    problems = {}
    for pos, k in enumerate(slices):
        for m in methods:
            out = args.out / f"slice{k}" / m
            cli = ["--model", args.model, "--input", str(case), "--slice", str(k), "--accel", f"{args.accel:g}",
                   "--solver", m, "--steps", str(steps), "--seed", str(pos), "--compare", "", "--out", str(out),
                   "--overwrite"]
            rec, wall = run_cli(cli)
            row = rec["metrics"][0]
            problems[k] = rec["problem"]
            per[m].append({**{key: row[key] for key in ("PSNR", "SSIM", "NMSE")},
                           **clean_scores(out / "recon.nii.gz", truth[k]), "seconds": row["seconds"],
                           "NFE": row["NFE"], "wall_s": wall})
            print(f"slice {k} {m}: PSNR {row['PSNR']:.2f} SSIM {row['SSIM']:.4f} (clean {per[m][-1]['PSNR_clean']:.2f}) "
                  f"{row['seconds']:.1f} s, NFE {row['NFE']}", flush=True)
    rows = []
    for m in methods:
        a = per[m]
        mean = lambda key: float(np.mean([r[key] for r in a]))  # noqa: E731
        rows.append({"method": m, "NFE": a[0]["NFE"], "PSNR": mean("PSNR"),
                     "PSNR_sd": float(np.std([r["PSNR"] for r in a])), "SSIM": mean("SSIM"), "NMSE": mean("NMSE"),
                     "PSNR_clean": mean("PSNR_clean"), "SSIM_clean": mean("SSIM_clean"), "s_per_slice": mean("seconds"),
                     "wall_s_per_run": mean("wall_s")})
    est = {k: p.get("noise_sigma_kspace_units") for k, p in problems.items()}
    write_table(name, rows, {
        **machine(), "model": args.model, "prior_step": prior.meta.step, "images_seen": prior.meta.images_seen,
        "subject": subject, "case": str(case), "file_volume_slices": sim["volume_slices"], "slices": slices,
        "coils": args.coils, "noise": args.noise, "sigma": sim["sigma"], "accel": args.accel, "steps": steps,
        "mask": "random1d, 8% centre (CLI default), seed = slice position", "sigma_est": est,
        "sigma_est_over_sigma": {k: (v / sim["sigma"] if v is not None else None) for k, v in est.items()},
        "accel_achieved": {k: p["accel"] for k, p in problems.items()},
        "reference": "PSNR/SSIM/NMSE: the CLI's, vs the RSS of the file's full (noisy) k-space, normalised units; "
                     "*_clean: recon.nii.gz vs the noiseless magnitude, data_range its max",
        "command": f"mediff reconstruct --model {args.model} --input {case} --slice K --accel {args.accel:g} "
                   f"--solver M --steps {steps} --seed POS --compare '' --out DIR"})


if __name__ == "__main__":
    main()
