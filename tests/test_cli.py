"""End-to-end tests of the ``mediff`` command line: version/help, ``info`` on real and corrupt
files, and ``sample`` from a tiny trained checkpoint.

``info``, ``--version`` and ``--help`` run in real processes (they are cheap: no torch import).
Training and sampling run in-process through ``mediff.cli.main`` to keep the default run fast;
a ``slow`` test repeats sampling in a real process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, blob_slices, run_cli

SIZE = 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OUTPUTS = ("samples_grid.png", "samples.nii.gz", "samples.npz", "samples.json")



def run_proc(*args: object, timeout: float = 300) -> tuple[int, str, str]:
    """Run the ``mediff`` console script (falls back to ``python -m mediff``) in a fresh process."""
    script = Path(sys.executable).with_name("mediff")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mediff"]
    r = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)
    return r.returncode, r.stdout, r.stderr



def info_fields(stdout: str) -> dict[str, str]:
    """``mediff info`` prints ``key: value`` lines."""
    out = {}
    for line in stdout.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------------------------------
# version and help
# --------------------------------------------------------------------------------------------------


def test_version() -> None:
    from mediff import __version__

    code, out, err = run_proc("--version")
    assert code == 0, err
    assert out.strip() == f"mediff {__version__}"


def test_help_lists_commands() -> None:
    code, out, err = run_proc("--help")
    assert code == 0, err
    for cmd in ("info", "train", "sample", "demo"):
        assert re.search(rf"\b{cmd}\b", out), f"{cmd} missing from --help:\n{out}"


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------


def test_info_ct_dicom() -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    code, out, err = run_proc("info", path)
    assert code == 0, err
    f = info_fields(out)
    assert f["modality"] == "CT"
    assert f["format"] == "dicom"
    assert json.loads(f["shape"]) == [ds.Rows, ds.Columns]
    # Values are in HU (rescale applied), not raw stored integers.
    assert float(f["min"]) == pytest.approx(hu.min()) and float(f["max"]) == pytest.approx(hu.max())
    assert -1100 < float(f["min"]) < -800, "CT_small's minimum is air/soft-tissue-ish HU around -900"


def test_info_ixi_nifti(ixi_dir: Path) -> None:
    vols = sorted((ixi_dir / "volumes").glob("IXI*_T1.nii.gz"))
    if not vols:
        pytest.skip(f"no IXI volumes in {ixi_dir / 'volumes'}")
    code, out, err = run_proc("info", vols[0])
    assert code == 0, err
    f = info_fields(out)
    assert f["format"] == "nifti"
    assert json.loads(f["shape"]) == [120, 120, 90]
    assert json.loads(f["spacing"]) == pytest.approx([2.0, 2.0, 2.0])
    assert float(f["min"]) >= 0 and float(f["max"]) > 100


def _truncated_dicom(tmp: Path) -> Path:
    from pydicom.data import get_testdata_file

    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    p = tmp / "truncated.dcm"
    p.write_bytes(raw[: len(raw) // 2])  # cuts through the pixel data
    return p


def _garbage_nifti(tmp: Path) -> Path:
    p = tmp / "garbage.nii.gz"
    p.write_bytes(np.random.default_rng(0).bytes(500))
    return p


def _unsupported(tmp: Path) -> Path:
    p = tmp / "image.xyz"
    p.write_text("hello")
    return p


def _empty_folder(tmp: Path) -> Path:
    p = tmp / "empty"
    p.mkdir()
    return p


CORRUPT = {
    "truncated-dicom": (_truncated_dicom, "truncated.dcm"),
    "garbage-nifti": (_garbage_nifti, "garbage.nii.gz"),
    "unsupported-extension": (_unsupported, "unsupported"),
    "missing-file": (lambda t: t / "missing.nii.gz", "not found"),
    "empty-folder": (_empty_folder, "empty"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_info_bad_input(tmp_path: Path, case: str) -> None:
    make, needle = CORRUPT[case]
    code, out, err = run_proc("info", make(tmp_path))
    assert_one_line_error(code, err, needle)
    assert out == ""


# --------------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prior: 32 px, 2-level UNet, 3 steps on brain-like blobs (trained through the CLI)."""
    root = tmp_path_factory.mktemp("tiny_prior")
    imgs, subj = blob_slices(SIZE, subjects=3, per_subject=3)
    np.savez(root / "d.npz", images=imgs.astype(np.uint8), subject_index=subj)
    code, _, err = run_cli("train", "--data", root / "d.npz", "--out", root / "run", "--size", SIZE, "--channels",
                           "8,16", "--blocks", "1,1", "--batch", 4, "--steps", 3, "--val-subjects", 1,
                           "--val-every", 100, "--no-progress")
    assert code == 0, err
    return root / "run"


def sample(model: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    return run_cli("sample", "--model", model, "--n", 4, "--steps", 3, "--out", out, *extra)


def npz_images(folder: Path) -> np.ndarray:
    with np.load(folder / "samples.npz") as d:
        return d["images"]


def test_sample_writes_all_outputs(tiny_run: Path, tmp_path: Path) -> None:
    import nibabel as nib
    from PIL import Image

    out = tmp_path / "s"
    code, _, err = sample(tiny_run / "checkpoint.safetensors", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    imgs = npz_images(out)
    assert imgs.shape == (4, SIZE, SIZE) and imgs.dtype == np.float32
    assert np.isfinite(imgs).all() and imgs.min() >= 0 and imgs.max() > 0
    assert not np.allclose(imgs[0], imgs[1]), "different samples in one batch must differ"
    vol = np.asarray(nib.load(out / "samples.nii.gz").dataobj)
    assert vol.shape == (SIZE, SIZE, 4)
    np.testing.assert_allclose(np.moveaxis(vol, -1, 0), imgs, rtol=1e-6)
    grid = np.asarray(Image.open(out / "samples_grid.png"))
    assert grid.shape == (2 * (SIZE + 2) + 2,) * 2  # 2x2 tiles with 2 px padding
    meta = json.loads((out / "samples.json").read_text())
    assert meta["sampler"] == "heun" and meta["steps"] == 3 and meta["seed"] == 0
    with np.load(out / "samples.npz") as d:
        assert json.loads(str(d["meta"])) == meta
    # No temporary folder left next to the output.
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_sample_same_seed_same_images(tiny_run: Path, tmp_path: Path) -> None:
    ckpt = tiny_run / "checkpoint.safetensors"
    assert sample(ckpt, tmp_path / "a", "--seed", 7)[0] == 0
    assert sample(ckpt, tmp_path / "b", "--seed", 7)[0] == 0
    assert sample(ckpt, tmp_path / "c", "--seed", 8)[0] == 0
    a, b, c = (npz_images(tmp_path / d) for d in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c), "another seed must give other samples"


def test_sample_from_shipped_prior(tiny_run: Path, tmp_path: Path) -> None:
    """prior.safetensors (fp16 EMA) samples close to checkpoint.safetensors (fp32 EMA)."""
    assert sample(tiny_run / "prior.safetensors", tmp_path / "p")[0] == 0
    assert sample(tiny_run / "checkpoint.safetensors", tmp_path / "c")[0] == 0
    p, c = npz_images(tmp_path / "p"), npz_images(tmp_path / "c")
    np.testing.assert_allclose(p, c, atol=0.05 * float(c.max()))


def test_sample_refuses_to_overwrite(tiny_run: Path, tmp_path: Path) -> None:
    ckpt, out = tiny_run / "checkpoint.safetensors", tmp_path / "s"
    assert sample(ckpt, out, "--seed", 1)[0] == 0
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    code, _, err = sample(ckpt, out, "--seed", 2)
    assert_one_line_error(code, err, "--overwrite")
    assert {p.name for p in out.iterdir()} == set(OUTPUTS)
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"], "no temporary folder may be left behind"
    code, _, err = sample(ckpt, out, "--seed", 2, "--overwrite")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == set(OUTPUTS)
    assert json.loads((out / "samples.json").read_text())["seed"] == 2
    with np.load(BytesIO(before["samples.npz"])) as d:
        assert not np.array_equal(npz_images(out), d["images"]), "--overwrite must replace the samples"


def test_sample_accepts_an_empty_output_folder(tiny_run: Path, tmp_path: Path) -> None:
    """An empty folder (``mktemp -d``) holds nothing to lose: no --overwrite needed; a non-empty one
    still needs it."""
    out = tmp_path / "made-by-mktemp"
    out.mkdir()
    assert sample(tiny_run / "checkpoint.safetensors", out)[0] == 0
    assert {p.name for p in out.iterdir()} == set(OUTPUTS)
    assert [p.name for p in tmp_path.iterdir()] == ["made-by-mktemp"]
    code, _, err = sample(tiny_run / "checkpoint.safetensors", out)
    assert_one_line_error(code, err, "--overwrite")


@pytest.mark.parametrize("args, needle", [(("--sampler", "nope"), "unknown sampler"),
                                          (("--n", 0), "positive")])
def test_sample_bad_options(tiny_run: Path, tmp_path: Path, args: tuple, needle: str) -> None:
    code, _, err = sample(tiny_run / "checkpoint.safetensors", tmp_path / "s", *args)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="session")
def tiny_guide(tiny_run: Path) -> Path:
    """A stand-in for a weaker model of the same data: the tiny prior with its output layer (zero at
    initialisation, still near zero after 3 steps) set to random weights, so its predictions differ."""
    import torch

    from mediff.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(tiny_run / "prior.safetensors")
    w = tensors["net.out.weight"]
    tensors["net.out.weight"] = 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)).to(w.dtype)
    save_checkpoint(tiny_run.parent / "guide.safetensors", tensors, {**meta, "step": 1})
    return tiny_run.parent / "guide.safetensors"


def test_sample_with_autoguidance(tiny_run: Path, tiny_guide: Path, tmp_path: Path) -> None:
    from mediff.prior import attach_guide

    ckpt = tiny_run / "checkpoint.safetensors"
    assert sample(ckpt, tmp_path / "plain")[0] == 0
    plain = npz_images(tmp_path / "plain")
    # A model guiding itself: D + w (D - D) = D, bit for bit.
    assert sample(ckpt, tmp_path / "self", "--guide", ckpt, "--autoguidance", 3)[0] == 0
    np.testing.assert_array_equal(npz_images(tmp_path / "self"), plain)
    code, _, err = sample(ckpt, tmp_path / "g", "--guide", tiny_guide, "--autoguidance", 2)
    assert code == 0, err
    guided = npz_images(tmp_path / "g")
    assert np.isfinite(guided).all() and not np.allclose(guided, plain, atol=1e-3)
    auto = json.loads((tmp_path / "g" / "samples.json").read_text())["autoguidance"]
    assert auto["weight"] == 2 and auto["guide_step"] == 1
    # A prior file that ships its guide samples guided by default, and plainly with --autoguidance 1.
    attach_guide(ckpt, tiny_guide, 2.0, tmp_path / "with_guide.safetensors")
    assert sample(tmp_path / "with_guide.safetensors", tmp_path / "d")[0] == 0
    np.testing.assert_array_equal(npz_images(tmp_path / "d"), guided)
    assert sample(tmp_path / "with_guide.safetensors", tmp_path / "off", "--autoguidance", 1)[0] == 0
    np.testing.assert_array_equal(npz_images(tmp_path / "off"), plain)
    assert json.loads((tmp_path / "off" / "samples.json").read_text())["autoguidance"] is None


@pytest.mark.parametrize("case, needle", [("no guide", "ships no guide"), ("no weight", "needs --autoguidance"),
                                          ("other data", "does not match")])
def test_sample_autoguidance_errors(tiny_run: Path, tiny_guide: Path, tmp_path: Path, case: str,
                                    needle: str) -> None:
    args = {"no guide": ("--autoguidance", 2), "no weight": ("--guide", tiny_guide),
            "other data": ("--guide", "ct", "--autoguidance", 2)}[case]
    code, _, err = sample(tiny_run / "checkpoint.safetensors", tmp_path / "s", *args)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "s").exists()


def test_sample_missing_model(tmp_path: Path) -> None:
    code, _, err = sample(tmp_path / "nope.safetensors", tmp_path / "s")
    assert_one_line_error(code, err, "no prior")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sample_in_a_real_process(tiny_run: Path, tmp_path: Path) -> None:
    """The console script gives the same images as the in-process CLI, and the same errors."""
    ckpt = tiny_run / "checkpoint.safetensors"
    code, _, err = run_proc("sample", "--model", ckpt, "--n", 4, "--steps", 3, "--out", tmp_path / "p")
    assert code == 0, err
    assert sample(ckpt, tmp_path / "i")[0] == 0
    np.testing.assert_array_equal(npz_images(tmp_path / "p"), npz_images(tmp_path / "i"))
    code, _, err = run_proc("sample", "--model", ckpt, "--n", 4, "--steps", 3, "--out", tmp_path / "p")
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = run_proc("sample", "--model", ckpt, "--sampler", "nope", "--out", tmp_path / "q")
    assert_one_line_error(code, err, "unknown sampler")
