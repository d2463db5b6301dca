"""End-to-end tests of ``mediff reconstruct`` (MRI) on tiny data.

A tiny prior (32 px, 2-level UNet, 2 training steps) is trained in-process once per session (conftest); its
reconstructions are noise, so these tests check the plumbing: files, shapes, units, metrics, notes,
every solver and baseline, every input kind, and the one-line errors. Where an output is known in
closed form (the zero-filled image of a noiseless single-coil simulation) it is checked exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import SIZE, assert_one_line_error, metrics_of, multicoil_h5, phantom, read_nifti, recon, run_cli
import torch



# ------------------------------------------------------------------------------------------ helpers




def png_image(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float64)


def rows_by_method(record: dict) -> dict[str, dict]:
    return {r["method"]: r for r in record["metrics"]}


def assert_same_units(recon: np.ndarray, image: np.ndarray) -> None:
    """Finite and in the input's units: 99th percentiles within a factor 3 of each other."""
    assert np.isfinite(recon).all()
    p_in, p_out = np.percentile(image, 99), np.percentile(np.abs(recon), 99)
    assert p_in / 3 <= p_out <= 3 * p_in, (p_out, p_in)


def no_leftovers(parent: Path, keep: set[str]) -> None:
    """Output folders are built in a hidden temporary sibling: none may remain."""
    left = {p.name for p in parent.iterdir()} - keep
    assert not any(n.startswith(".") for n in left), left


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Image inputs: 32x32 phantom as 8-bit PNG and as float NIfTI (with a non-trivial affine)."""
    import nibabel as nib
    from PIL import Image

    root = tmp_path_factory.mktemp("recon_inputs")
    img = phantom()
    Image.fromarray(np.round(img * 255 / img.max()).astype(np.uint8)).save(root / "phantom.png")
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    affine[:3, 3] = [-14.0, -17.0, 5.0]
    nib.save(nib.Nifti1Image(img, affine), str(root / "phantom.nii.gz"))
    return {"png": root / "phantom.png", "nifti": root / "phantom.nii.gz", "root": root}


# ----------------------------------------------------------------------------- image inputs, dds


def test_dds_png_writes_all_outputs(prior: Path, inputs: dict, tmp_path: Path) -> None:
    from mediff.physics.masks import make_mask
    from mediff.physics.mri import fft2c, ifft2c

    out = tmp_path / "r"
    code, stdout, err = recon(prior, inputs["png"], out, "--solver", "dds", "--steps", 3, "--accel", 4,
                              "--compare", "zero-filled,tv", "--lam", 0.01)
    assert code == 0, err
    assert {"recon.nii.gz", "zero_filled.nii.gz", "metrics.json", "report.html"} <= {p.name for p in out.iterdir()}
    no_leftovers(tmp_path, {"r"})
    image = png_image(inputs["png"])

    rec, _ = read_nifti(out / "recon.nii.gz")
    assert rec.shape == image.shape
    assert_same_units(rec, image)

    # The zero-filled output is known in closed form: |F^H M F x| in the input's units, with the
    # mask the CLI draws from --seed (noiseless, single coil, image already on the prior's grid).
    zf, _ = read_nifti(out / "zero_filled.nii.gz")
    mask = make_mask("random1d", image.shape, 4, 0.125, seed=0).mask
    x = torch.from_numpy(image)[None, None]
    expected = ifft2c(fft2c(x) * torch.from_numpy(mask.copy())).abs()[0, 0].numpy()
    np.testing.assert_allclose(zf, expected, rtol=0, atol=1e-3 * image.max())
    assert not np.allclose(zf, image, atol=0.05 * image.max()), "4x undersampling must show in zero-filled"

    rec_json = metrics_of(out)
    assert rec_json["solver"] == "dds" and rec_json["nfe"] == 3 and rec_json["steps"] == 3
    assert rec_json["cg_iters"] == 5  # single-coil MRI (recon.policy.DDS_CG_ITERS)
    assert isinstance(rec_json["seconds"], (int, float)) and rec_json["seconds"] >= 0
    rows = rows_by_method(rec_json)
    assert set(rows) == {"dds", "zero-filled", "tv"}
    for name, row in rows.items():
        assert {"PSNR", "SSIM", "NMSE", "NFE", "seconds"} <= set(row), row
        assert all(np.isfinite(row[k]) for k in ("PSNR", "SSIM", "NMSE")), row
        assert -1 <= row["SSIM"] <= 1 and row["NMSE"] >= 0
    assert rows["dds"]["NFE"] == 3 and rows["zero-filled"]["NFE"] == 0
    # TV on a piecewise-constant phantom beats zero-filling (the metrics are not constants).
    assert rows["tv"]["NMSE"] < rows["zero-filled"]["NMSE"]
    assert rec_json["problem"]["accel"] == pytest.approx(4, rel=0.15)
    html = (out / "report.html").read_text()
    assert "<img" in html and "dds" in html
    assert "report.html" in stdout + err  # the CLI says where the report went


def test_dds_nifti_keeps_grid_affine_and_units(prior: Path, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "n"
    code, _, err = recon(prior, inputs["nifti"], out, "--solver", "dds", "--steps", 3, "--compare", "zero-filled")
    assert code == 0, err
    image, affine = read_nifti(inputs["nifti"])
    rec, rec_aff = read_nifti(out / "recon.nii.gz")
    zf, zf_aff = read_nifti(out / "zero_filled.nii.gz")
    assert rec.shape == zf.shape == image.shape
    np.testing.assert_allclose(rec_aff, affine, atol=1e-5)
    np.testing.assert_allclose(zf_aff, affine, atol=1e-5)
    assert_same_units(rec, image)
    assert_same_units(zf, image)
    assert metrics_of(out)["nfe"] == 3


@pytest.mark.parametrize("layout, args, ks", [("one-slice", (), [0]), ("volume-LPI", (), [0, 1, 2]),
                                               ("volume-LPI", ("--slice", 1), [1]),
                                               ("volume-LPI", ("--slices", "0:2"), [1, 2])])
def test_nifti_volume_output_is_on_the_input_voxel_grid(prior: Path, tmp_path: Path, layout: str, args: tuple,
                                                        ks: list[int]) -> None:
    """A NIfTI volume comes back in the input's voxel order and affine: all slices by default (the
    input's shape and affine), a --slice / --slices range as that block of the input's grid (the
    affine moved to its first voxel), so outputs compare voxel by voxel with the input, whatever its
    orientation. ``ks``: the input's slice indices (last axis) the output holds, in order."""
    import nibabel as nib

    img = phantom()
    if layout == "one-slice":  # a 2D slice saved as a 3D NIfTI, identity orientation (RAS)
        arr, affine = img[:, :, None], np.diag([2.0, 2.0, 2.0, 1.0])
    else:  # three slices stored L-P-I: the slice axis is the last, flipped (axial slice 0 is input slice 2)
        arr = np.stack([0.5 * img, img, 0.7 * img], axis=2)
        affine = np.diag([-2.0, -2.0, -3.0, 1.0])
        affine[:3, 3] = [30.0, 40.0, 12.0]
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(path))
    out = tmp_path / "o"
    code, _, err = recon(prior, path, out, "--solver", "dds", "--steps", 3, "--compare", "zero-filled", *args)
    assert code == 0, err
    for name in ("recon.nii.gz", "zero_filled.nii.gz"):
        rec, rec_aff = read_nifti(out / name)
        assert rec.shape == (SIZE, SIZE, len(ks)), rec.shape
        want = affine.copy()
        want[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, ks[0]]) + affine[:3, 3]
        np.testing.assert_allclose(rec_aff, want, atol=1e-5)
        for j, k in enumerate(ks):
            truth, r = arr[:, :, k], rec[:, :, j]
            # Of the 8 ways to lay a square slice onto the grid, the input's must fit it best, by a margin.
            others = [np.abs(np.rot90(v, q) - truth).mean() for v in (r, r.T) for q in range(4)][1:]
            assert np.abs(r - truth).mean() < 0.8 * min(others), "voxel order differs from the input's"
    # The slices' order along the slice axis: the zero-filled images (noiseless data, one mask) keep the
    # input slices' relative brightness (0.5, 1, 0.7 of the phantom).
    zf = read_nifti(out / "zero_filled.nii.gz")[0].mean(axis=(0, 1))
    truth = arr[:, :, ks].mean(axis=(0, 1))
    np.testing.assert_allclose(zf / zf.max(), truth / truth.max(), rtol=0.01)
    rec = metrics_of(out)
    assert rec["slices"][1] - rec["slices"][0] == len(ks) and len(rec["per_slice"]) == len(ks)


def test_real_mr_dicom_is_resampled_and_back(prior: Path, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("MR_small.dcm"))
    ds = pydicom.dcmread(path)
    image = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1) + \
        float(getattr(ds, "RescaleIntercept", 0) or 0)
    assert image.shape == (64, 64)
    out = tmp_path / "d"
    code, _, err = recon(prior, path, out, "--solver", "dds", "--steps", 3, "--compare", "zero-filled")
    assert code == 0, err
    rec, _ = read_nifti(out / "recon.nii.gz")
    zf, _ = read_nifti(out / "zero_filled.nii.gz")
    assert rec.shape == zf.shape == (64, 64), "outputs go back onto the input's 64x64 grid"
    assert_same_units(rec, image)
    assert_same_units(zf, image)
    notes = " ".join(metrics_of(out)["notes"])
    assert "64x64" in notes and f"{SIZE}x{SIZE}" in notes and "resampled" in notes, notes
    assert "resampled" in (out / "report.html").read_text()


# ------------------------------------------------------------------------ samples, coils


def test_samples_write_std_and_coverage(prior: Path, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "s"
    code, _, err = recon(prior, inputs["png"], out, "--solver", "dds", "--steps", 3, "--samples", 3,
                         "--compare", "zero-filled")
    assert code == 0, err
    std, _ = read_nifti(out / "std.nii.gz")
    assert std.shape == (SIZE, SIZE) and np.isfinite(std).all() and std.min() >= 0
    assert std.max() > 0, "three different posterior samples must spread"
    rec = metrics_of(out)
    assert rec["samples"] == 3
    assert 0.0 <= rec["coverage90"] <= 1.0
    assert "posterior std" in (out / "report.html").read_text()


def test_single_sample_writes_no_std(prior: Path, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "s1"
    code, _, err = recon(prior, inputs["png"], out, "--solver", "dds", "--steps", 2, "--compare", "zero-filled")
    assert code == 0, err
    assert not (out / "std.nii.gz").exists()
    assert "coverage90" not in metrics_of(out)


def test_multicoil_simulation(prior: Path, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "c"
    # 8 centre columns of 32 (--center-fraction 0.25): enough calibration for ESPIRiT on this tiny grid.
    code, _, err = recon(prior, inputs["nifti"], out, "--solver", "dds", "--steps", 3, "--coils", 4,
                         "--accel", 3, "--center-fraction", 0.25, "--compare", "zero-filled")
    assert code == 0, err
    rec = metrics_of(out)
    assert "espirit" in " ".join(rec["notes"]).lower(), rec["notes"]
    assert rec["problem"]["coils"] == 4 and rec["nfe"] == 3
    image, _ = read_nifti(inputs["nifti"])
    r, _ = read_nifti(out / "recon.nii.gz")
    assert r.shape == image.shape
    assert_same_units(r, image)
    # With the coil maps estimated from the data, the coil-combined zero-filled image is still close
    # to the object (measured NMSE 0.030, single-coil 0.033). With the default --center-fraction 0.08
    # (3 sampled centre columns, 4 assumed) the ESPIRiT support collapses on this grid: NMSE ~0.8.
    assert rows_by_method(rec)["zero-filled"]["NMSE"] < 0.15


def test_multicoil_images_are_zero_outside_the_maps_support(prior: Path) -> None:
    """With estimated coil maps A ignores the pixels where every map vanishes, so the data say nothing
    there: every reconstruction (solver samples, their mean and std, baselines) is zero outside
    ``Task.support``, which is the maps' support; single-coil tasks have none."""
    from mediff.prior import load_prior
    from mediff.recon import MRIOptions, run_solver, simulate_mri

    task = simulate_mri(phantom() / 800.0, MRIOptions(accel=3.0, center_fraction=0.25, coils=4), seed=0)
    inside = task.support
    assert inside is not None and inside.shape == (1, 1, SIZE, SIZE)
    torch.testing.assert_close(inside, (task.op.coil_maps.abs().sum(1, keepdim=True) > 0).float())
    assert 0 < float(inside.mean()) < 1, "the ESPIRiT support must exclude some background on the phantom"
    r = run_solver(task, "dds", load_prior(prior), steps=3, seed=0, samples=2)
    for img in (r.mean, r.std, r.samples[:, 0], run_solver(task, "tv").mean):
        assert float(img[(inside == 0).expand_as(img)].abs().max()) == 0.0
        assert float(img[(inside == 1).expand_as(img)].abs().max()) > 0
    assert simulate_mri(phantom() / 800.0, MRIOptions(accel=3.0, center_fraction=0.25), seed=0).support is None


# ------------------------------------------------------------------------ every method

# (method, expected NFE at --steps 2). The baselines ignore --steps; pc costs 2 NFE per step.
METHODS = [("dps", 2), ("mcg", 2), ("langevin", 4), ("ddnm", 2), ("zero-filled", 0),
           pytest.param("tv", 0), pytest.param("l1wavelet", 0, marks=pytest.mark.slow)]


@pytest.mark.parametrize("method, nfe", METHODS)
def test_each_method_runs(prior: Path, inputs: dict, tmp_path: Path, method: str, nfe: int) -> None:
    out = tmp_path / method
    code, _, err = recon(prior, inputs["png"], out, "--solver", method, "--steps", 2, "--compare", "zero-filled",
                         "--lam", 0.01)
    assert code == 0, err
    rec = metrics_of(out)
    assert rec["solver"] == method and rec["nfe"] == nfe
    rows = rows_by_method(rec)
    assert method in rows and "PSNR" in rows[method] and np.isfinite(rows[method]["PSNR"])
    r, _ = read_nifti(out / "recon.nii.gz")
    assert r.shape == (SIZE, SIZE)
    assert_same_units(r, png_image(inputs["png"]))
    assert "<img" in (out / "report.html").read_text()


# ------------------------------------------------------------------------ k-space inputs


def _multicoil_kspace(n_coils: int = 4) -> np.ndarray:
    from mediff.physics.mri import fft2c, simulate_coil_maps

    x = torch.from_numpy(phantom()).to(torch.complex64)[None, None]
    maps = simulate_coil_maps((SIZE, SIZE), n_coils)
    return fft2c(maps[None] * x)[0].numpy().astype(np.complex64)  # (C, H, W), fully sampled


def test_fastmri_hdf5_retrospective(prior: Path, tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "file_brain.h5"
    k = _multicoil_kspace(4)
    assert k.shape == (4, SIZE, SIZE) and k.dtype == np.complex64
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=k)
    out = tmp_path / "h"
    # --center-fraction 0.25: the retrospective mask needs >= 4 fully-sampled centre columns (8 here).
    code, _, err = recon(prior, path, out, "--solver", "dds", "--steps", 3, "--accel", 3, "--center-fraction", 0.25,
                         "--compare", "zero-filled")
    assert code == 0, err
    rec = metrics_of(out)
    notes = " ".join(rec["notes"]).lower()
    assert "retrospectively" in notes and "espirit" in notes, notes
    assert rec["problem"]["coils"] == 4 and rec["nfe"] == 3
    assert rec["problem"]["accel"] == pytest.approx(3, rel=0.15)
    rows = rows_by_method(rec)
    assert {"PSNR", "SSIM", "NMSE"} <= set(rows["dds"]), "fully-sampled file: a reference exists"
    r, _ = read_nifti(out / "recon.nii.gz")
    zf, _ = read_nifti(out / "zero_filled.nii.gz")
    assert r.shape == zf.shape == (SIZE, SIZE)
    # Units: the file's k-space units; the RSS of the fully-sampled coil images is the phantom.
    assert_same_units(r, phantom())
    assert_same_units(zf, phantom())


def test_fastmri_multicoil_hdf5_estimates_noise_end_to_end(prior: Path, tmp_path: Path) -> None:
    """Measured multi-coil k-space through the CLI: the noise level comes from the data (not --noise),
    reaches the solver as Task.noise_sigma and is reported in metrics.json; --noise / --coils, which only
    simulate k-space from images, are named as ignored."""
    pytest.importorskip("h5py")
    from mediff.recon import MRIOptions, prepare_mri
    from mediff.recon.mri import calib_region

    path = tmp_path / "case.h5"
    sigma = 16.0  # 2 % of the phantom's peak (800), per complex entry
    mags = multicoil_h5(path, sigma=sigma)
    out = tmp_path / "mc"
    code, _, err = recon(prior, path, out, "--solver", "dds", "--steps", 3, "--slice", 1, "--accel", 3,
                         "--center-fraction", 0.25, "--noise", 0.05, "--coils", 8, "--compare", "zero-filled")
    assert code == 0, err
    assert (out / "recon.nii.gz").is_file() and (out / "report.html").is_file()
    rec = metrics_of(out)
    problem = rec["problem"]
    assert problem["coils"] == 4 and rec["nfe"] == 3
    assert problem["noise_sigma_kspace_units"] == pytest.approx(sigma, rel=0.25)
    assert problem["noise_sigma"] > 0
    assert problem["ignored_options"] == ["--noise", "--coils"]
    notes = " ".join(rec["notes"])
    assert "slice 1 of 2" in notes and "noise std" in notes and "--noise and --coils ignored" in notes, notes
    assert "noise std" in (out / "report.html").read_text()
    r, _ = read_nifti(out / "recon.nii.gz")
    assert r.shape == (SIZE, SIZE)
    assert_same_units(r, mags[1])
    assert "PSNR" in rows_by_method(rec)["dds"], "fully-sampled file: a reference exists"
    # The solvers get the estimate, in the normalised units of y; the coil maps are calibrated on the
    # whole band of fully-sampled centre columns (all rows), the phase comes from all acquired lines.
    # Multi-coil: the likelihood std is the larger of the noise estimate and the SENSE residual.
    task = prepare_mri(path, SIZE, MRIOptions(accel=3, center_fraction=0.25), slice_index=1)
    assert problem["sense_residual_sigma"] > 0
    assert task.noise_sigma == pytest.approx(max(problem["noise_sigma"], problem["sense_residual_sigma"]), rel=1e-6)
    assert problem["noise_sigma"] * task.scale == pytest.approx(problem["noise_sigma_kspace_units"], rel=1e-6)
    rows, cols = calib_region(task.mask)
    assert rows == SIZE and f"{rows}x{cols} calibration region" in notes
    assert "phase from a TV reconstruction of all acquired lines" in notes
    # Without the simulation options there is nothing to call ignored.
    assert "ignored_options" not in task.info and not any("ignored" in n for n in task.notes)


def test_kspace_off_the_network_grid_is_padded_and_cropped_back(prior: Path, tmp_path: Path) -> None:
    """k-space whose grid the network cannot take (30 x 26) is solved on the padded 32 x 32 grid and
    written back on the scan's 30 x 26 grid."""
    import h5py

    from mediff.physics.mri import fft2c, simulate_coil_maps

    img = phantom()[1:31, 3:29].astype(np.complex64)
    k = fft2c(simulate_coil_maps(img.shape, 4, seed=1)[None] * torch.from_numpy(img)[None, None])[0]
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=k.numpy())
    out = tmp_path / "o"
    code, _, err = recon(prior, path, out, "--solver", "dds", "--steps", 3, "--accel", 2, "--center-fraction", 0.25,
                         "--compare", "zero-filled")
    assert code == 0, err
    rec, _ = read_nifti(out / "recon.nii.gz")
    assert rec.shape == (30, 26)
    assert "padded to 32x32" in " ".join(metrics_of(out)["notes"])


def _single_coil_npz(path: Path, mask: np.ndarray, undersample: bool) -> np.ndarray:
    from mediff.physics.mri import fft2c

    k = fft2c(torch.from_numpy(phantom()).to(torch.complex64)[None, None])[0].numpy()  # (1, H, W)
    if undersample:
        k = k * np.broadcast_to(mask, (SIZE, SIZE))
    np.savez(path, kspace=k.astype(np.complex64), mask=mask)
    return k


def _centre_mask(width: int = 6, every: int = 4) -> np.ndarray:
    cols = np.zeros(SIZE, dtype=bool)
    cols[::every] = True
    cols[SIZE // 2 - width // 2: SIZE // 2 - width // 2 + width] = True
    return cols


@pytest.mark.parametrize("mask_kind", ["1d", "2d"])
def test_npz_kspace_with_mask(prior: Path, tmp_path: Path, mask_kind: str) -> None:
    cols = _centre_mask()
    mask = cols if mask_kind == "1d" else np.broadcast_to(cols, (SIZE, SIZE)).astype(np.float32)
    path = tmp_path / "k.npz"
    _single_coil_npz(path, mask, undersample=True)
    out = tmp_path / "k"
    code, _, err = recon(prior, path, out, "--solver", "dds", "--steps", 3, "--compare", "zero-filled")
    assert code == 0, err
    rec = metrics_of(out)
    assert rec["nfe"] == 3 and rec["problem"]["coils"] == 1
    assert rec["problem"]["accel"] == pytest.approx(SIZE / cols.sum())
    # Undersampled k-space only: no reference, so no image metrics.
    assert "PSNR" not in rows_by_method(rec)["dds"]
    r, _ = read_nifti(out / "recon.nii.gz")
    zf, _ = read_nifti(out / "zero_filled.nii.gz")
    assert r.shape == zf.shape == (SIZE, SIZE)
    assert_same_units(r, phantom())
    # The zero-filled output is |F^H y| of the file's k-space, in its units.
    from mediff.physics.mri import ifft2c

    with np.load(path) as d:
        expected = ifft2c(torch.from_numpy(d["kspace"])[None]).abs()[0, 0].numpy()
    np.testing.assert_allclose(zf, expected, rtol=0, atol=1e-3 * expected.max())


# ------------------------------------------------------------------------ user errors


def _nan_kspace(tmp: Path) -> Path:
    p = tmp / "nan.npz"
    k = np.ones((1, SIZE, SIZE), np.complex64)
    k[0, 3, 4] = np.nan
    np.savez(p, kspace=k, mask=_centre_mask())
    return p


def _shape_mismatch_2d(tmp: Path) -> Path:
    p = tmp / "mismatch2d.npz"
    np.savez(p, kspace=np.ones((1, SIZE, SIZE), np.complex64), mask=np.ones((SIZE, SIZE + 16), bool))
    return p


def _shape_mismatch_1d(tmp: Path) -> Path:
    p = tmp / "mismatch1d.npz"
    np.savez(p, kspace=np.ones((1, SIZE, SIZE), np.complex64), mask=np.ones(SIZE + 16, bool))
    return p


def _all_zero(tmp: Path) -> Path:
    p = tmp / "zero.npz"
    np.savez(p, kspace=np.zeros((1, SIZE, SIZE), np.complex64), mask=_centre_mask())
    return p


def _nan_kspace_h5(tmp: Path) -> Path:
    pytest.importorskip("h5py")
    p = tmp / "nan.h5"
    multicoil_h5(p, nan=True)
    return p


def _h5_without_kspace(tmp: Path) -> Path:
    h5py = pytest.importorskip("h5py")
    p = tmp / "nok.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("reconstruction_rss", data=phantom()[None])
    return p


BAD_INPUTS = {
    "nan-kspace": (_nan_kspace, ("nan",)),
    "nan-kspace-h5-multicoil": (_nan_kspace_h5, ("nan",)),
    "mask-shape-2d": (_shape_mismatch_2d, ("mask",)),
    "mask-shape-1d": (_shape_mismatch_1d, ("mask",)),
    "all-zero-kspace": (_all_zero, ("zero",)),
    "h5-no-kspace": (_h5_without_kspace, ("kspace",)),
    "missing-input": (lambda t: t / "nope.nii.gz", ("not found",)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_no_output(prior: Path, tmp_path: Path, case: str) -> None:
    make, needles = BAD_INPUTS[case]
    src = tmp_path / "in"
    src.mkdir()
    inp = make(src)
    parent = tmp_path / "outs"
    parent.mkdir()
    code, _, err = recon(prior, inp, parent / "o", "--solver", "dds", "--steps", 2, "--compare", "zero-filled")
    assert_one_line_error(code, err, *needles)
    assert list(parent.iterdir()) == [], "no output folder (or temporary sibling) may be left behind"


def test_unknown_solver(prior: Path, inputs: dict, tmp_path: Path) -> None:
    code, _, err = recon(prior, inputs["png"], tmp_path / "o", "--solver", "nope", "--steps", 2)
    assert_one_line_error(code, err, "unknown solver", "nope")
    assert list(tmp_path.iterdir()) == []


def test_unknown_compare_baseline(prior: Path, inputs: dict, tmp_path: Path) -> None:
    code, _, err = recon(prior, inputs["png"], tmp_path / "o", "--steps", 2, "--compare", "zero-filled,dds")
    assert_one_line_error(code, err, "--compare")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("solver, value, needle", [("langevin", 3, "--cg-iters"), ("tv", 3, "--cg-iters"),
                                                   ("dds", 0, ">= 1")])
def test_cg_iters_errors(prior: Path, inputs: dict, tmp_path: Path, solver: str, value: int, needle: str) -> None:
    code, _, err = recon(prior, inputs["png"], tmp_path / "o", "--solver", solver, "--steps", 2, "--cg-iters", value)
    assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_cg_iters_option_reaches_the_solver(prior: Path, inputs: dict, tmp_path: Path) -> None:
    """``--cg-iters K`` runs DDS with K CG steps per update instead of the default (5 single-coil):
    another image, and metrics.json records K; ``run_solver(cg_iters=K)`` likewise."""
    from mediff.prior import load_prior
    from mediff.recon import MRIOptions, prepare_mri, run_solver

    outs = {k: tmp_path / f"cg{k}" for k in (None, 1)}
    for k, out in outs.items():
        extra = () if k is None else ("--cg-iters", k)
        code, _, err = recon(prior, inputs["png"], out, "--solver", "dds", "--steps", 3, "--compare", "", *extra)
        assert code == 0, err
    assert metrics_of(outs[None])["cg_iters"] == 5 and metrics_of(outs[1])["cg_iters"] == 1
    default, one = (read_nifti(out / "recon.nii.gz")[0] for out in outs.values())
    assert not np.allclose(default, one, atol=1e-4 * default.max())
    p = load_prior(prior)
    task = prepare_mri(inputs["png"], p.image_size, MRIOptions(accel=4.0, center_fraction=0.125))
    direct = run_solver(task, "dds", p, steps=3, seed=0, cg_iters=1).mean
    assert not torch.equal(direct, run_solver(task, "dds", p, steps=3, seed=0).mean)


def test_existing_output_needs_overwrite(prior: Path, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = recon(prior, inputs["png"], out, "--solver", "zero-filled", "--steps", 2, "--compare", "")
    assert_one_line_error(code, err, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["o"], "no temporary folder may be left behind"
    # With --overwrite the folder is replaced by the new outputs.
    code, _, err = recon(prior, inputs["png"], out, "--solver", "zero-filled", "--steps", 2, "--compare", "",
                         "--overwrite")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and {"recon.nii.gz", "metrics.json", "report.html"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_same_seed_same_recon(prior: Path, inputs: dict, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        code, _, err = run_cli("reconstruct", "--input", inputs["png"], "--out", out, "--model", prior, "--seed", seed,
                               "--solver", "dds", "--steps", 2, "--compare", "zero-filled", "--center-fraction", 0.125)
        assert code == 0, err
    ra, rb, rc = (read_nifti(p / "recon.nii.gz")[0] for p in (a, b, c))
    np.testing.assert_array_equal(ra, rb)
    assert not np.allclose(ra, rc), "another seed (mask and sampler) must give another reconstruction"


def test_dds_cg_steps_follow_the_operator(prior: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DDS runs 5 CG steps on single-coil MRI (a near-projection normal operator), the solver's
    default on multi-coil MRI and more on CT; ``run_solver`` hands that count to the solver."""
    from mediff.prior import load_prior
    from mediff.recon import CTOptions, MRIOptions, run_solver, simulate_ct, simulate_mri
    from mediff.recon.policy import DDS_CG_ITERS
    from mediff.recon.run import default_cg_iters
    from mediff.solvers import SOLVERS, SolverSpec

    single = simulate_mri(phantom() / 800.0, MRIOptions(accel=4.0, center_fraction=0.125, coils=1), seed=0)
    multi = simulate_mri(phantom() / 800.0, MRIOptions(accel=4.0, center_fraction=0.125, coils=4), seed=0)
    ct = simulate_ct(phantom(peak=1000.0) - 1000.0, CTOptions(views=20), seed=0)
    assert default_cg_iters(single, "dds") == DDS_CG_ITERS["mri-single"] == 5
    assert default_cg_iters(multi, "dds") == DDS_CG_ITERS["mri-multi"] > 5
    assert default_cg_iters(ct, "dds") == DDS_CG_ITERS["ct"] > DDS_CG_ITERS["mri-multi"]
    fine = simulate_ct(np.full((512, 512), -1000.0), CTOptions(views=4), seed=0)  # a 512-px slice's own grid
    assert fine.family == "ct-fine" and default_cg_iters(fine, "dds") == DDS_CG_ITERS["ct-fine"]
    assert default_cg_iters(single, "ddnm") == SOLVERS["ddnm"].cg_iters
    p = load_prior(prior)
    monkeypatch.setitem(SOLVERS, "dds-cg5", SolverSpec("ddim", "prox", cg_iters=5, eta=SOLVERS["dds"].eta))
    a, b = (run_solver(single, m, p, steps=3, seed=1).mean for m in ("dds", "dds-cg5"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_measured_kspace_tv_baseline_is_the_phase_reconstruction_not_solved_again(tmp_path: Path) -> None:
    """The set-up of measured k-space solves TV for the phase (``data_phase``); the TV baseline at its
    default weight is that reconstruction, equal to solving it afresh, and a task on another
    operator solves its own."""
    import dataclasses

    import h5py

    from mediff import baselines
    from mediff.recon import MRIOptions, policy, prepare_mri

    path = tmp_path / "file_brain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=_multicoil_kspace(4))
    task = prepare_mri(path, SIZE, MRIOptions(accel=3, center_fraction=0.25))
    fresh = baselines.tv_reconstruct(task.op, task.y, policy.BASELINE_LAMBDA["mri"]["tv"],
                                     iters=policy.BASELINE_ITERS["mri"])
    got = task.baseline("tv", None)
    assert got is task.tv_solved[2] and torch.equal(got, fresh)
    other = dataclasses.replace(task, op=type(task.op)(task.mask, task.op.coil_maps * 1j))
    assert other.baseline("tv", None) is not task.tv_solved[2]
    assert task.baseline("tv", 0.05) is not task.tv_solved[2]  # another weight: solved


def test_mri_working_pixel_and_the_scale_warning(tmp_path: Path) -> None:
    from mediff.recon import MRIOptions, prepare_mri
    from mediff.recon.job import scale_note

    img = np.zeros((64, 48), np.float32)
    img[16:48, 12:36] = 1.0
    from mediff import io

    io.write_nifti(tmp_path / "a.nii.gz", img, np.diag([0.5, 0.5, 3.0, 1.0]))
    task = prepare_mri(tmp_path / "a.nii.gz", 32, MRIOptions(accel=2))
    assert task.info["pixel_size_mm"] == pytest.approx(1.0)  # 64 px of 0.5 mm onto 32 px
    assert scale_note(1.0, (0.9, 1.1), "p") is None and scale_note(None, (1.0, 1.0), "p") is None
    assert "2x the size" in scale_note(1.0, (2.0, 2.0), "p") and "0.5x the size" in scale_note(4.0, (2.0, 2.0), "p")
