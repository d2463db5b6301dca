"""Helpers shared by the CLI-level tests."""

from __future__ import annotations

import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from unittest import mock

import numpy as np
import torch

SIZE = 32  # the tiny MRI prior's grid (conftest's ``prior``)


def run_cli(*args: object) -> tuple[int, str, str]:
    """Run ``mediff ARGS`` in this process; returns (exit code, stdout, stderr)."""
    from mediff.cli import main

    out, err = StringIO(), StringIO()
    with mock.patch.object(sys, "argv", ["mediff", *map(str, args)]), redirect_stdout(out), redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A user error: exit code 2, no traceback, one stderr line starting ``error:`` naming each needle."""
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("error:"), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"


def blob_slices(size: int, subjects: int, per_subject: int) -> tuple[np.ndarray, np.ndarray]:
    """Brain-like elliptic blobs (N, size, size) in 0..220 and their subject index: tiny training data."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    rng = np.random.default_rng(0)
    imgs, subj = [], []
    for s in range(subjects):
        for k in range(per_subject):
            r = (yy / (9 + k)) ** 2 + (xx / (8 + s)) ** 2
            imgs.append(np.where(r < 1, 120 + 80 * (1 - r) + rng.uniform(0, 20, r.shape), 0))
            subj.append(s)
    return np.stack(imgs), np.asarray(subj)


def phantom(size: int = SIZE, peak: float = 800.0) -> np.ndarray:
    """A head-like phantom in MR-ish units: zero background, an ellipse and two brighter blobs."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    s = size / 32
    img = np.where((yy / (11 * s)) ** 2 + (xx / (13 * s)) ** 2 < 1, 0.5 * peak, 0.0)
    img[((yy - 3 * s) / (4 * s)) ** 2 + ((xx + 4 * s) / (3 * s)) ** 2 < 1] = peak
    img[((yy + 4 * s) / (2 * s)) ** 2 + ((xx - 5 * s) / (3 * s)) ** 2 < 1] = 0.25 * peak
    return img.astype(np.float32)


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float64), img.affine


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def recon(prior: Path, inp: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    # On the 32-px test grid the default 8 % centre is 3 columns, below the 4 that calibration needs;
    # 12.5 % gives 4 (a later --center-fraction in ``extra`` overrides it).
    return run_cli("reconstruct", "--input", inp, "--out", out, "--model", prior, "--seed", 0,
                   "--center-fraction", 0.125, *extra)


def multicoil_h5(path: Path, n_slices: int = 2, n_coils: int = 4, sigma: float = 0.0, nan: bool = False) -> np.ndarray:
    """A tiny fastMRI-style multi-coil file: ``kspace`` (S, C, H, W) complex64, fully sampled, of a
    smoothed phantom (slice s scaled by 1 + s / 4) with a smooth phase and complex noise of std
    ``sigma`` per entry; ``reconstruction_rss`` (S, H, W) and fastMRI's attrs. Returns the clean
    magnitudes (S, H, W)."""
    import h5py
    from scipy.ndimage import gaussian_filter

    from mediff.physics.mri import fft2c, ifft2c, rss, simulate_coil_maps

    yy, xx = (np.mgrid[:SIZE, :SIZE] - SIZE / 2) / (SIZE / 2)
    mags = np.stack([gaussian_filter(phantom(), 1.0) * (1 + s / 4) for s in range(n_slices)])
    x = torch.from_numpy(mags * np.exp(1j * (0.7 * yy - 0.5 * xx + 0.3 * xx * yy)))[:, None]  # (S, 1, H, W)
    maps = simulate_coil_maps((SIZE, SIZE), n_coils, seed=1, dtype=torch.complex128)
    k = fft2c(maps[None] * x)
    k = k + sigma * torch.randn(k.shape, dtype=k.dtype, generator=torch.Generator().manual_seed(0))
    k = k.numpy().astype(np.complex64)
    if nan:
        k[:, 1, 3, 4] = np.nan  # every slice: only the one reconstructed is checked
    recon_rss = rss(ifft2c(torch.from_numpy(k))).squeeze(1).numpy().astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=k)
        f.create_dataset("reconstruction_rss", data=recon_rss)
        f.attrs["acquisition"] = "AXT1"
        f.attrs["max"] = float(np.nan_to_num(recon_rss).max())
        f.attrs["norm"] = float(np.linalg.norm(np.nan_to_num(recon_rss)))
        f.attrs["patient_id"] = "tiny"
    return mags
