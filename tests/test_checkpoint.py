"""Checkpoint files: safetensors + embedded JSON metadata, written atomically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mediff.checkpoint import load_checkpoint, prefixed, save_checkpoint, split_prefix, to_dtype
from mediff.errors import MediffError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "net.w": torch.randn(4, 3, generator=g),
        "net.b": torch.randn(3, generator=g, dtype=torch.float64),
        "ema.w": torch.randn(3, 4, generator=g).t(),  # non-contiguous view
        "half": torch.randn(5, generator=g).half(),
        "steps": torch.tensor([1, 2, 3], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


META = {"config": {"channels": [32, 64], "fold": 2}, "sigma_data": 0.42, "name": "t1-ixi", "epoch": 7,
        "notes": None, "unicode": "µ-σ"}


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "model.safetensors"  # parent folder is created
    tensors = _tensors()
    save_checkpoint(path, tensors, META)
    loaded, meta = load_checkpoint(path)
    assert meta == META
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert _listing(path.parent) == ["model.json", "model.safetensors"]  # no temp files left
    assert json.loads((path.parent / "model.json").read_text()) == META


def test_overwrite_replaces_weights_and_meta_together(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"v": 1})
    save_checkpoint(path, {"w": torch.ones(3)}, {"v": 2})
    loaded, meta = load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.ones(3)) and meta == {"v": 2}
    assert _listing(tmp_path) == ["m.json", "m.safetensors"]


def test_failed_save_keeps_old_checkpoint_and_leaves_no_temp(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"v": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"w": torch.ones(2)}, {"v": object()})  # metadata not JSON-serialisable
    loaded, meta = load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.zeros(2)) and meta == {"v": 1}
    assert _listing(tmp_path) == ["m.json", "m.safetensors"]


def test_missing_file_raises(tmp_path):
    with pytest.raises(MediffError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(MediffError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint


def test_foreign_safetensors_raises(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(MediffError, match="without mediff metadata"):
        load_checkpoint(path)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(MediffError):
        load_checkpoint(bare)


@pytest.mark.parametrize("content", [b"", b"abc", b"definitely not a safetensors file at all"])
def test_garbage_file_raises(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(MediffError):
        load_checkpoint(path)


def test_truncated_checkpoint_raises(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.arange(1000.0)}, {"v": 1})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MediffError):
        load_checkpoint(path)


def test_corrupt_metadata_raises_mediff_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"mediff": "{not json"})
    with pytest.raises(MediffError):
        load_checkpoint(path)


def test_prefix_helpers_and_to_dtype():
    state = {"a": torch.ones(2), "b.c": torch.zeros(1)}
    full = {**prefixed(state, "net"), **prefixed({"a": torch.full((2,), 2.0)}, "ema"), "netx.a": torch.ones(1)}
    assert set(full) == {"net.a", "net.b.c", "ema.a", "netx.a"}
    back = split_prefix(full, "net")
    assert set(back) == {"a", "b.c"} and torch.equal(back["a"], state["a"])
    cast = to_dtype({"w": torch.ones(2, dtype=torch.float32), "i": torch.arange(3)}, torch.float16)
    assert cast["w"].dtype == torch.float16 and cast["i"].dtype == torch.int64
