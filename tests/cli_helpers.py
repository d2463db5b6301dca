"""Helpers shared by the CLI-level tests."""

from __future__ import annotations

import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from unittest import mock

import numpy as np


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
