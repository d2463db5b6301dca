"""Cohorts: ``mediff reconstruct --input DIR`` on a folder of scans, one output folder per scan and
cohort.json; a scan that fails is listed and named in the one-line error; torchrun splits the scans."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, phantom, read_nifti, recon

from mediff import io


def _cohort(root: Path, nan: bool = False) -> Path:
    """A folder of scans: two NIfTI volumes (2 slices), a DICOM series folder, and a note (not a scan)."""
    d = root / "scans"
    d.mkdir()
    vol = np.stack([phantom(), 0.8 * phantom()], axis=2)
    io.write_nifti(d / "a.nii.gz", vol, np.diag([1.5, 1.5, 3.0, 1.0]))
    bad = vol.copy()
    if nan:
        bad[3, 3, 1] = np.nan
    io.write_nifti(d / "b.nii", bad, np.diag([1.5, 1.5, 3.0, 1.0]))
    io.write_dicom(d / "c_series", np.round(vol), modality="MR", spacing=(1.5, 1.5, 3.0))
    (d / "notes.txt").write_text("not a scan")
    return d


def test_cohort_one_folder_per_scan_and_summary(prior: Path, tmp_path: Path) -> None:
    scans = _cohort(tmp_path)
    out = tmp_path / "out"
    code, _, err = recon(prior, scans, out, "--steps", 2)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"a", "b", "c_series", "cohort.json"}
    for name in ("a", "b", "c_series"):
        rec, _ = read_nifti(out / name / "recon.nii.gz")
        assert rec.shape == (32, 32, 2), name
        assert (out / name / "report.html").is_file()
    summary = json.loads((out / "cohort.json").read_text())
    assert [s["scan"] for s in summary["scans"]] == ["a", "b", "c_series"]
    assert all(s["status"] == "ok" and s["rank"] == 0 for s in summary["scans"]) and summary["failed"] == 0
    per_scan = [json.loads((out / n / "metrics.json").read_text())["metrics"][0]["PSNR"] for n in ("a", "b", "c_series")]
    dds = summary["metrics"][0]
    assert dds["method"] == "dds" and dds["scans"] == 3 and dds["PSNR"] == pytest.approx(np.mean(per_scan))
    code, _, err = recon(prior, scans, out, "--steps", 2)
    assert_one_line_error(code, err, "exists", "--overwrite")
    (out / "stale").mkdir()
    code, _, err = recon(prior, scans, out, "--steps", 2, "--slices", "1:", "--overwrite")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"a", "b", "c_series", "cohort.json"}, "--overwrite replaces the cohort"
    assert all(s["slices"] == [1, 2] for s in json.loads((out / "cohort.json").read_text())["scans"])


def test_a_failing_scan_is_listed_and_the_others_are_written(prior: Path, tmp_path: Path) -> None:
    scans = _cohort(tmp_path, nan=True)
    out = tmp_path / "out"
    code, _, err = recon(prior, scans, out, "--steps", 2)
    assert_one_line_error(code, err, "1 of 3 scans failed", "cohort.json")
    summary = json.loads((out / "cohort.json").read_text())
    status = {s["scan"]: s["status"] for s in summary["scans"]}
    assert status == {"a": "ok", "b": "error", "c_series": "ok"} and summary["failed"] == 1
    assert "NaN" in summary["scans"][1]["error"]
    assert {p.name for p in out.iterdir()} == {"a", "c_series", "cohort.json"}, "no half-written scan folder"


@pytest.mark.parametrize("make", ["empty", "only-notes"])
def test_folder_without_scans_one_line_error(prior: Path, tmp_path: Path, make: str) -> None:
    d = tmp_path / "d"
    d.mkdir()
    if make == "only-notes":
        (d / "readme.txt").write_text("x")
        (d / "sub").mkdir()
    code, _, err = recon(prior, d, tmp_path / "out", "--steps", 2)
    assert_one_line_error(code, err, "no scans in")
    assert not (tmp_path / "out").exists()


def test_a_dicom_series_folder_is_one_scan_not_a_cohort(prior: Path, tmp_path: Path) -> None:
    scans = _cohort(tmp_path)
    out = tmp_path / "out"
    code, _, err = recon(prior, scans / "c_series", out, "--steps", 2)
    assert code == 0, err
    assert (out / "recon.nii.gz").is_file() and not (out / "cohort.json").exists()


def test_one_scan_under_several_processes_is_refused(prior: Path, tmp_path: Path, monkeypatch) -> None:
    scans = _cohort(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = recon(prior, scans / "a.nii.gz", tmp_path / "out", "--steps", 2)
    assert_one_line_error(code, err, "processes", "one scan")
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_split_the_scans(prior: Path, tmp_path: Path) -> None:
    """Two CPU processes under torchrun: the scans are split between the ranks, rank 0 writes the
    summary of all of them after both finish."""
    scans = _cohort(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "mediff", "reconstruct", "--input", str(scans), "--out", str(out), "--model", str(prior),
           "--steps", "2", "--center-fraction", "0.125"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["processes"] == 2
    assert {s["scan"]: s["rank"] for s in summary["scans"]} == {"a": 0, "b": 1, "c_series": 0}
    assert all(s["status"] == "ok" for s in summary["scans"])
    assert {p.name for p in out.iterdir()} == {"a", "b", "c_series", "cohort.json"}, "rank files are cleaned up"
