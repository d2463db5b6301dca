"""Output folders of the CLI: built in a temporary sibling and renamed into place, so a failed
command leaves nothing half-written; an existing output needs ``--overwrite``."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mediff.errors import MediffError


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite (checked before any work is done)."""
    if Path(out).exists() and not overwrite:
        raise MediffError(f"{out} exists: pass --overwrite to replace it")


@contextmanager
def output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only if the body succeeds."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
