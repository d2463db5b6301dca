"""Output folders of the CLI: built in a temporary sibling and renamed into place, so a failed
command leaves nothing half-written; an existing output needs ``--overwrite`` unless it is an empty
folder."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mediff.errors import MediffError


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite (checked before any work is done). An empty folder
    (e.g. made by ``mktemp -d``) holds nothing to lose and is accepted."""
    out = Path(out)
    if out.exists() and not overwrite and not _is_empty_dir(out):
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
