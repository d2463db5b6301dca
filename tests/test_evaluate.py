"""``mediff evaluate`` end to end on tiny blob images: outputs, one feature space reused through
--embedding, a degraded synthetic set scoring worse, and one-line errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, blob_slices, run_cli

from mediff.synthesis import write_samples

SIZE = 32


def as_samples(folder: Path, images: np.ndarray) -> Path:
    """A 'mediff sample'-style output of images (N, S, S) in normalised units, no sampler run."""
    folder.mkdir()
    write_samples(folder, torch.from_numpy(images.astype(np.float32))[:, None],
                  {"model": "test", "units": "normalised"})
    return folder


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real blobs of 6 subjects (NPZ), a synthetic set of other blobs like them, a copy of that set
    degraded by strong noise, and one evaluate run (embedding trained there)."""
    root = tmp_path_factory.mktemp("evaluate")
    imgs, subj = blob_slices(SIZE, subjects=6, per_subject=8)
    np.savez(root / "real.npz", images=imgs.astype(np.uint8), subject_index=subj)
    new, _ = blob_slices(SIZE, subjects=7, per_subject=8)
    good = (new[8:] / 200.0).astype(np.float32)  # other subjects' blobs, near the real units
    noisy = np.clip(good + np.random.default_rng(1).normal(0, 1.0, good.shape), 0, None).astype(np.float32)
    paths = {"root": root, "real": root / "real.npz", "good": as_samples(root / "good", good),
             "noisy": as_samples(root / "noisy", noisy)}
    code, out, err = run_cli("evaluate", "--real", paths["real"], "--synthetic", paths["good"], "--out", root / "ev",
                             "--pairs", 50, "--embedding-steps", 2)
    assert code == 0, err
    paths["ev"] = root / "ev"
    return paths


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_evaluate_writes_metrics_report_and_embedding(case: dict[str, Path]) -> None:
    rec = metrics(case["ev"])
    real, syn = rec["rows"]
    assert real["set"] == "real (other subjects)" and syn["set"] == "synthetic"
    assert real["n"] == syn["n"] == rec["other_half"]["images"] == 24  # 3 of the 6 subjects
    assert rec["reference"] == {"images": 24, "subjects": 3}
    for row in rec["rows"]:
        assert row["FD"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["coverage"] <= 1
        assert row["real MS-SSIM"] == real["real MS-SSIM"]
    assert rec["sample_record"]["model"] == "test" and rec["units"] == "percentile"
    assert (case["ev"] / "embedding.safetensors").is_file()
    html = (case["ev"] / "report.html").read_text()
    assert "not Inception" in html and "real MS-SSIM" in html


def test_evaluate_on_a_saved_embedding_repeats_the_numbers(case: dict[str, Path]) -> None:
    out = case["root"] / "again"
    code, _, err = run_cli("evaluate", "--real", case["real"], "--synthetic", case["good"], "--out", out,
                           "--pairs", 50, "--embedding", case["ev"] / "embedding.safetensors")
    assert code == 0, err
    assert metrics(out)["rows"] == metrics(case["ev"])["rows"]
    assert not (out / "embedding.safetensors").exists()


def test_degraded_samples_score_worse(case: dict[str, Path]) -> None:
    """Noisy samples cover less of the real set (lower recall and coverage) and their MS-SSIM is farther
    from the real value. Not precision, density or FD: this tiny embedding (2 steps on 48 blobs) never
    saw noise and maps noisy images into the middle of the real set, where 24 images in 128 dimensions
    have wide k-NN balls; those three are tested on Gaussians in test_synthesis_metrics and measured on
    real slices in benchmarks/synthesis.py."""
    out = case["root"] / "noisy-ev"
    code, _, err = run_cli("evaluate", "--real", case["real"], "--synthetic", case["noisy"], "--out", out,
                           "--pairs", 50, "--embedding", case["ev"] / "embedding.safetensors")
    assert code == 0, err
    good, bad = metrics(case["ev"])["rows"][1], metrics(out)["rows"][1]
    assert bad["recall"] < good["recall"] and bad["coverage"] < good["coverage"]
    assert abs(bad["MS-SSIM"] - bad["real MS-SSIM"]) > abs(good["MS-SSIM"] - good["real MS-SSIM"])


def test_evaluate_reads_image_folders_with_size(case: dict[str, Path]) -> None:
    """Synthetic images as a folder of NPY files (no samples.npz) need --size."""
    folder = case["root"] / "npy"
    folder.mkdir()
    for i, im in enumerate(np.load(case["good"] / "samples.npz")["images"][:12]):
        np.save(folder / f"s{i}.npy", im * 200)
    code, _, err = run_cli("evaluate", "--real", case["real"], "--synthetic", folder, "--out", case["root"] / "x")
    assert_one_line_error(code, err, "--size")
    code, _, err = run_cli("evaluate", "--real", case["real"], "--synthetic", folder, "--out", case["root"] / "npy-ev",
                           "--size", SIZE, "--pairs", 20, "--embedding", case["ev"] / "embedding.safetensors")
    assert code == 0, err
    assert metrics(case["root"] / "npy-ev")["rows"][1]["n"] == 12


def test_evaluate_bad_inputs_give_one_line_errors(case: dict[str, Path]) -> None:
    root = case["root"]
    (root / "empty").mkdir()
    one = root / "one.npz"
    imgs, _ = blob_slices(SIZE, subjects=1, per_subject=8)
    np.savez(one, images=imgs.astype(np.uint8), subject_index=np.zeros(8, int))
    (root / "not-embedding.safetensors").write_bytes(b"junk")
    base = ("evaluate", "--out", root / "bad")
    cases = [
        (("--real", root / "missing.npz", "--synthetic", case["good"]), ("real images not found",)),
        (("--real", case["real"], "--synthetic", root / "missing"), ("synthetic images not found",)),
        (("--real", case["real"], "--synthetic", root / "empty"), ("empty",)),
        (("--real", case["real"], "--synthetic", case["good"], "--size", 64), ("32 px", "--size 64")),
        (("--real", one, "--synthetic", case["good"]), ("one subject",)),
        (("--real", case["real"], "--synthetic", case["good"], "--intensity", "hu"), ("--intensity hu",)),
        (("--real", case["real"], "--synthetic", case["good"], "--embedding", root / "nope.safetensors"),
         ("embedding not found",)),
        (("--real", case["real"], "--synthetic", case["good"], "--embedding", root / "not-embedding.safetensors"),
         ("not-embedding.safetensors",)),
        (("--real", case["real"], "--synthetic", case["good"], "--k", 30), ("too few images", "k = 30")),
    ]
    for args, needles in cases:
        code, _, err = run_cli(*base, *args)
        assert_one_line_error(code, err, *needles)
        assert not (root / "bad").exists()
    code, _, err = run_cli("evaluate", "--real", case["real"], "--synthetic", case["good"], "--out", case["ev"])
    assert_one_line_error(code, err, "--overwrite")


def test_evaluate_uses_the_prior_s_shipped_embedding_for_its_training_data(case: dict[str, Path]) -> None:
    """With no --embedding, the embedding shipped with the samples' prior ("test" here: the first run's
    embedding, whose record holds the real file's fingerprint) is used; 'train' trains a new one."""
    from unittest import mock

    shipped = case["ev"] / "embedding.safetensors"
    with mock.patch("mediff.privacy.shipped_embedding", lambda prior: shipped if prior == "test" else None):
        code, _, err = run_cli("evaluate", "--real", case["real"], "--synthetic", case["good"], "--out",
                               case["root"] / "shipped", "--pairs", 50)
        assert code == 0, err
        code, _, err = run_cli("evaluate", "--real", case["real"], "--synthetic", case["good"], "--out",
                               case["root"] / "new", "--pairs", 50, "--embedding-steps", 1, "--embedding", "train")
        assert code == 0, err
    rec = metrics(case["root"] / "shipped")
    assert rec["embedding"]["file"] == "shipped with test" and rec["rows"] == metrics(case["ev"])["rows"]
    assert not (case["root"] / "shipped" / "embedding.safetensors").exists()
    assert metrics(case["root"] / "new")["embedding"]["config"]["steps"] == 1
    assert (case["root"] / "new" / "embedding.safetensors").is_file()
