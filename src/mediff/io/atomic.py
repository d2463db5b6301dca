"""Atomic file writing: every output is written to a temp file next to it, flushed, then moved into
place in one step, so a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

from mediff.errors import MediffError


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise MediffError(f"output path is a folder, expected a file: {path}")
    if path.exists() and not overwrite:
        raise MediffError(f"refusing to overwrite existing {path} (pass overwrite=True)")
    if not path.parent.is_dir():
        raise MediffError(f"output folder does not exist: {path.parent} (for {path})")


def temp_path(path: Path) -> Path:
    """A fresh hidden name next to ``path``: same folder, so the final rename stays on one filesystem."""
    return path.with_name(f".mediff-tmp-{secrets.token_hex(6)}-{path.name}")


def _temp_sibling(path: Path) -> Path:
    """A new empty file next to ``path`` whose name keeps path's extension (nibabel picks gzip by it).

    Opened with O_EXCL and mode 0o666 so the final file gets normal umask permissions (mkstemp's
    0o600 would survive the rename).
    """
    for _ in range(100):
        tmp = temp_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise MediffError(f"cannot create a temporary file next to {path}")  # pragma: no cover


def fsync(path: Path) -> None:
    """Flush a written file to disk, so a rename after it never exposes an empty or partial file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temp file to ``path`` in one step."""
    if overwrite:
        os.replace(tmp, path)
        return
    # os.link fails if ``path`` appeared meanwhile: a no-clobber rename without a check-then-act race.
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise MediffError(f"refusing to overwrite existing {path} (pass overwrite=True)") from exc
    except OSError:
        # Filesystems without hard links: best effort.
        if path.exists():
            raise MediffError(f"refusing to overwrite existing {path} (pass overwrite=True)") from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def atomic_write(path: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temp file in path's folder, then move it to ``path``; never leaves the temp.

    The one atomic writer of the package (images, checkpoints, reports all go through it)."""
    _check_target(path, overwrite)
    tmp = _temp_sibling(path)
    try:
        write(tmp)
        fsync(tmp)
        _commit(tmp, path, overwrite)
    except OSError as exc:
        raise MediffError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path
