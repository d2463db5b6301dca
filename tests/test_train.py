"""End-to-end tests of training: every input kind through the CLI, bit-exact resume, SIGKILL
safety, DDP under torchrun and the one-line user errors.

Everything is tiny (32 px, a 2-level UNet with 8/16 channels, a handful of steps) because the
machine is small and shared. Most CLI runs happen in-process (``mediff.cli.main`` with patched
argv) so the default run stays fast; the SIGKILL and DDP tests, and the ``slow`` variants, start
real processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
import torch

from mediff import io as mio
from mediff.checkpoint import load_checkpoint, split_prefix
from mediff.data import load_slices, split_by_subject
from mediff.prior import load_prior

TORCHRUN = Path(sys.executable).with_name("torchrun")
SIZE = 32
TINY = ["--size", str(SIZE), "--channels", "8,16", "--blocks", "1,1", "--batch", "4", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------



def run_proc(*args: object, timeout: float = 300) -> tuple[int, str, str]:
    """Run ``python -m mediff ARGS`` in a fresh process."""
    r = subprocess.run([sys.executable, "-m", "mediff", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=ENV)
    return r.returncode, r.stdout, r.stderr



def brain(rng: np.random.Generator, scale: float = 1.0, size: int = SIZE) -> np.ndarray:
    """A brain-like slice: bright ellipse with texture, a dark 'ventricle', black background (float)."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = (yy / (11 * scale)) ** 2 + (xx / (9 * scale)) ** 2
    img = np.where(r < 1, 120 + 80 * (1 - r) + rng.uniform(0, 20, (size, size)), 0.0)
    img[(yy / 3) ** 2 + (xx / 2) ** 2 < 1] = 30
    return img


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_state(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoint.safetensors")
    return tensors


def models_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether any model weight differs between two checkpoints' tensors."""
    keys = [k for k in a if k.startswith("model.")]
    assert keys and set(keys) <= set(b)
    return not all(torch.equal(a[k], b[k]) for k in keys)


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


# --------------------------------------------------------------------------------------------------
# data of each kind; each returns (path, {subject: number of slices})
# --------------------------------------------------------------------------------------------------


def make_npz(root: Path) -> tuple[Path, dict[str, int]]:
    rng = np.random.default_rng(0)
    counts = {str(s): 3 + s for s in range(5)}  # subjects with 3..7 slices: a slice-level split would show
    imgs = [brain(rng, 0.8 + 0.05 * k) for s, n in counts.items() for k in range(n)]
    subj = [int(s) for s, n in counts.items() for _ in range(n)]
    path = root / "slices.npz"
    np.savez(path, images=np.clip(np.stack(imgs), 0, 255).astype(np.uint8), subject_index=np.asarray(subj))
    return path, counts


def make_nifti(root: Path) -> tuple[Path, dict[str, int]]:
    rng = np.random.default_rng(1)
    folder = root / "nifti"
    folder.mkdir()
    counts = {f"sub{s}": 3 + s for s in range(4)}
    for name, n in counts.items():
        vol = np.stack([brain(rng, 0.8 + 0.05 * k) for k in range(n)], axis=-1).astype(np.float32)
        mio.write_nifti(folder / f"{name}.nii.gz", vol)
    (folder / "README.txt").write_text("not an image: must be ignored")
    return folder, counts


def make_png(root: Path) -> tuple[Path, dict[str, int]]:
    rng = np.random.default_rng(2)
    folder = root / "png"
    folder.mkdir()
    counts = {f"img{s}": 1 for s in range(5)}  # each PNG file is one subject
    for name in counts:
        mio.write_png(folder / f"{name}.png", np.clip(brain(rng), 0, 255).astype(np.uint8))
    return folder, counts


def make_png_subjects(root: Path) -> tuple[Path, dict[str, int]]:
    """A folder of subject folders, each holding that subject's PNG slices (kept together by the split)."""
    rng = np.random.default_rng(5)
    folder = root / "png_subjects"
    counts = {f"patient{s}": 2 + s for s in range(3)}
    for name, n in counts.items():
        (folder / name).mkdir(parents=True)
        for k in range(n):
            mio.write_png(folder / name / f"{k:03d}.png", np.clip(brain(rng, 0.8 + 0.05 * k), 0, 255).astype(np.uint8))
    return folder, counts


def make_dicom(root: Path) -> tuple[Path, dict[str, int]]:
    """A folder of DICOM series, one subfolder (= one subject) each."""
    rng = np.random.default_rng(3)
    folder = root / "dicom"
    folder.mkdir()
    counts = {f"series{s}": 3 + s for s in range(3)}
    for name, n in counts.items():
        vol = np.stack([brain(rng, 0.8 + 0.05 * k) * 5 for k in range(n)], axis=-1)
        mio.write_dicom(folder / name, vol, modality="MR")
    return folder, counts


def make_dicom_series(root: Path) -> Path:
    """A single DICOM series folder (IM_00001.dcm ...): one subject."""
    rng = np.random.default_rng(4)
    vol = np.stack([brain(rng, 0.8 + 0.05 * k) * 5 for k in range(4)], axis=-1)
    mio.write_dicom(root / "series", vol, modality="MR")
    return root / "series"


MAKERS = {"npz": make_npz, "nifti": make_nifti, "png": make_png, "png_subjects": make_png_subjects,
          "dicom": make_dicom}


# --------------------------------------------------------------------------------------------------
# 1. every input kind
# --------------------------------------------------------------------------------------------------


def check_run(run: Path, data: Path, counts: dict[str, int], steps: int) -> dict:
    for name in ("checkpoint.safetensors", "prior.safetensors", "checkpoint.json", "train.csv", "val.csv", "val.png"):
        assert (run / name).is_file(), f"{name} missing in {sorted(p.name for p in run.iterdir())}"
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    # The sidecar is a faithful copy of the embedded metadata.
    assert json.loads((run / "checkpoint.json").read_text()) == meta
    assert meta["format"] == "mediff-prior-v1"
    assert meta["step"] == steps and meta["images_seen"] == steps * 4
    assert meta["image_size"] == SIZE
    assert meta["normalization"] == {"kind": "percentile", "percentile": 99.5}
    assert meta["net"]["channels"] == [8, 16] and meta["net"]["blocks"] == [1, 1]
    assert meta["train"]["net"] == meta["net"] and meta["train"]["batch"] == 4 and meta["train"]["size"] == SIZE
    assert meta["train"]["n_val_subjects"] == 1

    # Subject-level split: one whole subject held out, none of its slices in training.
    val = meta["data"]["val_subjects"]
    assert len(val) == 1 and val[0] in counts, (val, sorted(counts))
    assert meta["data"]["n_val_slices"] == counts[val[0]]
    assert meta["data"]["n_train_slices"] == sum(counts.values()) - counts[val[0]]
    sl = load_slices(data, SIZE)
    assert len(sl.images) == sum(counts.values()), "test data must pass the foreground filter"
    assert sorted(set(sl.subjects.tolist())) == sorted(counts)
    tr, va = split_by_subject(sl.subjects, 1, meta["train"]["seed"])
    assert set(sl.subjects[tr].tolist()).isdisjoint(sl.subjects[va].tolist())
    assert set(sl.subjects[va].tolist()) == set(val)
    # The recorded normalisation statistics are those of the training subjects' normalised slices.
    x = sl.images[torch.as_tensor(tr)]
    assert meta["data_mean"] == pytest.approx(float(x.mean()), rel=1e-5)
    assert meta["sigma_data"] == pytest.approx(float(x.std()), rel=1e-5)
    assert 0.05 < meta["data_mean"] < 1.0  # percentile-normalised units, not raw intensities

    # Logs: training rows up to the last step with a finite loss, validation at every val step.
    rows = read_csv(run / "train.csv")
    assert int(rows[-1]["step"]) == steps and math.isfinite(float(rows[-1]["loss"]))
    vrows = read_csv(run / "val.csv")
    assert sorted({int(r["step"]) for r in vrows}) == list(range(2, steps + 1, 2))
    assert all(math.isfinite(float(r["psnr"])) for r in vrows)
    assert (run / "val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Both files load as priors; the shipped prior is the EMA in fp16.
    full, small = load_prior(run / "checkpoint.safetensors"), load_prior(run / "prior.safetensors")
    ema = split_prefix(tensors, "ema")
    for k, v in small.model.state_dict().items():
        torch.testing.assert_close(v, ema[k].to(torch.float16).float())
        torch.testing.assert_close(full.model.state_dict()[k], ema[k])
    assert all(torch.isfinite(v).all() for v in tensors.values())
    return meta


KIND_MODES = [pytest.param(k, "inproc", id=f"{k}-inproc") for k in MAKERS] + [
    pytest.param(k, "subprocess", id=f"{k}-subprocess", marks=pytest.mark.slow) for k in MAKERS
]


@pytest.mark.parametrize("kind, mode", KIND_MODES)
def test_train_each_input_kind(tmp_path: Path, kind: str, mode: str) -> None:
    data, counts = MAKERS[kind](tmp_path)
    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, "--steps", 4, "--checkpoint-every", 2, "--val-every", 2,
            "--val-subjects", 1, *TINY]
    code, out, err = (run_cli if mode == "inproc" else run_proc)(*args)
    assert code == 0, err
    assert "Traceback" not in err
    meta = check_run(run, data, counts, steps=4)
    assert meta["data"]["source"] == str(data)


def test_dicom_single_series_is_one_subject(tmp_path: Path) -> None:
    series = make_dicom_series(tmp_path)
    sl = load_slices(series, SIZE)
    assert len(sl.images) == 4 and set(sl.subjects.tolist()) == {"series"}
    code, _, err = run_cli("train", "--data", series, "--out", tmp_path / "run", "--steps", 2, "--val-subjects", 1,
                           *TINY)
    assert_one_line_error(code, err, "only 1 subject")
    # Holding out no subject at all is refused cleanly too (validation needs held-out subjects).
    code, _, err = run_cli("train", "--data", series, "--out", tmp_path / "run", "--steps", 2, "--val-subjects", 0,
                           *TINY)
    assert_one_line_error(code, err, "val-subjects")
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# 2. resume is bit-exact
# --------------------------------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    data, _ = make_npz(tmp_path)
    common = ["--data", data, "--val-subjects", 1, "--val-every", 100, *TINY]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("train", "--out", a, "--steps", 6, "--checkpoint-every", 3, *common)[0] == 0
    assert run_cli("train", "--out", b, "--steps", 3, "--checkpoint-every", 3, *common)[0] == 0
    mid = model_state(b)
    assert load_checkpoint(b / "checkpoint.safetensors")[1]["step"] == 3
    code, _, err = run_cli("train", "--out", b, "--steps", 6, "--checkpoint-every", 3, "--resume", *common)
    assert code == 0, err
    ta, ma = load_checkpoint(a / "checkpoint.safetensors")
    tb, mb = load_checkpoint(b / "checkpoint.safetensors")
    assert ma["step"] == mb["step"] == 6 and ma["images_seen"] == mb["images_seen"] == 24
    # Model, EMA and optimiser state: all identical, bit for bit.
    assert_tensors_equal(ta, tb)
    assert any(k.startswith("opt.") for k in ta)
    # ... and training really moved the weights after the resume.
    assert models_differ(mid, tb)
    assert_tensors_equal(load_checkpoint(a / "prior.safetensors")[0], load_checkpoint(b / "prior.safetensors")[0])


def test_learning_rate_schedule() -> None:
    """Warm-up, constant, then (decay_steps > 0) linear decay reaching 0 after the last step."""
    from mediff.train import TrainConfig, learning_rate

    cfg = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100)
    assert learning_rate(cfg, 0) == pytest.approx(1e-5) and learning_rate(cfg, 99) == pytest.approx(1e-3)
    assert learning_rate(cfg, 999) == learning_rate(cfg, 5000) == pytest.approx(1e-3)  # no decay: constant
    cfg.decay_steps = 200
    assert learning_rate(cfg, 799) == pytest.approx(1e-3)
    assert learning_rate(cfg, 900) == pytest.approx(0.5e-3) and learning_rate(cfg, 999) == pytest.approx(1e-3 / 200)
    assert learning_rate(cfg, 1000) == 0.0


def test_resume_with_a_learning_rate_decay(tmp_path: Path) -> None:
    """A constant-rate run finished by a decay added on resume (--decay-steps may change, --lr may not)
    equals, bit for bit, the run that had the decay from the start; the last step's rate is logged."""
    data, _ = make_npz(tmp_path)
    common = ["--data", data, "--val-subjects", 1, "--val-every", 100, "--checkpoint-every", 2, *TINY]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("train", "--out", a, "--steps", 4, *common)[0] == 0
    code, _, err = run_cli("train", "--out", a, "--steps", 8, "--lr", "1e-3", "--resume", *common)
    assert code != 0 and "settings differ (lr)" in err
    code, _, err = run_cli("train", "--out", a, "--steps", 8, "--decay-steps", 4, "--resume", *common)
    assert code == 0, err
    assert run_cli("train", "--out", b, "--steps", 8, "--decay-steps", 4, *common)[0] == 0
    assert_tensors_equal(load_checkpoint(a / "checkpoint.safetensors")[0], load_checkpoint(b / "checkpoint.safetensors")[0])
    with open(a / "train.csv") as f:
        last = list(csv.DictReader(f))[-1]
    # step index 7 of 8: warm-up factor 8/500 (default warm-up), decay factor (8 - 7)/4
    assert int(last["step"]) == 8 and float(last["lr"]) == pytest.approx(2e-4 * 8 / 500 / 4)


def test_compact_checkpoint_resumes_close_to_exact(tmp_path: Path) -> None:
    """resume.safetensors is < 45 % of the full checkpoint, resumes without checkpoint.safetensors, and
    lands near the exact run (16-bit rounding and restarted first moments: close, not equal)."""
    from mediff.train import compact_checkpoint

    data, _ = make_npz(tmp_path)
    common = ["--data", data, "--val-subjects", 1, "--val-every", 100, "--checkpoint-every", 3, *TINY]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("train", "--out", a, "--steps", 6, *common)[0] == 0
    assert run_cli("train", "--out", b, "--steps", 3, *common)[0] == 0
    mid = model_state(b)
    compact = compact_checkpoint(b)
    assert compact.stat().st_size < 0.45 * (b / "checkpoint.safetensors").stat().st_size
    (b / "checkpoint.safetensors").unlink()
    code, out, err = run_cli("train", "--out", b, "--steps", 6, "--resume", *common)
    assert code == 0, err
    assert "not bit-exact" in out + err
    ta, tb = model_state(a), model_state(b)
    assert load_checkpoint(b / "checkpoint.safetensors")[1]["step"] == 6
    keys = [k for k in ta if k.startswith("model.") and ta[k].is_floating_point()]
    off = sum(float((ta[k] - tb[k]).pow(2).sum()) for k in keys)
    norm = sum(float(ta[k].pow(2).sum()) for k in keys)
    # Close to the exact run: about fp16's rounding (relative 2^-12), far below 1e-3; but not equal.
    assert 0 < (off / norm) ** 0.5 < 1e-3
    assert models_differ(mid, tb)


def test_prior_from_the_compact_state_is_the_prior_training_wrote(tmp_path: Path) -> None:
    """A fresh clone keeps only resume.safetensors: the prior derived from it is, tensor for tensor, the
    fp16 EMA prior that training wrote, and its metadata is a prior's (not compact)."""
    from mediff.train import compact_checkpoint, prior_from_compact

    data, _ = make_npz(tmp_path)
    run = tmp_path / "r"
    assert run_cli("train", "--out", run, "--steps", 2, "--data", data, "--val-subjects", 1, *TINY)[0] == 0
    compact_checkpoint(run)
    written = load_checkpoint(run / "prior.safetensors")
    for name in ("prior.safetensors", "prior.json", "checkpoint.safetensors"):
        (run / name).unlink()
    derived = load_checkpoint(prior_from_compact(run))
    assert_tensors_equal(derived[0], written[0])
    assert not derived[1].get("compact") and derived[1]["step"] == written[1]["step"] == 2


def test_resume_a_checkpoint_from_before_pos_channels(tmp_path: Path) -> None:
    """A checkpoint whose net config predates ``pos_channels`` (e.g. the committed brain-t1 run) resumes."""
    from mediff.checkpoint import save_checkpoint

    data, _ = make_npz(tmp_path)
    common = ["--data", data, "--val-subjects", 1, "--val-every", 100, *TINY]
    run = tmp_path / "r"
    assert run_cli("train", "--out", run, "--steps", 2, *common)[0] == 0
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    for net in (meta["net"], meta["train"]["net"]):
        del net["pos_channels"]
    save_checkpoint(run / "checkpoint.safetensors", tensors, meta)
    code, _, err = run_cli("train", "--out", run, "--steps", 3, "--resume", *common)
    assert code == 0, err
    assert load_checkpoint(run / "checkpoint.safetensors")[1]["step"] == 3


def make_ct_npz(root: Path, n_patients: int = 4) -> Path:
    """CT slices in HU (air -1000, soft tissue ~40, bone ~700) as ``hu`` + ``patient_id``, 64 px."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:64, :64] - 31.5
    hu, pid = [], []
    for p in range(n_patients):
        for k in range(2):
            body = (yy / (24 + k)) ** 2 + (xx / (28 - p)) ** 2 < 1
            img = np.where(body, 40 + rng.normal(0, 20, (64, 64)), -1000.0)
            img[(yy / 4) ** 2 + ((xx - 5) / 4) ** 2 < 1] = 700
            hu.append(img)
            pid.append(f"P{p}")
    path = root / "ct.npz"
    np.savez(path, hu=np.stack(hu).astype(np.int16), patient_id=np.asarray(pid))
    return path


def test_ct_hu_training_records_the_window_and_samples_hu(tmp_path: Path) -> None:
    """HU data train in u = (HU + 1000) / 2000 (auto-detected), the window is in the metadata, the
    prior maps HU <-> u exactly, and ``mediff sample`` writes HU."""
    data = make_ct_npz(tmp_path)
    loaded = load_slices(data, SIZE)
    assert loaded.is_hu and loaded.normalization["params"] == {"hu_min": -1000.0, "hu_max": 1000.0}
    assert float(loaded.images.min()) == 0.0  # air
    assert abs(float(loaded.images.max()) - 0.85) < 0.01  # 700 HU bone survives area downsampling in the middle
    assert set(loaded.subjects) == {"P0", "P1", "P2", "P3"}
    run = tmp_path / "ct"
    code, _, err = run_cli("train", "--data", data, "--out", run, "--steps", 2, "--val-subjects", 1, *TINY)
    assert code == 0, err
    prior = load_prior(run / "prior.safetensors")
    x, norm = prior.normalize(np.array([[-1000.0, 0.0, 1000.0]]))
    assert torch.allclose(x, torch.tensor([[0.0, 0.5, 1.0]]))
    assert np.allclose(prior.denormalize(x, norm), [[-1000.0, 0.0, 1000.0]])
    out = tmp_path / "samples"
    assert run_cli("sample", "--model", run / "prior.safetensors", "--n", 2, "--steps", 2, "--out", out)[0] == 0
    with np.load(out / "samples.npz") as z:
        assert "hu" in z.files and float(z["hu"].min()) == -1000.0  # u clamped at air, written in HU


def test_hu_intensity_refuses_non_ct_data(tmp_path: Path) -> None:
    data, _ = make_npz(tmp_path)
    code, _, err = run_cli("train", "--data", data, "--out", tmp_path / "r", "--steps", 1, "--val-subjects", 1,
                           "--intensity", "hu", *TINY)
    assert_one_line_error(code, err, "Hounsfield")


def test_random_crops_match_their_coordinates() -> None:
    """Each crop is the image's pixels at its coordinates: crop the coordinate grid itself as an image."""
    from mediff.nets import coordinate_grid
    from mediff.train import random_crops

    grid = coordinate_grid(32, 32)
    x = torch.cat([grid, grid * 2]).reshape(2, 2, 32, 32)  # image b = (b + 1) x the grid, 2 channels
    crops, coords, src = random_crops(x, grid, 16, 10, torch.Generator().manual_seed(0))
    assert crops.shape == (10, 2, 16, 16) and coords.shape == (10, 2, 16, 16)
    assert torch.allclose(crops, coords * (src + 1).view(-1, 1, 1, 1).float())
    assert len(set(coords[:, 0, 0, 0].tolist())) > 1  # crops come from different places


def test_patch_training_and_its_errors(tmp_path: Path) -> None:
    """Patch Diffusion trains and resumes exactly; patch sizes must fit the net; patches need --position."""
    data = make_ct_npz(tmp_path)
    common = ["--data", data, "--val-subjects", 1, "--val-every", 100, "--checkpoint-every", 2, *TINY]
    patch = ["--position", "--patch-sizes", "16", "--full-prob", "0.3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("train", "--out", a, "--steps", 4, *patch, *common)[0] == 0
    assert run_cli("train", "--out", b, "--steps", 2, *patch, *common)[0] == 0
    assert run_cli("train", "--out", b, "--steps", 4, "--resume", *patch, *common)[0] == 0
    assert_tensors_equal(model_state(a), model_state(b))
    assert load_prior(b / "prior.safetensors").meta.net["pos_channels"] == 2
    code, _, err = run_cli("train", "--out", tmp_path / "c", "--steps", 1, "--patch-sizes", "16", *common)
    assert_one_line_error(code, err, "--position")
    code, _, err = run_cli("train", "--out", tmp_path / "d", "--steps", 1, "--position", "--patch-sizes", "10",
                           *common)
    assert_one_line_error(code, err, "patch size 10")


def test_training_is_a_function_of_the_seed(tmp_path: Path) -> None:
    """Two runs in one process with the same seed agree (the global RNG must not leak in); another
    seed gives other weights."""
    data, _ = make_npz(tmp_path)
    common = ["--data", data, "--val-subjects", 1, "--val-every", 100, "--steps", 2, *TINY]
    torch.manual_seed(123)  # global RNG state must not matter
    assert run_cli("train", "--out", tmp_path / "r1", *common)[0] == 0
    torch.rand(10)
    assert run_cli("train", "--out", tmp_path / "r2", *common)[0] == 0
    assert run_cli("train", "--out", tmp_path / "r3", "--seed", 1, *common)[0] == 0
    s1, s2, s3 = (model_state(tmp_path / r) for r in ("r1", "r2", "r3"))
    assert_tensors_equal(s1, s2)
    assert models_differ(s1, s3)


# --------------------------------------------------------------------------------------------------
# 3. SIGKILL at an arbitrary moment
# --------------------------------------------------------------------------------------------------

# Runs the real CLI and records every finished step (line-buffered, so a SIGKILL loses nothing written).
STEP_LOGGER = textwrap.dedent("""
    import sys
    import mediff.train as T

    log = open(sys.argv[1], "a", buffering=1)
    _step = T.Trainer.train_step

    def train_step(self):
        loss = _step(self)
        log.write(f"{self.step}\\n")
        return loss

    T.Trainer.train_step = train_step
    sys.argv = ["mediff", *sys.argv[2:]]
    from mediff.cli import main

    main()
""")


def wait_for(cond, proc: subprocess.Popen, timeout: float, what: str, errfile: Path) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}: {errfile.read_text()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = make_npz(tmp_path)
    run, steplog, errlog = tmp_path / "run", tmp_path / "steps.log", tmp_path / "stderr.log"
    (tmp_path / "logger.py").write_text(STEP_LOGGER)
    every = 2
    common = ["--data", data, "--out", run, "--val-subjects", 1, "--val-every", 100_000,
              "--checkpoint-every", every, *TINY]
    with open(errlog, "w") as ferr:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "logger.py"), str(steplog), "train", "--steps",
                                 "100000", *map(str, common)], stdout=subprocess.DEVNULL, stderr=ferr, env=ENV)
        try:
            sidecar = run / "checkpoint.json"

            def sidecar_step() -> int:
                try:
                    return json.loads(sidecar.read_text())["step"]
                except (OSError, ValueError, KeyError):
                    return -1

            wait_for(lambda: sidecar_step() >= 4, proc, 240, "a checkpoint at step >= 4", errlog)
            delay = random.uniform(0.0, 1.0)
            time.sleep(delay)
            seen_before = sidecar_step()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kill_step = int(steplog.read_text().split()[-1])  # the last step finished before the kill

    # The checkpoint is intact and recent.
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    ctx = f"killed after {delay:.2f}s wait at step {kill_step}, checkpoint at {meta['step']}"
    print(ctx, "leftovers:", sorted(p.name for p in run.iterdir() if p.name.startswith(".")))
    assert meta["step"] % every == 0, ctx
    assert kill_step - every <= meta["step"] <= kill_step, ctx
    assert meta["step"] >= seen_before >= 4, ctx
    assert meta["images_seen"] == meta["step"] * 4
    assert all(torch.isfinite(v).all() for v in tensors.values())
    # The sidecar and the prior are written after the checkpoint: at most one checkpoint behind.
    assert json.loads((run / "checkpoint.json").read_text())["step"] in (meta["step"], meta["step"] - every), ctx
    assert load_prior(run / "prior.safetensors").meta.step in (meta["step"], meta["step"] - every), ctx
    leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert all(p.startswith(".mediff-tmp-") for p in leftovers), leftovers  # only the atomic writer's temps

    # Resume (in this process) continues from the checkpoint's step, whatever temp files were left,
    # and removes them (each can be as large as a checkpoint).
    (run / ".mediff-tmp-0123456789ab-checkpoint.safetensors").write_bytes(b"half a file")  # a kill mid-save
    import mediff.train as T

    done: list[int] = []
    orig = T.Trainer.train_step

    def counting(self):
        loss = orig(self)
        done.append(self.step)
        return loss

    monkeypatch.setattr(T.Trainer, "train_step", counting)
    target = meta["step"] + 3
    code, _, err = run_cli("train", "--steps", target, "--resume", *common)
    assert code == 0, err
    assert done == list(range(meta["step"] + 1, target + 1)), ctx
    tensors2, meta2 = load_checkpoint(run / "checkpoint.safetensors")
    assert meta2["step"] == target and meta2["images_seen"] == target * 4
    assert meta2["wall_seconds"] >= meta["wall_seconds"]
    assert json.loads((run / "checkpoint.json").read_text())["step"] == target
    assert load_prior(run / "prior.safetensors").meta.step == target
    assert models_differ(tensors, tensors2)  # the resumed steps really trained
    assert not list(run.glob(".mediff-tmp-*")), "resume removes the temp files a kill left behind"


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path: Path) -> None:
    """A killed run may have logged steps after its last checkpoint; the resumed run repeats them, so
    their rows go: every step appears once in train.csv and once per sigma in val.csv."""
    data, _ = make_npz(tmp_path)
    run = tmp_path / "run"
    common = ["--data", data, "--out", run, "--val-subjects", 1, "--val-every", 2, "--checkpoint-every", 2, *TINY]
    assert run_cli("train", "--steps", 2, *common)[0] == 0
    for name in ("train.csv", "val.csv"):  # what a run killed at step 21 after its step-2 checkpoint leaves
        rows = read_csv(run / name)
        with open(run / name, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writerows({**r, "step": step} for step in (3, 20) for r in rows)
            f.write("2,1")  # a row cut short by the kill
    code, _, err = run_cli("train", "--steps", 4, "--resume", *common)
    assert code == 0, err
    assert [int(r["step"]) for r in read_csv(run / "train.csv")] == [2, 4]
    val = [(int(r["step"]), r["sigma"]) for r in read_csv(run / "val.csv")]
    assert sorted({s for s, _ in val}) == [2, 4] and len(val) == len(set(val))


# --------------------------------------------------------------------------------------------------
# 4. DDP with torchrun (2 processes, gloo on CPU)
# --------------------------------------------------------------------------------------------------

DDP_LAUNCHER = textwrap.dedent("""
    import sys

    import torch
    import torch.distributed as dist

    import mediff.train as T
    from mediff.nets import UNetConfig

    losses = []
    _step = T.Trainer.train_step

    def train_step(self):
        loss = _step(self)
        losses.append(loss)
        return loss

    T.Trainer.train_step = train_step
    data, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    net = UNetConfig(channels=(8, 16), blocks=(1, 1), attention_levels=(1,)).to_dict()
    cfg = T.TrainConfig(size=32, batch=4, steps=steps, n_val_subjects=1, checkpoint_every=steps,
                        val_every=10**6, net=net)
    t = T.train(data, out, cfg, progress=False)
    torch.save({"rank": t.rank, "world": t.world, "step": t.step, "images_seen": t.images_seen, "losses": losses,
                "model": t.model.state_dict(), "ema": t.ema.state_dict()}, f"{out}/rank{t.rank}.pt")
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_ddp_two_ranks_stay_identical(tmp_path: Path) -> None:
    data, _ = make_npz(tmp_path)
    run, steps = tmp_path / "run", 3
    (tmp_path / "launch.py").write_text(DDP_LAUNCHER)
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(tmp_path / "launch.py"), str(data),
                        str(run), str(steps)], capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (torch.load(run / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2
    assert r0["step"] == r1["step"] == steps
    assert r0["images_seen"] == r1["images_seen"] == steps * 4  # the global batch, not the per-rank share
    # Each rank trained on its own half of the batch (different losses), gradients were averaged
    # (identical weights).
    assert len(r0["losses"]) == len(r1["losses"]) == steps
    assert all(math.isfinite(v) for v in r0["losses"] + r1["losses"])
    assert r0["losses"] != r1["losses"]
    assert_tensors_equal(r0["model"], r1["model"])
    assert_tensors_equal(r0["ema"], r1["ema"])
    # Rank 0 alone wrote the checkpoint, and it holds those weights.
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    assert meta["step"] == steps and meta["images_seen"] == steps * 4
    assert_tensors_equal(split_prefix(tensors, "model"), r0["model"])
    rows = read_csv(run / "train.csv")
    assert len(rows) == 1 and int(rows[0]["step"]) == steps and math.isfinite(float(rows[0]["loss"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_training_matches_cpu_and_resumes_on_cpu(tmp_path: Path) -> None:
    """The same (seed, step) draws on both devices: CUDA's losses follow the CPU run's (to float
    round-off over a few steps), and a CUDA checkpoint resumes on the CPU."""
    data, _ = make_npz(tmp_path)
    common = ["--data", data, "--val-subjects", 1, "--val-every", 2, "--checkpoint-every", 2, *TINY]
    for dev in ("cpu", "cuda"):
        code, _, err = run_cli("train", "--out", tmp_path / dev, "--steps", 4, "--device", dev, *common)
        assert code == 0, err
    cpu, gpu = (read_csv(tmp_path / d / "train.csv") for d in ("cpu", "cuda"))
    assert float(gpu[-1]["loss"]) == pytest.approx(float(cpu[-1]["loss"]), rel=0.05)
    code, _, err = run_cli("train", "--out", tmp_path / "cuda", "--steps", 6, "--device", "cpu", "--resume", *common)
    assert code == 0, err
    assert load_checkpoint(tmp_path / "cuda" / "checkpoint.safetensors")[1]["step"] == 6


# --------------------------------------------------------------------------------------------------
# 5. user errors: exit 2, one line, no traceback
# --------------------------------------------------------------------------------------------------


def _npz_without_subjects(tmp: Path) -> Path:
    p = tmp / "nosubj.npz"
    np.savez(p, images=np.zeros((4, SIZE, SIZE), np.uint8))
    return p


ERROR_CASES = {
    "resume-without-checkpoint": (lambda t, d: ["--out", t / "fresh", "--resume"], "no checkpoint"),
    "existing-run": (lambda t, d: ["--out", t / "existing"], "already holds a training run"),
    "missing-data": (lambda t, d: ["--data", t / "nope.npz", "--out", t / "r"], "not found"),
    "npz-without-subject-index": (lambda t, d: ["--data", _npz_without_subjects(t), "--out", t / "r"],
                                  "subject_index"),
    "size-not-divisible": (lambda t, d: ["--out", t / "r", "--size", "30"], "multiple of 4"),
    "unknown-device": (lambda t, d: ["--out", t / "r", "--device", "tpu9"], "--device"),
}
if not torch.cuda.is_available():
    ERROR_CASES["cuda-without-gpu"] = (lambda t, d: ["--out", t / "r", "--device", "cuda"], "no CUDA device")


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("errors")
    data, _ = make_npz(root)
    code, _, err = run_cli("train", "--data", data, "--out", root / "existing", "--steps", 1, "--val-subjects", 1,
                           "--val-every", 100, *TINY)
    assert code == 0, err
    return root, data


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_train_user_errors(existing_run: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    root, data = existing_run
    make_args, needle = ERROR_CASES[case]
    extra = make_args(tmp_path if case != "existing-run" else root, data)
    args = ["train", "--data", data, "--steps", 2, "--val-subjects", 1, *TINY, *extra]  # later options win
    before = (root / "existing" / "checkpoint.safetensors").read_bytes()
    code, out, err = run_cli(*args)
    assert_one_line_error(code, err, needle)
    assert (root / "existing" / "checkpoint.safetensors").read_bytes() == before  # never clobbered
    if case != "existing-run":
        assert not (tmp_path / "r" / "checkpoint.safetensors").exists()
        assert not (tmp_path / "fresh" / "checkpoint.safetensors").exists()


@pytest.mark.slow
def test_train_user_error_in_a_real_process(tmp_path: Path) -> None:
    code, _, err = run_proc("train", "--data", tmp_path / "nope.npz", "--out", tmp_path / "r", *TINY)
    assert_one_line_error(code, err, "not found")


def test_pixel_spacing_is_read_scaled_to_the_grid_and_recorded(tmp_path: Path) -> None:
    from mediff.data import load_slices
    from mediff.errors import MediffError

    rng = np.random.default_rng(0)
    images = rng.random((4, 64, 64)).astype(np.float32) + 0.5
    np.savez(tmp_path / "a.npz", images=images, subject_index=np.arange(4), pixel_spacing_mm=[0.5, 0.6, 0.7, 0.8])
    sl = load_slices(tmp_path / "a.npz", 32)
    np.testing.assert_allclose(sl.pixel_spacing_mm, [1.0, 1.2, 1.4, 1.6])  # 64 -> 32 px: pixels twice as large
    assert load_slices(tmp_path / "a.npz", 64, pixel_spacing=3.0).pixel_spacing_mm[0] == 0.5  # the file wins
    np.savez(tmp_path / "b.npz", images=images, subject_index=np.arange(4))
    assert load_slices(tmp_path / "b.npz", 64).pixel_spacing_mm is None
    np.testing.assert_allclose(load_slices(tmp_path / "b.npz", 128, pixel_spacing=2.0).pixel_spacing_mm, 2.0)
    with pytest.raises(MediffError, match="pixel-spacing"):
        load_slices(tmp_path / "b.npz", 64, pixel_spacing=-1.0)
    np.savez(tmp_path / "c.npz", images=images, subject_index=np.arange(4), pixel_spacing_mm=[1.0, 2.0])
    with pytest.raises(MediffError, match="pixel_spacing_mm"):
        load_slices(tmp_path / "c.npz", 64)
