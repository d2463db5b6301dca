"""Helpers shared by the CLI-level tests."""

from __future__ import annotations

import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from unittest import mock


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
