"""CT reconstruction end to end: ``mediff reconstruct`` in CT mode on a synthetic HU phantom.

The phantom (64 px, 1.5 mm pixels): air (-1000 HU) around a water ellipse (0 HU) with a bone insert
(+1000 HU) and a lung-like insert (-500 HU). Everything runs in-process on 64 px images so the
default run stays well under a minute; the CT prior is a 2-step 32 px network (its output is not
meant to be good, only to go through the whole pipeline).

HU tolerance: the Joseph projector and the Kak & Slaney FBP are calibrated (``test_ct``), so in flat
regions of hundreds of pixels the mean is exact up to streak artefacts that average out (measured:
air median within 3 HU, water mean within 2 HU for FBP at 30-60 views, < 1 HU for TV). 20 HU (1 % of
the [-1000, 1000] window) leaves room for that while any units mistake (attenuation vs HU, pixel
size ignored, window offset lost) moves water or air by hundreds of HU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
import torch

from mediff import io
from mediff.errors import MediffError
from mediff.recon.policy import DDS_CG_ITERS

N = 64
PX = 1.5  # mm
TOL_HU = 20.0
CT_OUTPUTS = {"recon.nii.gz", "fbp.nii.gz", "metrics.json", "report.html"}


def regions(n: int = N) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(phantom HU (n, n), air mask, water mask, bone mask); masks keep away from edges."""
    yy, xx = (np.mgrid[:n, :n] - (n - 1) / 2) / (n / 2)
    r = (xx / 0.8) ** 2 + (yy / 0.65) ** 2
    bone_d2 = (xx - 0.3) ** 2 + (yy + 0.1) ** 2
    lung_d2 = (xx + 0.35) ** 2 + (yy - 0.15) ** 2
    hu = np.full((n, n), -1000.0, np.float32)
    hu[r < 1] = 0.0
    hu[bone_d2 < 0.15**2] = 1000.0
    hu[lung_d2 < 0.12**2] = -500.0
    water = (r < 0.6) & (bone_d2 > 0.3**2) & (lung_d2 > 0.27**2)
    return hu, r > 1.3, water, bone_d2 < 0.1**2




def load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def assert_hu(a: np.ndarray, bone: bool = True) -> None:
    """Air, water (and the bone insert, unless the image went through a coarser grid) in HU."""
    _, air, water, bone_mask = regions()
    assert a.shape == (N, N)
    assert abs(np.median(a[air]) + 1000) < TOL_HU, np.median(a[air])
    assert abs(a[water].mean()) < TOL_HU, a[water].mean()
    if bone:
        assert abs(a[bone_mask].mean() - 1000) < 3 * TOL_HU, a[bone_mask].mean()  # small insert: edge blur


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct")
    hu = regions()[0]
    affine = np.diag([PX, PX, PX, 1.0])
    io.write_nifti(root / "ph.nii.gz", hu, affine)
    io.write_dicom(root / "ph.dcm", hu, modality="CT", spacing=(PX, PX, PX))
    vol = np.stack([hu, hu, np.full_like(hu, -1000.0)], axis=-1)  # slices along the 3rd (S) axis
    io.write_nifti(root / "vol.nii.gz", vol, affine)
    bad = hu.copy()
    bad[3, 3] = np.nan
    io.write_nifti(root / "nan.nii.gz", bad, affine)
    io.write_nifti(root / "mr.nii.gz", ((hu + 1000) / 2000 * 255).astype(np.uint8), affine)
    return {"nii": root / "ph.nii.gz", "dcm": root / "ph.dcm", "vol": root / "vol.nii.gz", "nan": root / "nan.nii.gz",
            "mr": root / "mr.nii.gz"}


def test_fbp_nifti_in_hu(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", out, "--solver", "fbp", "--views", 60,
                           "--compare", "")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == CT_OUTPUTS
    assert_hu(load(out / "recon.nii.gz"))
    np.testing.assert_allclose(load(out / "fbp.nii.gz"), load(out / "recon.nii.gz"))
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["modality"] == "ct" and rec["problem"]["views"] == 60 and rec["problem"]["pixel_size_mm"] == PX
    row = rec["metrics"][0]
    assert row["method"] == "fbp" and row["NFE"] == 0 and row["PSNR"] > 25 and {"SSIM", "NMSE", "seconds"} <= set(row)
    html = (out / "report.html").read_text()
    assert "CT reconstruction" in html and "sinogram" in html


def test_tv_dicom_in_hu_and_dicom_round_trip(files: dict[str, Path], tmp_path: Path) -> None:
    """A CT DICOM selects CT mode by itself (default 60 views); --dicom writes HU that reads back."""
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", files["dcm"], "--out", out, "--solver", "tv", "--dicom")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == CT_OUTPUTS | {"recon_dicom"}
    recon = load(out / "recon.nii.gz")
    assert_hu(recon)
    back = io.read_image(out / "recon_dicom")
    assert back.modality == "CT"
    np.testing.assert_allclose(np.squeeze(back.array), recon, atol=0.51)  # int16, slope 1: rounding only
    np.testing.assert_allclose(back.spacing[:2], (PX, PX), rtol=1e-6)
    rec = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in rec["metrics"]] == ["tv", "fbp"] and rec["problem"]["views"] == 60


def test_tv_beats_fbp_at_30_views(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", out, "--solver", "tv", "--views", 30)
    assert code == 0, err
    psnr = {r["method"]: r["PSNR"] for r in json.loads((out / "metrics.json").read_text())["metrics"]}
    assert psnr["tv"] > psnr["fbp"] + 1.0, psnr
    assert_hu(load(out / "recon.nii.gz"))


@pytest.mark.parametrize("args, key, value", [(("--limited-angle", 120, "--views", 40), "angles", "0-120 deg"),
                                              (("--dose", 1e4, "--views", 90), "dose_I0", 1e4)])
def test_limited_angle_and_low_dose(files: dict[str, Path], tmp_path: Path, args: tuple, key: str, value) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", out, "--solver", "tv", "--accel", 8, *args)
    assert code == 0, err
    assert "note: MRI options ignored" in err and "--accel" in err
    rec = json.loads((out / "metrics.json").read_text())
    assert str(rec["problem"][key]).startswith(str(value))
    assert all(np.isfinite(r["PSNR"]) for r in rec["metrics"])
    recon = load(out / "recon.nii.gz")
    assert recon.shape == (N, N) and np.isfinite(recon).all()
    if "--dose" in args:
        assert rec["problem"]["noise_sigma_u"] > 0
        psnr = {r["method"]: r["PSNR"] for r in rec["metrics"]}
        assert psnr["tv"] > psnr["fbp"], psnr  # TV suppresses the Poisson noise that FBP amplifies


def test_volume_input_all_slices_and_one(files: dict[str, Path], tmp_path: Path) -> None:
    """A CT volume: all slices by default (the input's shape and affine), --slice K one of them."""
    out = tmp_path / "o"
    import nibabel as nib

    code, _, err = run_cli("reconstruct", "--input", files["vol"], "--out", out, "--solver", "fbp", "--views", 90,
                           "--compare", "")
    assert code == 0, err
    recon = load(out / "recon.nii.gz")
    assert recon.shape == (N, N, 3)
    np.testing.assert_allclose(nib.load(str(out / "recon.nii.gz")).affine, np.diag([PX, PX, PX, 1.0]))
    assert_hu(recon[:, :, 0])
    assert_hu(recon[:, :, 1])
    np.testing.assert_array_equal(recon[:, :, 0], recon[:, :, 1])  # the same slice, the same simulation
    rec = json.loads((out / "metrics.json").read_text())
    assert [r["slice"] for r in rec["per_slice"]] == [0, 1, 2] and rec["slices"] == [0, 3]
    psnr = [r["metrics"][0]["PSNR"] for r in rec["per_slice"]]
    assert rec["metrics"][0]["PSNR"] == pytest.approx(np.mean(psnr))
    code, _, err = run_cli("reconstruct", "--input", files["vol"], "--out", tmp_path / "m", "--solver", "fbp",
                           "--views", 90, "--slice", 1, "--compare", "")
    assert code == 0, err
    # The RAS volume (axes R, A, S) is reoriented to axial DICOM order (rows to P, columns to L) for the
    # prior, and the result goes back onto the input's grid: output voxel (i, j, 0) is input voxel (i, j, 1).
    recon = load(tmp_path / "m" / "recon.nii.gz")
    assert recon.shape == (N, N, 1)
    assert_hu(recon[:, :, 0])
    aff = nib.load(str(tmp_path / "m" / "recon.nii.gz")).affine
    np.testing.assert_allclose(aff @ [2, 5, 0, 1], np.diag([PX, PX, PX, 1.0]) @ [2, 5, 1, 1])
    code, _, err = run_cli("reconstruct", "--input", files["vol"], "--out", tmp_path / "s", "--solver", "fbp",
                           "--slice", 2, "--compare", "")
    assert code == 0, err
    assert np.abs(load(tmp_path / "s" / "recon.nii.gz") + 1000).max() < 1.0  # slice 2 is all air


def _sinogram_npz(path: Path, n: int, views: int = 90, **extra: object) -> np.ndarray:
    from mediff.physics.ct import ParallelBeamCT, hu_to_mu, sparse_view_angles

    hu = regions(n)[0]
    op = ParallelBeamCT(n, sparse_view_angles(views), pixel_size_mm=PX)
    sino = op.A(hu_to_mu(torch.from_numpy(hu).double())[None, None])[0, 0].numpy()
    np.savez(path, **{"sinogram": sino, "angles_deg": sparse_view_angles(views).numpy(), "image_size": n,
                      "pixel_size_mm": PX, "reference_hu": hu, **extra})
    return sino


@pytest.mark.parametrize("n, size", [(64, None), (64, 32), (63, 64)])
def test_sinogram_file_and_rebinning(tmp_path: Path, n: int, size: int | None) -> None:
    """A measured sinogram on its own grid, downsampled (detector rebinned) and on a larger grid whose
    centre is half a pixel off the image's (rebinning shifts each view): FBP stays calibrated."""
    from mediff.recon import prepare_ct, run_solver

    _sinogram_npz(tmp_path / "s.npz", n)
    task = prepare_ct(tmp_path / "s.npz", size)
    assert task.kind == "ct" and task.solver_operator() is task.op and task.reference is not None
    res = run_solver(task, "fbp")
    assert task.score(res.mean)["PSNR"] > (30 if size is None else 24)
    out = task.input_units(res.mean)
    assert out.shape == (n, n)
    _, air, water, _ = regions(n)
    assert abs(np.median(out[air]) + 1000) < TOL_HU and abs(out[water].mean()) < 2 * TOL_HU


def test_ct_prior_dds(tiny_priors: dict[str, Path], files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", out, "--model", tiny_priors["ct"],
                           "--solver", "dds", "--steps", 2, "--views", 30, "--samples", 2, "--compare", "")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == CT_OUTPUTS | {"std.nii.gz"}
    recon = load(out / "recon.nii.gz")
    assert recon.shape == (N, N) and np.isfinite(recon).all()
    assert -3000 < recon.mean() < 3000  # HU, not u (~0.5) or attenuation (~0.02)
    assert_hu(load(out / "fbp.nii.gz"), bone=False)  # via the prior's 32 px grid: the 9 px insert blurs
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["metrics"][0]["method"] == "dds" and rec["metrics"][0]["NFE"] > 0 and rec["problem"]["grid"] == 32
    assert rec["cg_iters"] == DDS_CG_ITERS["ct"]  # CT's ill-conditioned normal operator
    assert "coverage90" in rec
    # Scored on the input's 64 px grid against the input itself, the 32 px working grid second.
    row = rec["metrics"][0]
    lo, hi = -1000.0, 1000.0
    ref, got = (np.clip(a, lo, hi) - lo for a in (regions()[0], recon))
    assert row["PSNR"] == pytest.approx(10 * np.log10((hi - lo) ** 2 / np.mean((got - ref) ** 2)), abs=1e-3)
    assert {"PSNR_working_grid", "SSIM_working_grid", "NMSE_working_grid"} <= set(row)
    assert "64x64 grid" in rec["units"] and "32x32 working grid" in rec["units"]


def test_input_grid_scoring_sees_the_resolution_lost_on_a_coarser_grid(files: dict[str, Path]) -> None:
    from mediff.recon import CTOptions
    from mediff.recon.ct import prepare_ct

    coarse, native = (prepare_ct(files["nii"], size, CTOptions(60)) for size in (32, N))
    assert native.input_reference is None and "PSNR_working_grid" not in native.score(native.reference)
    perfect = coarse.score(coarse.reference)  # the exact working-grid image, mapped back to 64 px
    assert perfect["PSNR_working_grid"] == float("inf")
    assert 15 < perfect["PSNR"] < 40  # what the 32 px grid loses of the 64 px slice


def test_mr_prior_with_ct_image(tiny_priors: dict[str, Path], files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", files["dcm"], "--out", out, "--model", tiny_priors["mr"],
                           "--steps", 2)
    assert_one_line_error(code, err, "is not a CT prior")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_priors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2-step 32 px priors: one trained on the phantom in HU (a CT prior: hu_window normalisation,
    auto-detected) and one on the same anatomy as relative intensities (percentile: an 'MR' prior)."""
    from mediff.nets import UNetConfig
    from mediff.train import TrainConfig, train

    root = tmp_path_factory.mktemp("prior")
    hu = np.stack([regions(32)[0] * (1 + 0.1 * k) for k in range(6)]).astype(np.float32).clip(-1000, None)
    np.savez(root / "ct.npz", hu=hu.astype(np.int16), patient_id=np.asarray(["a", "b", "c"] * 2))
    np.savez(root / "mr.npz", images=hu + 1000, subject_index=np.arange(6) % 3)
    net = UNetConfig(channels=(8, 16), blocks=(1, 1), attention_levels=(1,)).to_dict()
    for kind in ("ct", "mr"):
        cfg = TrainConfig(size=32, steps=2, batch=4, checkpoint_every=2, val_every=2, n_val_subjects=1, net=net)
        train(root / f"{kind}.npz", root / kind, cfg, progress=False)
    # A native-resolution CT prior: 32 px crops of 64 px slices, never whole slices (it denoises in tiles).
    np.savez(root / "native.npz", hu=np.stack([regions(N)[0] * (1 + 0.1 * k) for k in range(6)]).clip(-1000, None)
             .astype(np.int16), patient_id=np.asarray(["a", "b", "c"] * 2), pixel_spacing_mm=np.full(6, PX))
    cfg = TrainConfig(size=N, steps=2, batch=2, checkpoint_every=2, val_every=2, n_val_subjects=1, patch_sizes=(32,),
                      full_prob=0.0, net={**net, "pos_channels": 2})
    train(root / "native.npz", root / "native", cfg, progress=False)
    return {k: root / k / "prior.safetensors" for k in ("ct", "mr", "native")}


def test_native_resolution_prior_reconstructs_on_the_input_grid(tiny_priors: dict[str, Path], files: dict[str, Path],
                                                                tmp_path: Path) -> None:
    from mediff.prior import load_prior

    assert load_prior(tiny_priors["native"]).model.tile == 32
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", out, "--model", tiny_priors["native"],
                           "--solver", "dds", "--steps", 2, "--views", 30, "--compare", "tv")
    assert code == 0, err
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["problem"]["grid"] == N and f"on the {N}x{N} grid of the input" in rec["units"]
    assert all("PSNR_working_grid" not in row for row in rec["metrics"])
    assert load(out / "recon.nii.gz").shape == (N, N)
    assert load_prior(tiny_priors["native"]).meta.data.pixel_spacing_mm == (PX, PX)
    assert not any(n.startswith("warning") for n in rec["notes"])  # the scan's pixel is the prior's


def test_a_crop_prior_with_a_coarse_whole_image_model_reconstructs_as_two_scales(tiny_priors: dict[str, Path],
                                                                                  files: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    from mediff.denoiser import TwoScale
    from mediff.prior import attach_coarse, attach_guide, load_prior
    from mediff.prior_meta import PriorMeta

    two_path = tmp_path / "two.safetensors"
    attach_coarse(tiny_priors["native"], tiny_priors["ct"], 0.3, two_path)
    two, fine, coarse = (load_prior(p) for p in (two_path, tiny_priors["native"], tiny_priors["ct"]))
    assert isinstance(two.model, TwoScale) and (two.model.factor, two.model.from_sigma) == (2, 0.3)
    assert two.meta.coarse.image_size == 32 and two.meta.coarse.tile is None and two.meta.tile == 32
    assert PriorMeta.from_dict(two.meta.to_dict()) == two.meta and two.meta.coarse.step == coarse.meta.step
    with pytest.raises(MediffError, match="'coarse.from_sigma' must be a number"):
        PriorMeta.from_dict({**two.meta.to_dict(), "coarse": {**two.meta.coarse.to_dict(), "from_sigma": "x"}})
    x = torch.rand(1, 1, N, N, generator=torch.Generator().manual_seed(0))
    for s, want in ((0.1, fine(x, torch.tensor([0.1]))), (1.0, None)):
        got = two(x, torch.tensor([s]))
        if want is None:  # the fine estimate with its 2 x 2 block means replaced by the coarse model's
            delta = coarse(torch.nn.functional.avg_pool2d(x, 2), torch.tensor([s / 2])) - \
                torch.nn.functional.avg_pool2d(fine(x, torch.tensor([s])), 2)
            want = fine(x, torch.tensor([s])) + torch.nn.functional.interpolate(delta, scale_factor=2, mode="bilinear")
        torch.testing.assert_close(got, want)
    guided = tmp_path / "guided.safetensors"  # a guide attached later keeps the coarse model
    attach_guide(two_path, tiny_priors["native"], 2.0, guided)
    assert isinstance(load_prior(guided).model, TwoScale) and load_prior(guided).guide is not None
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", out, "--model", two_path,
                           "--solver", "dds", "--steps", 2, "--views", 30)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["problem"]["grid"] == N
    with pytest.raises(MediffError, match="not an integer factor"):
        attach_coarse(tiny_priors["ct"], tiny_priors["native"], 0.3, tmp_path / "x.safetensors")
    with pytest.raises(MediffError, match="different normalization"):
        attach_coarse(tiny_priors["native"], tiny_priors["mr"], 0.3, tmp_path / "x.safetensors")
    with pytest.raises(MediffError, match="ships a coarse model of its own"):
        attach_coarse(tiny_priors["native"], two_path, 0.3, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_scan_at_another_pixel_size_than_the_prior_learnt_is_flagged(tiny_priors: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    io.write_nifti(tmp_path / "fine.nii.gz", regions()[0], np.diag([PX / 3, PX / 3, PX, 1.0]))
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", tmp_path / "fine.nii.gz", "--out", out, "--model",
                           tiny_priors["native"], "--solver", "dds", "--steps", 1, "--views", 30, "--compare", "")
    assert code == 0, err
    notes = json.loads((out / "metrics.json").read_text())["notes"]
    assert any("learnt from 1.5 mm pixels" in n and "3x the size" in n for n in notes), notes


@pytest.mark.parametrize("case, needle", [("nan", "NaN"), ("mr", "Hounsfield"), ("sino", "sinogram must have shape"),
                                          ("sino_nan", "NaN"), ("views", "--views")])
def test_bad_input(files: dict[str, Path], tmp_path: Path, case: str, needle: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    args: list[object] = ["--views", 60]
    path = files.get(case)
    if case.startswith("sino"):
        path = src / "s.npz"
        sino = _sinogram_npz(path, 32)
        if case == "sino":
            np.savez(path, sinogram=sino[:, :-2], angles_deg=np.arange(90) * 2.0, image_size=32)
        else:
            sino[0, 0] = np.nan
            np.savez(path, sinogram=sino, angles_deg=np.arange(90) * 2.0, image_size=32)
    if case == "views":
        path, args = files["nii"], ["--views", 0]
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--input", path, "--out", out, "--solver", "fbp", *args)
    assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "no output (or temporary) folder may be left"


def test_baselines_are_modality_specific(files: dict[str, Path]) -> None:
    from mediff.recon import CTOptions, MRIOptions, prepare_ct, prepare_mri, run_solver

    ct = prepare_ct(files["nii"], None, CTOptions(views=30))
    for m in ("zero-filled", "l1wavelet"):
        with pytest.raises(MediffError, match="MRI-only"):
            run_solver(ct, m)
    mri = prepare_mri(files["mr"], 64, MRIOptions(accel=4.0))
    assert mri.kind == "mri" and mri.mask is not None and [p.kind for p in mri.data_panels()] == ["mask"]
    with pytest.raises(MediffError, match="CT-only"):
        run_solver(mri, "fbp")
    with pytest.raises(MediffError, match="not a CT prior"):
        prepare_ct(files["nii"], 32, normalization={"kind": "percentile", "percentile": 99.5}, prior_name="brain-t1")


@pytest.mark.parametrize("views, limited", [(30, None), (90, 120.0)])
def test_u_operator_has_unit_norm(views: int, limited: float | None) -> None:
    """DPS/MCG gradient steps need ||op|| ~ 1: the task's operator is A / (px sqrt(N V)), and its data
    are the physical line integrals divided by the same factor (FBP of them is the reference)."""
    from mediff.baselines import op_norm
    from mediff.recon import CTOptions, run_solver, simulate_ct

    task = simulate_ct(regions(48)[0], CTOptions(views=views, limited_angle=limited), pixel_size_mm=0.7)
    assert 0.8 < float(op_norm(task.op, torch.zeros(1, 1, 48, 48), 50)[0]) < 1.2
    np.testing.assert_allclose(task.op.A(task.reference), task.y, rtol=1e-4, atol=1e-4 * float(task.y.abs().max()))
    if limited is None:
        assert task.score(run_solver(task, "fbp").mean)["PSNR"] > 25


def test_low_dose_weights_whiten_the_poisson_noise() -> None:
    """Low dose: bins through the body are noisier than bins through air (var ~ exp(p) / I0); the
    task's weights make the whitened noise homoscedastic with std ``noise_sigma`` (PWLS)."""
    from mediff.recon import CTOptions, simulate_ct

    hu = regions(N)[0]
    hu = np.where(hu > -1000, hu + 1000.0, hu)  # twice water's attenuation: a wide range of line integrals
    task = simulate_ct(hu, CTOptions(views=60, dose=1e4), seed=0, pixel_size_mm=PX)  # p up to ~3: no photon starvation
    clean = task.op.A(task.reference.double()).float()
    resid = (task.y - clean)[0, 0]
    p = clean[0, 0]
    lo, hi = p <= p.quantile(0.3), p >= p.quantile(0.9)  # through air (p = 0) and through the most tissue
    raw = float(resid[hi].std() / resid[lo].std())
    op, y = task.data()
    white = (y - op.A(task.reference.double()).float())[0, 0]
    assert raw > 1.5, raw  # heteroscedastic
    assert 0.8 < float(white[hi].std() / white[lo].std()) < 1.25
    assert abs(float(white.std()) / task.noise_sigma - 1) < 0.15
    noiseless = simulate_ct(hu, CTOptions(views=60), pixel_size_mm=PX)
    assert noiseless.weights is None and noiseless.data()[0] is noiseless.op


def test_low_dose_solvers_and_tv_follow_the_weighted_projector(monkeypatch) -> None:
    """Low dose: the solvers' CG is preconditioned by A^T W A 1 (``CTTask.normal_diagonal``), which is
    lowest where rays cross the body and highest at the edge where they cross air. Noiseless data:
    no diagonal (plain CG). ``run_batch`` hands the diagonal of each task to the solver, and TV
    gets the projector's row and column sums for PDHG's per-entry steps."""
    from types import SimpleNamespace

    from mediff.recon import CTOptions, simulate_ct
    from mediff.recon.run import run_batch

    hu, air, water, _ = regions(N)
    hu = np.where(hu > -1000, hu + 1000.0, hu)
    task = simulate_ct(hu, CTOptions(views=60, dose=1e4), seed=0, pixel_size_mm=PX)
    diag = task.normal_diagonal()
    full = task.solver_operator().normal(torch.ones(1, 1, N, N))
    assert diag.shape == (1, 1, N, N) and float(diag.min()) > 0
    torch.testing.assert_close(diag, full.clamp_min(1e-3 * float(full.max())))
    body, rim = torch.from_numpy(water), torch.from_numpy(air)
    assert float(diag[0, 0][body].mean()) < 0.5 * float(diag[0, 0][rim].mean())
    assert simulate_ct(hu, CTOptions(views=60), pixel_size_mm=PX).normal_diagonal() is None

    seen = []

    def fake_solve(den, prob, shape, *args, **kwargs):
        seen.append(prob.diagonal)
        return torch.zeros(shape), 2

    monkeypatch.setattr("mediff.recon.run.solve", fake_solve)
    prior = SimpleNamespace(meta=SimpleNamespace(sigma_data=0.5), sigma_min=0.002, sigma_max=80.0)
    run_batch([task, task], "dds", prior, steps=2, samples=3)
    assert seen[0].shape == (6, 1, N, N)
    torch.testing.assert_close(seen[0], diag.expand(6, 1, N, N))

    # TV takes PDHG's per-entry steps from the weighted projector's row and column sums.
    from mediff import baselines

    sums = []
    monkeypatch.setattr(baselines, "tv_reconstruct", lambda *a, abs_sums=None, **k: (sums.append(abs_sums), a[2])[1])
    task.baseline("tv", None)
    op, y = task.data()
    torch.testing.assert_close(sums[0][0], op.A(torch.ones(1, 1, N, N)))
    torch.testing.assert_close(sums[0][1], op.AH(torch.ones_like(y)))
    simulate_ct(hu, CTOptions(views=60), pixel_size_mm=PX).baseline("tv", None)
    assert sums[1] is None


@pytest.mark.slow
def test_shipped_ct_prior_on_a_held_out_patient_dicom(ct_dir: Path, tmp_path: Path) -> None:
    """``mediff reconstruct --model ct`` on a real CT slice (written as DICOM in HU) of a patient the
    prior never saw, 60 views: the diffusion solver beats FBP by more than 1 dB and writes HU."""
    import mediff

    prior = mediff.load_prior("ct")
    d = np.load(ct_dir / "ct_hu_512.npz")
    ids = d["patient_id"].astype(str)
    i = int(np.flatnonzero(np.isin(ids, prior.meta.data.val_subjects))[0])
    px = float(d["pixel_spacing_mm"][i])
    dcm = tmp_path / "slice.dcm"
    io.write_dicom(dcm, d["hu"][i].astype(np.float32), modality="CT", spacing=(px, px))
    out = tmp_path / "o"
    code, _, err = run_cli("reconstruct", "--model", "ct", "--input", dcm, "--out", out, "--solver", "ddnm",
                           "--views", 60, "--steps", 30, "--seed", 0)
    assert code == 0, err
    rec = json.loads((out / "metrics.json").read_text())
    psnr = {m["method"]: m["PSNR"] for m in rec["metrics"]}
    assert psnr["ddnm"] > psnr["fbp"] + 1.0, psnr
    recon = load(out / "recon.nii.gz")
    assert recon.shape == (512, 512) and np.median(recon[:32, :32]) < -900  # HU on the input grid: air outside


def test_sampling_a_crop_only_prior_says_what_it_is_for(tiny_priors: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = run_cli("sample", "--model", tiny_priors["native"], "--n", 1, "--steps", 2, "--out", tmp_path / "s")
    assert code == 0, err
    assert "no whole-image anatomy" in json.loads((tmp_path / "s" / "samples.json").read_text())["note"]
    assert "reconstruction prior" in " ".join((out + err).split())


def test_fan_beam_in_hu_on_the_input_grid_and_through_a_coarser_one(tiny_priors: dict[str, Path],
                                                                      files: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", tmp_path / "a", "--solver", "fbp",
                           "--geometry", "fan", "--views", 90, "--compare", "")
    assert code == 0, err
    assert_hu(load(tmp_path / "a" / "recon.nii.gz"))  # the fan FBP is calibrated like the parallel one
    rec = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert rec["problem"]["angles"] == "0-360 deg, fan beam" and "fan-beam" in rec["problem"]["geometry"]
    # A 32 px prior: the fan sinogram is measured on the 64 px grid and rebinned onto the prior's detector.
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", tmp_path / "b", "--model",
                           tiny_priors["ct"], "--solver", "dds", "--steps", 2, "--geometry", "fan", "--views", 90,
                           "--source-distance", 400, "--compare", "")
    assert code == 0, err
    assert_hu(load(tmp_path / "b" / "fbp.nii.gz"), bone=False)
    rec = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert rec["problem"]["grid"] == 32 and "source 400 mm" in rec["problem"]["geometry"]
    assert "detector rebinned" in " ".join(rec["notes"])


@pytest.mark.parametrize("args, needle", [(["--source-distance", 500], "--geometry fan"),
                                          (["--geometry", "cone"], "parallel or fan"),
                                          (["--geometry", "fan", "--source-distance", -1], "source > 0")])
def test_bad_geometry(files: dict[str, Path], tmp_path: Path, args: list, needle: str) -> None:
    code, _, err = run_cli("reconstruct", "--input", files["nii"], "--out", tmp_path / "o", "--solver", "fbp", *args)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()
