"""Whole volumes through ``mediff reconstruct``: all slices by default, --slices ranges, slices batched
through one solver run without mixing their data, multi-slice k-space files, outputs stacked on the
input's grid, per-slice metrics and a volume mean, and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import SIZE, assert_one_line_error, metrics_of, multicoil_h5, phantom, read_nifti, recon
import torch

from mediff import io
from mediff.errors import MediffError


def _volume(path: Path, scales: tuple[float, ...] = (0.5, 1.0, 0.7)) -> np.ndarray:
    """A RAS NIfTI volume of the phantom scaled per slice along the last (S) axis; returns the array."""
    import nibabel as nib

    arr = np.stack([s * phantom() for s in scales], axis=2).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    return arr


# ------------------------------------------------------------------------------------ units


def test_stacked_operator_is_block_diagonal_with_its_adjoint() -> None:
    from mediff.physics.masks import make_mask
    from mediff.physics.mri import MagnitudeMRI, SingleCoilMRI
    from mediff.physics.operators import Stacked, adjoint_check

    g = torch.Generator().manual_seed(0)
    ops = [MagnitudeMRI(SingleCoilMRI(make_mask("random1d", (16, 16), 3.0, 0.25, seed)),
                        torch.exp(1j * torch.rand(1, 1, 16, 16, generator=g))) for seed in (0, 1)]
    op = Stacked(ops, repeats=2)
    x = torch.rand(4, 1, 16, 16, generator=g)
    y = op.A(x)
    for i, o in enumerate(ops):
        torch.testing.assert_close(y[2 * i: 2 * i + 2], o.A(x[2 * i: 2 * i + 2]))
        torch.testing.assert_close(op.normal(x)[2 * i: 2 * i + 2], o.normal(x[2 * i: 2 * i + 2]))
    assert adjoint_check(op, x, generator=g) < 1e-5
    with pytest.raises(ValueError, match="batch of 3"):
        op.A(x[:3])


def test_slice_ranges() -> None:
    from mediff.recon.options import parse_slices
    from mediff.recon.volume import chosen_slices, chunks, shown_slices

    assert parse_slices("2:5") == (2, 5) and parse_slices(":4") == (None, 4) and parse_slices("3:") == (3, None)
    assert chosen_slices(None, 4) == range(4) and chosen_slices((None, 2), 4) == range(2)
    assert chosen_slices((1, None), 4) == range(1, 4)
    for bad in ("3", "-1:2", "1:2:3", "a:b"):
        with pytest.raises(MediffError, match="--slices"):
            parse_slices(bad)
    for spec in ((2, 2), (3, 1), (0, 5)):
        with pytest.raises(MediffError, match="the input has 4 slices"):
            chosen_slices(spec, 4)
    assert [list(c) for c in chunks(range(2, 12), 3)] == [[2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert [len(c) for c in chunks(range(10), 1)] == [8, 2] and [len(c) for c in chunks(range(3), 9)] == [1, 1, 1]
    assert shown_slices(1) == [0] and shown_slices(2) == [0, 1] and shown_slices(90) == [22, 45, 67]


def test_a_batch_of_slices_keeps_each_slice_on_its_own_data(prior: Path) -> None:
    """Slices solved in one run each fit their own measurements (the batch does not mix their data),
    and a run's results do not depend on the slices' order within it."""
    from mediff.prior import load_prior
    from mediff.recon import MRIOptions, simulate_mri
    from mediff.recon.run import run_batch

    p = load_prior(prior)
    opts = MRIOptions(accel=3.0, center_fraction=0.25)
    tasks = [simulate_mri(img, opts) for img in (phantom(), np.ascontiguousarray(phantom()[::-1].T))]
    res = run_batch(tasks, "dds", p, steps=3, seed=0, cg_iters=30)
    assert len(res) == 2

    def misfit(task, image):
        op, y = task.data()
        return float((task.solver_operator().A(image) - y).abs().norm() / y.abs().norm())

    for task, own, other in ((tasks[0], res[0], res[1]), (tasks[1], res[1], res[0])):
        assert misfit(task, own.mean) < 0.5 * misfit(task, other.mean)
    with pytest.raises(MediffError, match="one grid"):
        run_batch([tasks[0], simulate_mri(phantom(16), opts)], "dds", p, steps=2)


def test_slices_of_different_noise_share_a_run_each_with_its_own_std(prior: Path, monkeypatch) -> None:
    """Noisy slices batch together: the solver gets one likelihood std per image, each slice's own
    (``solvers.Problem.noise_sigma`` (B,); test_solvers checks the solver honours it per item)."""
    from mediff.prior import load_prior
    from mediff.recon import MRIOptions, simulate_mri
    from mediff.recon import run as run_module

    seen = []

    def spy(denoiser, problem, *args, **kwargs):
        seen.append(problem.noise_sigma)
        return solve(denoiser, problem, *args, **kwargs)

    solve = run_module.solve
    monkeypatch.setattr(run_module, "solve", spy)
    opts = MRIOptions(accel=3.0, center_fraction=0.25)
    tasks = [simulate_mri(phantom(), opts), simulate_mri(phantom(), MRIOptions(**{**opts.__dict__, "noise": 0.2}))]
    assert tasks[0].noise_sigma == 0 < tasks[1].noise_sigma and run_module.batchable(*tasks)
    res = run_module.run_batch(tasks, "dds", load_prior(prior), steps=2, samples=2)
    assert len(res) == 2 and res[0].samples.shape[0] == 2
    torch.testing.assert_close(seen[0], torch.tensor([0.0, 0.0, tasks[1].noise_sigma, tasks[1].noise_sigma],
                                                     dtype=torch.float64))


# ------------------------------------------------------------------------------------ CLI


def test_volume_all_slices_with_samples(prior: Path, tmp_path: Path) -> None:
    """The default reconstructs every slice: recon, zero-filled and std volumes of the input's shape and
    affine; per-slice rows whose mean is the volume row; report panels of the shown slices."""
    path = tmp_path / "v.nii.gz"
    arr = _volume(path)
    out = tmp_path / "o"
    code, _, err = recon(prior, path, out, "--steps", 2, "--samples", 2, "--compare", "zero-filled,tv")
    assert code == 0, err
    for name in ("recon.nii.gz", "zero_filled.nii.gz", "std.nii.gz"):
        a, aff = read_nifti(out / name)
        assert a.shape == arr.shape, name
        np.testing.assert_allclose(aff, np.diag([1.5, 1.5, 3.0, 1.0]))
    std, _ = read_nifti(out / "std.nii.gz")
    assert (std.reshape(-1, 3).max(0) > 0).all(), "every slice has its own posterior spread"
    rec = metrics_of(out)
    assert rec["slices"] == [0, 3] and rec["input_slices"] == 3 and rec["nfe"] == 2
    per = rec["per_slice"]
    assert [r["slice"] for r in per] == [0, 1, 2] and all(0 <= r["coverage90"] <= 1 for r in per)
    for i, row in enumerate(rec["metrics"]):
        assert row["method"] == per[0]["metrics"][i]["method"]
        assert row["PSNR"] == pytest.approx(np.mean([r["metrics"][i]["PSNR"] for r in per]))
    assert rec["coverage90"] == pytest.approx(np.mean([r["coverage90"] for r in per]))
    # Notes every slice shares stay at the top; the slice's own (its index) go with its row.
    assert any("axial slices 0:3 of 3" in n for n in rec["notes"])
    assert all(any(f"axial slice {r['slice']} of 3" in n for n in r["notes"]) for r in per)
    html = (out / "report.html").read_text()
    assert all(f"slice {k}: dds" in html for k in (0, 1, 2))


@pytest.mark.parametrize("solver, steps, per_slice", [("dds", 3, 3), ("tv", 3, 1)])
def test_progress_runs_over_all_slices_and_steps(prior: Path, tmp_path: Path, monkeypatch, solver: str, steps: int,
                                                 per_slice: int) -> None:
    """One progress bar for the whole job: its total is slices x steps (a baseline: one step per
    slice) and the batched runs advance it to exactly that, so its ETA covers the volume."""
    from contextlib import contextmanager

    import mediff.synthesis

    bars = []

    @contextmanager
    def counting(total: int, label: str):
        bars.append({"total": total, "label": label, "done": 0})

        def advance(i, x, d, advance=1):
            bars[-1]["done"] += advance

        yield advance

    monkeypatch.setattr(mediff.synthesis, "progress_callback", counting)
    path = tmp_path / "v.nii.gz"
    _volume(path, scales=(1.0, 0.9, 0.8, 0.7, 0.6))
    code, _, err = recon(prior, path, tmp_path / "o", "--solver", solver, "--steps", steps, "--slices", "1:",
                         "--samples", 1, "--compare", "zero-filled")
    assert code == 0, err
    assert bars == [{"total": 4 * per_slice, "label": f"{solver}, 4 of 5 axial slices", "done": 4 * per_slice}]


def test_kspace_volume_all_slices_and_a_range(prior: Path, tmp_path: Path) -> None:
    """A multi-slice multi-coil HDF5 file: every slice reconstructed (each with its own coil maps and
    noise estimate), written as (H, W, slices); --slices picks a block whose affine starts at it."""
    pytest.importorskip("h5py")
    path = tmp_path / "k.h5"
    mags = multicoil_h5(path, n_slices=3, sigma=8.0)
    out = tmp_path / "all"
    code, _, err = recon(prior, path, out, "--steps", 2, "--accel", 3, "--center-fraction", 0.25)
    assert code == 0, err
    r, aff = read_nifti(out / "recon.nii.gz")
    zf, _ = read_nifti(out / "zero_filled.nii.gz")
    assert r.shape == zf.shape == (SIZE, SIZE, 3)
    np.testing.assert_allclose(aff, np.eye(4))
    # Slice s of the file is the phantom scaled by 1 + s / 4: the zero-filled slices keep that order.
    np.testing.assert_allclose(zf.mean((0, 1)) / zf.mean((0, 1))[0], mags.mean((1, 2)) / mags.mean((1, 2))[0],
                               rtol=0.05)
    rec = metrics_of(out)
    per = rec["per_slice"]
    assert [p["slice"] for p in per] == [0, 1, 2]
    assert all(f"slice {p['slice']} of 3" in p["notes"] for p in per)
    assert len({p["problem"]["noise_sigma"] for p in per}) == 3, "each slice's noise is estimated on its own"
    out = tmp_path / "part"
    code, _, err = recon(prior, path, out, "--steps", 2, "--accel", 3, "--center-fraction", 0.25, "--slices", "1:")
    assert code == 0, err
    r, aff = read_nifti(out / "recon.nii.gz")
    assert r.shape == (SIZE, SIZE, 2)
    np.testing.assert_allclose(aff[:3, 3], [0.0, 0.0, 1.0])
    assert metrics_of(out)["slices"] == [1, 3]
    out = tmp_path / "one"
    code, _, err = recon(prior, path, out, "--steps", 2, "--accel", 3, "--center-fraction", 0.25, "--slice", 2)
    assert code == 0, err
    r, aff = read_nifti(out / "recon.nii.gz")
    assert r.shape == (SIZE, SIZE)  # one slice of a file without a voxel grid: 2D, placed at its slice
    np.testing.assert_allclose(aff[:3, 3], [0.0, 0.0, 2.0])


def test_fastmri_single_coil_file_is_slices_of_one_coil(prior: Path, tmp_path: Path) -> None:
    """fastMRI single-coil files (``reconstruction_esc`` beside ``kspace``) hold (slices, H, W): each
    slice is a single-coil problem; the same array without that target is one slice of 3 coils."""
    h5py = pytest.importorskip("h5py")
    from mediff.physics.mri import fft2c

    x = torch.from_numpy(np.stack([phantom() * (1 + s / 4) for s in range(3)]).astype(np.complex64))
    k = fft2c(x).numpy()
    for name, esc in (("sc.h5", True), ("mc.h5", False)):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("kspace", data=k)
            if esc:
                f.create_dataset("reconstruction_esc", data=np.abs(x.numpy()))
    code, _, err = recon(prior, tmp_path / "sc.h5", tmp_path / "sc", "--steps", 2, "--accel", 3,
                         "--center-fraction", 0.25)
    assert code == 0, err
    assert read_nifti(tmp_path / "sc" / "recon.nii.gz")[0].shape == (SIZE, SIZE, 3)
    assert metrics_of(tmp_path / "sc")["problem"]["coils"] == 1
    code, _, err = recon(prior, tmp_path / "mc.h5", tmp_path / "mc", "--steps", 2, "--accel", 3,
                         "--center-fraction", 0.25)
    assert code == 0, err
    assert read_nifti(tmp_path / "mc" / "recon.nii.gz")[0].shape == (SIZE, SIZE)
    assert metrics_of(tmp_path / "mc")["problem"]["coils"] == 3


def test_nan_in_one_kspace_slice_fails_whole_job_but_not_a_range_without_it(prior: Path, tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "k.h5"
    multicoil_h5(path, n_slices=3)
    with h5py.File(path, "r+") as f:
        k = f["kspace"][()]
        k[2, 0, 5, 5] = np.nan
        f["kspace"][...] = k
    code, _, err = recon(prior, path, tmp_path / "all", "--steps", 2, "--accel", 3, "--center-fraction", 0.25)
    assert_one_line_error(code, err, "nan")
    assert not (tmp_path / "all").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    code, _, err = recon(prior, path, tmp_path / "ok", "--steps", 2, "--accel", 3, "--center-fraction", 0.25,
                         "--slices", ":2")
    assert code == 0, err


@pytest.mark.parametrize("args, needles", [(("--slices", "2:1"), ("--slices 2:1", "3 axial slices")),
                                           (("--slices", "0:4"), ("0:4", "3 axial slices")),
                                           (("--slices", "1-2"), ("--slices", "START:STOP")),
                                           (("--slice", 3), ("--slices 3:4", "3 axial slices")),
                                           (("--slice", -1), ("--slice", ">= 0")),
                                           (("--slice", 1, "--slices", "0:1"), ("--slice", "not both"))])
def test_bad_slices_one_line_error_no_output(prior: Path, tmp_path: Path, args: tuple, needles: tuple) -> None:
    path = tmp_path / "v.nii.gz"
    _volume(path)
    code, _, err = recon(prior, path, tmp_path / "o", "--steps", 2, *args)
    assert_one_line_error(code, err, *needles)
    assert {p.name for p in tmp_path.iterdir()} == {"v.nii.gz"}


def test_dicom_series_in_dicom_series_out(prior: Path, tmp_path: Path) -> None:
    """A DICOM series reconstructed with --dicom comes back as a series with each source slice's
    geometry (position, orientation, pixel spacing, thickness), in the source's study and frame of
    reference, under new series and instance UIDs, marked DERIVED\\SECONDARY and named after mediff and
    the solver; recon.nii.gz holds the same values on the same grid."""
    pydicom = pytest.importorskip("pydicom")
    from mediff import io

    # An oblique series (rotated in plane and tilted) with 3 mm slices 3.5 mm apart.
    c, s, ct, st = np.cos(0.3), np.sin(0.3), np.cos(0.1), np.sin(0.1)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[1.0, 0, 0], [0, ct, -st], [0, st, ct]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 1.1, 3.5])
    affine[:3, 3] = [-20.0, 15.0, 40.0]
    vol = np.stack([(1 + k / 4) * phantom() for k in range(3)], axis=2)
    src = tmp_path / "series"
    io.write_dicom(src, np.round(vol), modality="MR", affine=affine, series_description="source")
    for f in src.iterdir():  # thickness is an acquisition property: 3 mm, not the 3.5 mm spacing
        ds = pydicom.dcmread(f)
        ds.SliceThickness = 3.0
        ds.save_as(f)
    out = tmp_path / "o"
    code, _, err = recon(prior, src, out, "--steps", 2, "--dicom")
    assert code == 0, err

    def by_position(folder: Path) -> list:
        dss = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
        return sorted(dss, key=lambda d: float(np.dot(np.cross(np.asarray(d.ImageOrientationPatient[:3], float),
                                                               np.asarray(d.ImageOrientationPatient[3:], float)),
                                                      np.asarray(d.ImagePositionPatient, float))))

    source, written = by_position(src), by_position(out / "recon_dicom")
    assert len(written) == len(source) == 3
    for a, b in zip(source, written):
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            np.testing.assert_allclose(np.asarray(b.get(tag), float), np.asarray(a.get(tag), float), atol=1e-4,
                                       err_msg=tag)
        assert float(b.SliceThickness) == 3.0 and (b.Rows, b.Columns) == (a.Rows, a.Columns)
        assert b.StudyInstanceUID == a.StudyInstanceUID and b.FrameOfReferenceUID == a.FrameOfReferenceUID
        assert b.SOPInstanceUID != a.SOPInstanceUID
        assert list(b.ImageType) == ["DERIVED", "SECONDARY"]
        assert "mediff" in b.SeriesDescription and "dds" in b.SeriesDescription
    assert len({d.SeriesInstanceUID for d in written}) == 1
    assert written[0].SeriesInstanceUID != source[0].SeriesInstanceUID
    # The series and the NIfTI hold the same reconstruction on the same grid.
    series, nifti = io.read_image(out / "recon_dicom"), io.read_image(out / "recon.nii.gz")
    np.testing.assert_allclose(series.affine, nifti.affine, atol=1e-3)
    np.testing.assert_allclose(series.array, nifti.array, atol=2e-4 * float(np.abs(nifti.array).max()))


@pytest.mark.parametrize("solver", ["dds", "ddnm", "dps", "mcg", "langevin"])
def test_every_solver_batches_noisy_slices(prior: Path, tmp_path: Path, solver: str) -> None:
    """Each solver on a batch of slices with their own noise std (per-item likelihood std): --noise is
    relative to each slice's intensity, in normalised units it differs where the anatomy differs."""
    path = tmp_path / "v.nii.gz"
    arr = np.stack([phantom(), np.ascontiguousarray(phantom().T)], axis=2)
    io.write_nifti(path, arr, np.diag([1.5, 1.5, 3.0, 1.0]))
    out = tmp_path / "o"
    code, _, err = recon(prior, path, out, "--solver", solver, "--steps", 2, "--noise", 0.05, "--compare", "")
    assert code == 0, err
    rec, _ = read_nifti(out / "recon.nii.gz")
    assert rec.shape == arr.shape and np.isfinite(rec).all()
    sigmas = [r["problem"]["noise_sigma"] for r in metrics_of(out)["per_slice"]]
    assert len(set(sigmas)) == 2 and min(sigmas) > 0
