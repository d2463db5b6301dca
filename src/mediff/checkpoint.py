"""Checkpoint files: safetensors with the JSON metadata embedded, plus a readable JSON sidecar.

The metadata lives inside the safetensors header (key ``mediff``) so one atomic ``os.replace``
publishes weights and metadata together: a reader can never see new weights with old metadata.
The ``.json`` sidecar is a copy for people and tools; it is never read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from mediff.errors import MediffError
from mediff.io import atomic_write


def save_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Atomically write ``tensors`` + ``meta`` to ``path`` (.safetensors) and a ``.json`` sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # Serialised here and written by our atomic writer: safetensors' save_file writes through a temp
    # file of its own (".tmpXXXXXX"), which a kill mid-save would leave behind where resume cannot
    # tell it from a user's file.
    data = save(contiguous, metadata={"mediff": json.dumps(meta)})
    atomic_write(path, True, lambda tmp: tmp.write_bytes(data))
    atomic_write(path.with_suffix(".json"), True, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Read tensors and the embedded metadata; MediffError if missing or not a mediff checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise MediffError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MediffError(f"cannot read checkpoint {path}: {exc}") from exc
    if "mediff" not in header:
        raise MediffError(f"{path} is a safetensors file without mediff metadata")
    try:
        return tensors, json.loads(header["mediff"])
    except ValueError as exc:
        raise MediffError(f"{path} has corrupt mediff metadata: {exc}") from exc


def split_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix.`` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def to_dtype(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Cast floating tensors (e.g. fp16 for shipping); integer buffers stay as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
