"""Prior metadata as a typed record: every file mediff ships or writes reads and writes back
byte for byte, a missing or mistyped key is one clear MediffError, unknown keys are kept."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import blob_slices, run_cli
from safetensors import safe_open

from mediff.checkpoint import load_checkpoint, save_checkpoint
from mediff.errors import MediffError
from mediff.prior import attach_guide, builtin_priors, load_prior
from mediff.prior_meta import DataMeta, GuideMeta, PriorMeta
from mediff.train import compact_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The shipped priors and the committed resumable states of the training runs.
SHIPPED = sorted(builtin_priors().values()) + sorted((ROOT / "training").glob("*/resume.safetensors"))


def header(path: Path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["mediff"]


def assert_round_trip(path: Path) -> PriorMeta:
    raw = header(path)
    meta = PriorMeta.from_dict(json.loads(raw))
    assert meta.to_dict() == json.loads(raw)
    assert json.dumps(meta.to_dict()) == raw, "the metadata must be written back byte for byte"
    assert meta.extra == {} and meta.data.extra == {}
    return meta


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_files_round_trip(path: Path) -> None:
    meta = assert_round_trip(path)
    assert isinstance(meta.data, DataMeta) and isinstance(meta.data.val_subjects, tuple)
    assert meta.is_hu == (meta.normalization["kind"] == "hu_window")
    assert meta.compact == (path.name == "resume.safetensors")


def test_shipped_priors_typed() -> None:
    assert {"brain-t1", "ct"} <= set(builtin_priors())
    brain = PriorMeta.from_dict(load_checkpoint(builtin_priors()["brain-t1"])[1])
    ct = PriorMeta.from_dict(load_checkpoint(builtin_priors()["ct"])[1])
    assert not brain.is_hu and ct.is_hu
    assert brain.covariates is not None and ct.covariates is None
    assert isinstance(brain.guide, GuideMeta) and brain.guide.step < brain.step and ct.guide is None
    assert len(brain.data.val_subjects) == 20 and all(isinstance(s, str) for s in brain.data.val_subjects)
    # The guide as a prior of its own: its network and step, the prior's data.
    g = brain.guide.as_prior(brain)
    assert (g.step, g.images_seen, g.net, g.guide) == (brain.guide.step, brain.guide.images_seen, brain.guide.net, None)
    assert (g.image_size, g.normalization, g.sigma_min, g.data) == (brain.image_size, brain.normalization,
                                                                     brain.sigma_min, brain.data)
    assert brain.data_mismatch(g) is None and brain.data_mismatch(ct) == "normalization"
    prior = load_prior("brain-t1")
    assert prior.meta == brain and prior.guide.meta == g
    with pytest.raises(dataclasses.FrozenInstanceError):
        brain.step = 0


def test_files_train_writes_round_trip(tmp_path: Path) -> None:
    """checkpoint.safetensors, prior.safetensors, the compact state and a prior with a guide attached."""
    imgs, subj = blob_slices(32, subjects=3, per_subject=2)
    np.savez(tmp_path / "d.npz", images=imgs.astype(np.uint8), subject_index=subj)
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--data", tmp_path / "d.npz", "--out", run, "--size", 32, "--channels", "8,16",
                           "--blocks", "1,1", "--batch", 2, "--steps", 2, "--val-subjects", 1, "--val-every", 100,
                           "--no-progress")
    assert code == 0, err
    for name in ("checkpoint.safetensors", "prior.safetensors"):
        meta = assert_round_trip(run / name)
        assert json.loads((run / name).with_suffix(".json").read_text()) == meta.to_dict()
    assert (meta.step, meta.images_seen, meta.compact, meta.guide) == (2, 4, False, None)
    assert len(meta.data.val_subjects) == 1 and meta.data.val_subjects[0] in {"0", "1", "2"}
    assert (meta.data.n_val_slices, meta.data.n_train_slices) == (2, 4)
    assert assert_round_trip(compact_checkpoint(run)).compact
    attach_guide(run / "prior.safetensors", run / "checkpoint.safetensors", 2.5, tmp_path / "guided.safetensors")
    guided = assert_round_trip(tmp_path / "guided.safetensors")
    assert guided.guide == GuideMeta.from_prior(meta, 2.5) and dataclasses.replace(guided, guide=None) == meta


@pytest.fixture(scope="module")
def brain() -> dict:
    return load_checkpoint(builtin_priors()["brain-t1"])[1]


def without(d: dict, dotted: str) -> dict:
    d = copy.deepcopy(d)
    *parents, key = dotted.split(".")
    inner = d
    for p in parents:
        inner = inner[p]
    del inner[key]
    return d


def setting(d: dict, dotted: str, value: object) -> dict:
    d = copy.deepcopy(d)
    *parents, key = dotted.split(".")
    inner = d
    for p in parents:
        inner = inner[p]
    inner[key] = value
    return d


@pytest.mark.parametrize("key", ["kind", "net", "sigma_data", "image_size", "normalization", "normalization.kind",
                                 "covariates", "data", "data.val_subjects", "train", "step", "torch", "guide.weight"])
def test_a_missing_key_is_named(brain: dict, key: str) -> None:
    with pytest.raises(MediffError, match=f"lacks '{key}'"):
        PriorMeta.from_dict(without(brain, key))


@pytest.mark.parametrize("key, value, needle", [
    ("sigma_data", "0.29", "must be a number"),
    ("image_size", 128.0, "must be an integer"),
    ("step", True, "must be an integer"),
    ("covariates", [], "must be an object or null"),
    ("normalization", None, "must be an object"),
    ("data.val_subjects", "IXI015", "must be a list"),
    ("data.val_subjects", ["IXI015", 7], "must be a list of strings"),
    ("guide.net", [32, 64], "must be an object"),
    ("torch", 2.13, "must be a string"),
    ("compact", 1, "must be true or false"),
])
def test_a_wrong_type_is_named(brain: dict, key: str, value: object, needle: str) -> None:
    with pytest.raises(MediffError, match=f"'{key}' {needle}") as err:
        PriorMeta.from_dict(setting(brain, key, value))
    assert "\n" not in str(err.value)


def test_not_a_prior(brain: dict) -> None:
    for bad in (setting(brain, "format", "mediff-prior-v0"), without(brain, "format")):
        with pytest.raises(MediffError, match="not a mediff prior"):
            PriorMeta.from_dict(bad)
    with pytest.raises(MediffError, match="JSON object"):
        PriorMeta.from_dict([1, 2])


def test_unknown_keys_survive_in_extra(brain: dict) -> None:
    d = {**brain, "dataset_license": "CC BY-SA 3.0", "notes": {"by": "someone", "n": [1, 2]}}
    d["data"] = {**brain["data"], "site": "HH"}
    d["guide"] = {**brain["guide"], "run": "brain-t1@6000"}
    meta = PriorMeta.from_dict(d)
    assert meta.extra == {"dataset_license": "CC BY-SA 3.0", "notes": {"by": "someone", "n": [1, 2]}}
    assert meta.data.extra == {"site": "HH"} and meta.guide.extra == {"run": "brain-t1@6000"}
    assert meta.to_dict() == d
    # The record shares nothing with the dict it was read from or the dicts it writes.
    d["notes"]["n"].append(3)
    meta.to_dict()["net"]["channels"].append(1)
    assert meta.extra["notes"]["n"] == [1, 2] and meta.net == brain["net"]


def test_load_prior_names_the_file_and_the_key(tmp_path: Path) -> None:
    tensors, meta = load_checkpoint(builtin_priors()["ct"])
    path = tmp_path / "broken.safetensors"
    save_checkpoint(path, tensors, without(meta, "sigma_max"))
    with pytest.raises(MediffError, match="sigma_max") as err:
        load_prior(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_tile_only_for_priors_trained_on_crops_alone():
    from dataclasses import replace

    from mediff.prior import load_prior

    meta = load_prior("ct").meta
    assert meta.train["patch_sizes"] and meta.tile is None  # whole slices in half of its steps
    crops_only = replace(meta, train={**meta.train, "patch_sizes": [64, 128], "full_prob": 0.0})
    assert crops_only.tile == 128
    assert replace(meta, train={**meta.train, "patch_sizes": []}).tile is None


def test_data_pixel_spacing_round_trips_and_is_checked():
    from mediff.errors import MediffError
    from mediff.prior_meta import DataMeta

    d = DataMeta("x", "f", 3, 1, ("a",), (0.5, 0.8))
    assert DataMeta.from_dict(d.to_dict()) == d and d.to_dict()["pixel_spacing_mm"] == [0.5, 0.8]
    assert "pixel_spacing_mm" not in DataMeta("x", "f", 3, 1, ("a",)).to_dict()  # unknown: absent, as before
    with pytest.raises(MediffError, match="pixel_spacing_mm"):
        DataMeta.from_dict({**d.to_dict(), "pixel_spacing_mm": [0.8, 0.5]})
