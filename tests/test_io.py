"""Tests for mediff.io: round trips, DICOM geometry and ordering, bad input, atomic writes, real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mediff.errors import MediffError
from mediff.io import (
    MedicalImage,
    describe,
    dicom_modality,
    read_image,
    read_kspace_h5,
    slices_to_volume,
    volume_to_slices,
    write_dicom,
    write_image,
    write_nifti,
    write_npz,
    write_png,
)

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def _testdata(name: str) -> Path:
    # download=False: these files ship inside the pydicom wheel; never touch the network.
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available locally")
    return Path(path)


def _oblique_affine(spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 30.0)) -> np.ndarray:
    """A rotated, anisotropic affine with det < 0 (DICOM's right-handed row, col, slice order)."""
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    flip = np.diag([1.0, 1.0, -1.0])  # make det negative
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ flip @ np.diag(spacing)
    aff[:3, 3] = origin
    assert np.linalg.det(aff[:3, :3]) < 0
    return aff


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".mediff-tmp" in p.name]


# ----------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(7, 6, 5)).astype(np.float32)
    aff = _oblique_affine()
    out = write_nifti(tmp_path / f"v{suffix}", arr, aff)
    img = read_image(out)
    assert img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array, arr)
    # sform is stored as float32: compare at that precision.
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_allclose(img.spacing, (0.8, 0.9, 2.5), atol=1e-5)
    assert img.meta["format"] == "nifti"


def test_nifti_keeps_integer_dtype(tmp_path: Path) -> None:
    arr = np.arange(-30, 30, dtype=np.int16).reshape(3, 4, 5)
    img = read_image(write_nifti(tmp_path / "i.nii.gz", arr))
    assert img.array.dtype == np.int16
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_array_equal(img.affine, np.eye(4))


def test_png_round_trip_8bit_exact(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (20, 31), dtype=np.uint8)
    img = read_image(write_png(tmp_path / "a.png", arr))
    assert img.array.dtype == np.uint8 and img.array.shape == (20, 31)
    np.testing.assert_array_equal(img.array, arr)


def test_png_windowing_and_16bit(tmp_path: Path) -> None:
    arr = np.linspace(-1000, 1000, 12 * 10).reshape(12, 10)
    img8 = read_image(write_png(tmp_path / "w.png", arr, vmin=-1000, vmax=1000))
    assert img8.array.min() == 0 and img8.array.max() == 255
    expected = np.clip(np.rint((arr + 1000) / 2000 * 255), 0, 255)
    np.testing.assert_array_equal(img8.array, expected)
    img16 = read_image(write_png(tmp_path / "w16.png", arr, bits=16))
    assert img16.array.dtype == np.uint16 and img16.array.max() == 65535
    np.testing.assert_allclose(img16.array / 65535 * 2000 - 1000, arr, atol=2000 / 65535)


def test_npz_round_trip_and_key_rule(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).normal(size=(4, 5, 6)).astype(np.float32)
    aff = _oblique_affine()
    out = write_npz(tmp_path / "a.npz", other=np.zeros(3), image=arr, affine=aff)
    img = read_image(out)
    np.testing.assert_array_equal(img.array, arr)  # "image" wins over the earlier "other"
    np.testing.assert_array_equal(img.affine, aff)
    assert img.meta["key"] == "image"
    # "hu" marks CT; without a known key the first non-metadata array is taken.
    assert read_image(write_npz(tmp_path / "h.npz", hu=np.zeros((2, 2), np.int16))).modality == "CT"
    first = read_image(write_npz(tmp_path / "f.npz", affine=np.eye(4), b=np.ones(2), c=np.zeros(3)))
    assert first.meta["key"] == "b"
    np.testing.assert_array_equal(read_image(out, key="other").array, np.zeros(3))
    with pytest.raises(MediffError, match="missing_key"):
        read_image(out, key="missing_key")


def test_write_image_npz_keeps_geometry(tmp_path: Path) -> None:
    src = MedicalImage(np.ones((3, 4, 5), np.float32), _oblique_affine(), modality="MR")
    back = read_image(write_image(tmp_path / "g.npz", src))
    np.testing.assert_array_equal(back.affine, src.affine)
    assert back.modality == "MR"


def test_dicom_2d_mr_round_trip(tmp_path: Path) -> None:
    arr = np.random.default_rng(3).integers(0, 4000, (24, 20)).astype(np.uint16)
    (out,) = write_dicom(tmp_path / "mr.dcm", arr, modality="MR", spacing=(0.5, 0.75))
    img = read_image(out)
    np.testing.assert_array_equal(img.array, arr)
    assert img.modality == "MR"
    assert img.spacing == pytest.approx((0.5, 0.75))
    ds = pydicom.dcmread(out)  # a standard Part 10 file
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"


def test_dicom_2d_mr_real_values_are_scaled(tmp_path: Path) -> None:
    arr = np.random.default_rng(4).uniform(0, 3.7, (16, 16)).astype(np.float32)
    (out,) = write_dicom(tmp_path / "mrf.dcm", arr)
    img = read_image(out)
    slope = img.meta["RescaleSlope"]
    assert slope < 1e-3
    np.testing.assert_allclose(img.array, arr, atol=slope / 2 + 1e-6)


def test_dicom_ct_negative_hu_round_trip(tmp_path: Path) -> None:
    hu = np.random.default_rng(5).integers(-1024, 3071, (16, 18)).astype(np.int16)
    hu[0, 0], hu[0, 1] = -1024, 3071
    (out,) = write_dicom(tmp_path / "ct.dcm", hu, modality="CT", spacing=(0.7, 0.7))
    ds = pydicom.dcmread(out)
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert ds.pixel_array.dtype == np.int16 and ds.pixel_array.min() == 0  # stored = HU + 1024
    img = read_image(out)
    assert img.modality == "CT"
    np.testing.assert_array_equal(img.array, hu)
    raw = read_image(out, raw=True)
    np.testing.assert_array_equal(raw.array, hu.astype(np.int32) + 1024)


def test_dicom_modality_from_headers_of_a_file_and_a_series(tmp_path: Path) -> None:
    (ct,) = write_dicom(tmp_path / "ct.dcm", np.zeros((4, 4)), modality="CT")
    write_dicom(tmp_path / "mr_series", np.zeros((4, 4, 3)), modality="MR")
    assert dicom_modality(ct) == "CT"
    assert dicom_modality(tmp_path / "mr_series") == "MR"
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediffError, match="no DICOM files"):
        dicom_modality(tmp_path / "empty")


def test_dicom_ct_out_of_range_refused(tmp_path: Path) -> None:
    with pytest.raises(MediffError, match="16-bit"):
        write_dicom(tmp_path / "bad.dcm", np.full((4, 4), 40000.0), modality="CT")


def test_dicom_series_round_trip_oblique(tmp_path: Path) -> None:
    vol = np.random.default_rng(6).integers(-1000, 2000, (10, 12, 6)).astype(np.float32)
    aff = _oblique_affine()
    files = write_dicom(tmp_path / "series", vol, modality="CT", affine=aff)
    assert len(files) == 6
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}
    assert len(uids) == 1
    img = read_image(tmp_path / "series")
    assert img.meta["format"] == "dicom-series" and img.meta["n_files"] == 6
    np.testing.assert_array_equal(img.array, vol)
    np.testing.assert_allclose(img.affine, aff, atol=1e-4)
    np.testing.assert_allclose(img.spacing, (0.8, 0.9, 2.5), atol=1e-5)
    # IPP advances by the slice step along the normal.
    ipp = np.array([[float(v) for v in pydicom.dcmread(f).ImagePositionPatient] for f in files])
    np.testing.assert_allclose(np.linalg.norm(np.diff(ipp, axis=0), axis=1), 2.5, atol=1e-4)


def test_dicom_series_order_from_positions_not_names(tmp_path: Path) -> None:
    vol = np.stack([np.full((8, 8), 100 * k, np.int16) for k in range(7)], axis=-1)
    files = write_dicom(tmp_path / "s", vol, spacing=(1.0, 1.0, 3.0))
    # Rename so that name order is a shuffle of position order, and scramble InstanceNumber too.
    perm = [3, 6, 0, 5, 1, 4, 2]
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = perm[k] + 1
        ds.save_as(f)
        f.rename(f.with_name(f"slice_{perm[k]:02d}.dcm"))
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    by_name = [int(pydicom.dcmread(tmp_path / "s" / n).pixel_array[0, 0]) for n in names]
    assert by_name != sorted(by_name)  # the test is meaningful: name order is wrong
    img = read_image(tmp_path / "s")
    np.testing.assert_array_equal(img.array, vol)
    assert img.array[0, 0, :].tolist() == [100 * k for k in range(7)]


def test_dicom_folder_with_two_series_takes_largest(tmp_path: Path) -> None:
    big = write_dicom(tmp_path / "a", np.ones((4, 4, 3), np.int16))
    small = write_dicom(tmp_path / "b", np.zeros((4, 4, 2), np.int16))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in big + small:
        f.rename(mixed / f"{f.parent.name}_{f.name}")
    img = read_image(mixed)
    assert img.array.shape == (4, 4, 3) and "2 series" in img.meta["series_note"]
    # A tie for the largest is ambiguous.
    for f in write_dicom(tmp_path / "c", np.zeros((4, 4, 3), np.int16)):
        f.rename(mixed / f"c_{f.name}")
    with pytest.raises(MediffError, match="series_uid"):
        read_image(mixed)
    uid = str(pydicom.dcmread(mixed / "b_IM_00001.dcm").SeriesInstanceUID)
    assert read_image(mixed, series_uid=uid).array.shape == (4, 4, 2)


# ----------------------------------------------------------------------------------------------------
# pydicom's real test files
# ----------------------------------------------------------------------------------------------------


def test_ct_small_hu_matches_manual_rescale() -> None:
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    manual = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = read_image(path)
    assert img.modality == "CT"
    np.testing.assert_array_equal(img.array, manual)
    assert img.array.min() == manual.min() and img.array.max() == manual.max()
    assert img.array.min() < 0  # HU, not stored values
    # Voxel (0, 0) sits at ImagePositionPatient (LPS -> RAS flips x and y).
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(img.affine[:3, 3], ipp * [-1, -1, 1])
    assert img.spacing == pytest.approx([float(v) for v in ds.PixelSpacing])


def test_mr_small_reads() -> None:
    path = _testdata("MR_small.dcm")
    img = read_image(path)
    assert img.array.shape == (64, 64) and img.modality == "MR"
    np.testing.assert_array_equal(img.array, pydicom.dcmread(path).pixel_array)
    info = describe(path)
    assert info["shape"] == [64, 64] and info["modality"] == "MR" and info["format"] == "dicom"


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.nii.gz"
    with pytest.raises(MediffError, match="nope.nii.gz"):
        read_image(p)


def test_empty_folder(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(MediffError, match="empty"):
        read_image(d)


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(MediffError, match="notes.txt"):
        read_image(p)


def test_truncated_dicom(tmp_path: Path) -> None:
    p = tmp_path / "trunc.dcm"
    p.write_bytes(_testdata("CT_small.dcm").read_bytes()[:300])
    with pytest.raises(MediffError, match="trunc.dcm"):
        read_image(p)
    # The same file inside a series folder is reported by name too.
    d = tmp_path / "ser"
    d.mkdir()
    (d / "x.dcm").write_bytes(p.read_bytes())
    with pytest.raises(MediffError, match="x.dcm"):
        read_image(d)


def test_truncated_pixel_data(tmp_path: Path) -> None:
    data = _testdata("CT_small.dcm").read_bytes()
    p = tmp_path / "cut.dcm"
    p.write_bytes(data[: len(data) - 5000])  # header intact, pixel data short
    with pytest.raises(MediffError, match="cut.dcm"):
        read_image(p)


def test_corrupt_nifti(tmp_path: Path) -> None:
    p = tmp_path / "bad.nii.gz"
    p.write_bytes(os.urandom(2000))
    with pytest.raises(MediffError, match="bad.nii.gz"):
        read_image(p)
    # A valid gzip stream that stops half-way through the voxels.
    good = write_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    half = tmp_path / "half.nii.gz"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MediffError, match="half.nii.gz"):
        read_image(half)


def test_corrupt_other_formats(tmp_path: Path) -> None:
    for name in ("x.png", "x.npz", "x.npy", "x.h5"):
        p = tmp_path / name
        p.write_bytes(b"\x00garbage" * 50)
        with pytest.raises(MediffError, match=name):
            read_image(p)


def test_npz_without_image_and_h5_without_rss(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    empty = tmp_path / "meta.npz"
    np.savez(empty, affine=np.eye(4))
    with pytest.raises(MediffError, match="meta.npz"):
        read_image(empty)
    p = tmp_path / "k.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = np.zeros((1, 4, 4), np.complex64)
    with pytest.raises(MediffError, match="reconstruction_rss"):
        read_image(p)


# ----------------------------------------------------------------------------------------------------
# Overwrite refusal and atomicity
# ----------------------------------------------------------------------------------------------------


def test_overwrite_refused_and_allowed(tmp_path: Path) -> None:
    arr = np.zeros((4, 4), np.uint8)
    writers = {
        "a.nii.gz": lambda p, **kw: write_nifti(p, arr, **kw),
        "a.png": lambda p, **kw: write_png(p, arr, **kw),
        "a.npz": lambda p, **kw: write_npz(p, image=arr, **kw),
        "a.dcm": lambda p, **kw: write_dicom(p, arr, **kw),
    }
    for name, write in writers.items():
        p = tmp_path / name
        write(p)
        before = p.read_bytes()
        with pytest.raises(MediffError, match="overwrite"):
            write(p)
        assert p.read_bytes() == before  # untouched
        write(p, overwrite=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(writers)  # no temp files left
    vol = np.zeros((4, 4, 3), np.int16)
    write_dicom(tmp_path / "ser", vol)
    with pytest.raises(MediffError, match="overwrite"):
        write_dicom(tmp_path / "ser", vol)
    write_dicom(tmp_path / "ser", vol[..., :2], overwrite=True)
    assert len(list((tmp_path / "ser").iterdir())) == 2  # old slices replaced, not mixed
    assert _no_temp_files(tmp_path)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(MediffError):
        write_dicom(tmp_path / "x.dcm", np.full((4, 4), 1e9), modality="CT")
    with pytest.raises(MediffError):
        write_nifti(tmp_path / "x.nii.gz", np.zeros((2, 2)), affine=np.eye(3))
    with pytest.raises(MediffError):
        write_png(tmp_path / "x.png", np.zeros((2, 2, 2)))
    assert list(tmp_path.iterdir()) == []


def test_crash_during_write_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(fh, **arrays):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    with pytest.raises(MediffError, match="crash.npz"):
        write_npz(tmp_path / "crash.npz", image=np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_written_files_have_normal_permissions(tmp_path: Path) -> None:
    p = write_npz(tmp_path / "perm.npz", image=np.zeros(2))
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------------
# Slices, describe
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_slices_round_trip(axis: int) -> None:
    vol = MedicalImage(np.random.default_rng(7).normal(size=(5, 6, 7)), _oblique_affine())
    slices = volume_to_slices(vol, axis)
    assert len(slices) == vol.shape[axis]
    k = 3
    idx = [1, 2]
    idx.insert(axis, k)
    uv = [i for a, i in enumerate(idx) if a != axis]
    np.testing.assert_allclose(slices[k].affine @ [*uv, 0, 1], vol.affine @ [*idx, 1])
    assert slices[k].array[uv[0], uv[1]] == vol.array[tuple(idx)]
    back = slices_to_volume(slices, axis)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-12)


def test_describe_dicom_series(tmp_path: Path) -> None:
    write_dicom(tmp_path / "s", np.arange(48, dtype=np.int16).reshape(4, 4, 3), modality="CT", spacing=(0.5, 0.5, 2))
    info = describe(tmp_path / "s")
    assert info["format"] == "dicom-series" and info["shape"] == [4, 4, 3]
    assert info["min"] == 0 and info["max"] == 47 and info["modality"] == "CT"
    assert info["spacing"] == [0.5, 0.5, 2.0]
    json.dumps(info)


# ----------------------------------------------------------------------------------------------------
# fastMRI HDF5
# ----------------------------------------------------------------------------------------------------


def test_fastmri_h5(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(9)
    ks = (rng.normal(size=(2, 4, 16, 16)) + 1j * rng.normal(size=(2, 4, 16, 16))).astype(np.complex64)
    rss = rng.uniform(size=(2, 16, 16)).astype(np.float32)
    p = tmp_path / "file_brain.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = ks
        f["reconstruction_rss"] = rss
        f["mask"] = np.array([1, 0] * 8, np.float32)
        f.attrs["acquisition"] = "AXT1"
        f.attrs["max"] = np.float64(0.5)
        f.attrs["patient_id"] = b"abc"
    d = read_kspace_h5(p)
    assert d["kspace"].dtype == np.complex64
    np.testing.assert_array_equal(d["kspace"], ks)
    np.testing.assert_array_equal(d["reconstruction_rss"], rss)
    assert d["mask"].shape == (16,)
    assert d["attrs"] == {"acquisition": "AXT1", "max": 0.5, "patient_id": "abc"}
    json.dumps(d["attrs"])
    one = read_kspace_h5(p, slices=1)
    np.testing.assert_array_equal(one["kspace"], ks[1])
    img = read_image(p)
    np.testing.assert_array_equal(img.array, rss)
    assert img.meta["axes"] == "slice,row,col"
    info = describe(p)
    assert info["kspace_shape"] == [2, 4, 16, 16] and info["coils"] == 4 and info["kspace_dtype"] == "complex64"
    assert info["max"] == pytest.approx(float(rss.max()))
    with pytest.raises(MediffError, match="kspace"):
        bad = tmp_path / "nok.h5"
        with h5py.File(bad, "w") as f:
            f["x"] = np.zeros(2)
        read_kspace_h5(bad)


# ----------------------------------------------------------------------------------------------------
# Real data (skips when ../shared/data is absent)
# ----------------------------------------------------------------------------------------------------


def _first_ixi(ixi_dir: Path) -> Path:
    vols = sorted((ixi_dir / "volumes").glob("IXI*_T1.nii.gz"))
    if not vols:
        pytest.skip("no IXI volumes")
    return vols[0]


def test_ixi_volume_and_slices(ixi_dir: Path) -> None:
    img = read_image(_first_ixi(ixi_dir))
    assert img.shape == (120, 120, 90)
    assert img.spacing == pytest.approx((2.0, 2.0, 2.0), abs=0.05)
    raw = read_image(_first_ixi(ixi_dir), raw=True)
    assert raw.array.dtype == np.uint8
    slices = volume_to_slices(img, axis=2)
    assert len(slices) == 90
    for k in (0, 45, 89):
        np.testing.assert_allclose(slices[k].affine @ [0, 0, 0, 1], img.affine @ [0, 0, k, 1])
        np.testing.assert_array_equal(slices[k].array, img.array[:, :, k])


def test_ixi_to_dicom_series_and_back(ixi_dir: Path, tmp_path: Path) -> None:
    raw = read_image(_first_ixi(ixi_dir), raw=True)
    vol = raw.array[:, :, 40:50]  # 10 slices keep the test fast
    sub = MedicalImage(
        vol, raw.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 40], [0, 0, 0, 1.0]]), modality="MR"
    )
    write_dicom(tmp_path / "ixi", sub)
    back = read_image(tmp_path / "ixi")
    np.testing.assert_array_equal(back.array, vol)
    np.testing.assert_allclose(back.affine, sub.affine, atol=1e-4)
