"""The memorization audit: copy scores, Dar et al.'s threshold, the embedding, and `mediff audit`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, blob_slices, run_cli
from mediff import audit as A
from mediff.embedding import (VIEWS, EmbeddingConfig, augment, embed, load_embedding, nt_xent, prepare,
                              save_embedding, train_embedding)
from mediff.errors import MediffError

TINY = EmbeddingConfig(size=32, width=8, steps=4, batch=16)


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Smooth random images (n, 1, size, size): Gaussian noise low-passed, so pixel scores are not trivial."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, size, size), generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)


def _px(x: torch.Tensor) -> torch.Tensor:
    return A.features("ncc", x)


def test_pearson_matches_numpy() -> None:
    a, b = _images(5, 0), _images(7, 1)
    ref = np.corrcoef(a.flatten(1).numpy(), b.flatten(1).numpy())[:5, 5:]
    np.testing.assert_allclose(A.pearson(a, b).numpy(), ref, atol=1e-5)


def test_nearest_finds_the_copy_and_carlini_ratio_is_largest_for_it() -> None:
    ref = _images(40, 0)
    query = torch.cat([ref[[3, 17]] * 2.0 + 0.5, _images(2, 5)])  # two rescaled copies, two new images
    v, i = A.nearest_correlation(query, ref)
    assert i[:2].tolist() == [3, 17] and torch.allclose(v[:2], torch.ones(2), atol=1e-5)
    assert bool((v[2:] < 0.9).all())
    s, j = A.carlini_score(ref[[3, 17]], ref)
    assert j.tolist() == [3, 17] and torch.allclose(s, torch.zeros(2), atol=1e-3)
    s_new, _ = A.carlini_score(_images(2, 5), ref)
    assert bool((s_new < -0.5).all())  # a new image is about as far from its nearest as from the next ones


@pytest.mark.parametrize("rule", A.RULES)
@pytest.mark.parametrize("method", ["ncc", "carlini"])
def test_audit_flags_planted_copies_and_sets_its_threshold(method: str, rule: str) -> None:
    train, held, new = _images(200, 0), _images(100, 1), _images(50, 2)
    synthetic = torch.cat([train[:10] + 0.01 * _images(10, 3), new])
    train, held, synthetic = _px(train), _px(held), _px(synthetic)
    res = A.audit(method, train, held, synthetic, quantile=0.95, rule=rule)
    null, _ = A.score(method, held, train) if rule == "heldout" else A.score(method, train, held)
    assert res.tau == pytest.approx(float(torch.quantile(null.double(), 0.95)))
    assert res.flagged[:10].all() and res.nearest[:10].tolist() == list(range(10))
    assert float(res.flagged[10:].float().mean()) <= 0.2


def test_heldout_threshold_keeps_false_alarms_at_the_quantile_where_dars_rule_does_not() -> None:
    """With far more training than held-out images, a new image's best match among the training set
    beats a training image's best match among the few held-out ones: Dar et al.'s rule then flags
    many genuinely new images; scoring held-out images against the training set does not."""
    train, held = _px(_images(600, 0)), _px(_images(80, 1))
    groups = np.repeat(np.arange(8), 10)
    fa = {rule: A.cross_validated_false_alarm("ncc", train, held, groups, 0.95, rule) for rule in A.RULES}
    assert fa["heldout"] <= 0.15 and fa["dar"] >= 0.3, fa
    assert np.isnan(A.cross_validated_false_alarm("ncc", train, held, np.zeros(80), 0.95))


def test_audit_rejects_bad_input() -> None:
    x = _px(_images(4, 0))
    with pytest.raises(MediffError, match="differ in size"):
        A.audit("ncc", x, x, _px(_images(4, 0, size=8)))
    with pytest.raises(MediffError, match="synthetic"):
        A.audit("ncc", x, x, x[:, :0])
    with pytest.raises(MediffError, match="feature stacks"):
        A.audit("ncc", x[0], x[0], x[0])
    with pytest.raises(MediffError, match="unknown audit method"):
        A.score("ssim", x, x)
    with pytest.raises(MediffError, match="needs an encoder"):
        A.features("embedding", _images(4, 0))


def test_agreement_and_perturbations() -> None:
    r = A.audit("ncc", _px(_images(30, 0)), _px(_images(30, 1)), _px(_images(30, 0)))
    assert A.agreement(r, r)["kappa"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    x = _images(3, 4)
    for kind in A.PERTURBATIONS:
        y = A.perturb(x, kind, g)
        assert y.shape == x.shape and (kind == "exact") == bool(torch.equal(x, y))
    assert torch.equal(A.perturb(x, "flip", g).flip(-1), x)
    with pytest.raises(MediffError, match="unknown perturbation"):
        A.perturb(x, "blur", g)


def test_the_best_view_undoes_a_rotation_or_flip() -> None:
    """A query's score is its best view's, matched against the reference images themselves."""
    ref = _images(20, 0, size=32)
    views = torch.stack([ref.flip(-1).flatten(1), ref.flatten(1)])  # view 0 flipped, view 1 the image
    v, i = A.score("ncc", views, A.features("ncc", ref))
    assert i.tolist() == list(range(20)) and torch.allclose(v, torch.ones(20), atol=1e-5)
    x = _images(4, 0, size=32)
    enc = train_embedding(x, TINY, seed=0)
    stack = A.features("embedding", x, enc)
    assert stack.shape == (len(VIEWS), 4, TINY.dim) and torch.equal(stack[0], embed(enc, x))
    flipped = A.features("embedding", x.flip(-1), enc)
    assert torch.allclose(flipped[3], stack[0], atol=1e-4)  # VIEWS[3] flips back: the image itself


def test_embedding_prepare_and_augment() -> None:
    x = _images(4, 0, size=24) * 3 + 7
    p = prepare(x, 32)
    assert p.shape == (4, 1, 32, 32)
    assert torch.allclose(p.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(prepare(x * 5 + 2, 32), p, atol=1e-4)  # blind to intensity scale and offset
    same = augment(p, EmbeddingConfig(p=0.0), torch.Generator().manual_seed(0))
    assert torch.allclose(same, p, atol=1e-5)
    flipped = augment(p, EmbeddingConfig(p=1.0, rotate_deg=0.0), torch.Generator().manual_seed(0))
    assert torch.allclose(flipped, p.flip(-1).flip(-2), atol=1e-5)


def test_nt_xent_prefers_matching_pairs() -> None:
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert float(nt_xent(z, z, 0.1)) < float(nt_xent(z, z.roll(1, 0), 0.1))


def test_embedding_training_is_seeded_and_round_trips(tmp_path: Path) -> None:
    x = _images(32, 0, size=32)
    state = torch.random.get_rng_state()
    a = train_embedding(x, TINY, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not touched
    b = train_embedding(x, TINY, seed=3)
    ea = embed(a, x)
    assert ea.shape == (32, TINY.dim) and torch.equal(ea, embed(b, x))
    save_embedding(tmp_path / "e.safetensors", a, {"trained_on": "test"})
    c, info = load_embedding(tmp_path / "e.safetensors")
    assert info == {"trained_on": "test"} and torch.equal(embed(c, x), ea)


def test_load_embedding_rejects_a_prior(tmp_path: Path) -> None:
    from mediff.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "p.safetensors", {"w": torch.zeros(1)}, {"kind": "prior"})
    with pytest.raises(MediffError, match="not a mediff embedding"):
        load_embedding(tmp_path / "p.safetensors")


# --------------------------------------------------------------------------------------------------
# mediff audit, on a tiny prior trained through the CLI (tests/test_cli.py's tiny_run)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prior, its training data): 32 px blobs of 4 subjects, 4 slices each, one held out."""
    root = tmp_path_factory.mktemp("audit_prior")
    imgs, subj = blob_slices(32, subjects=4, per_subject=4)
    np.savez(root / "d.npz", images=imgs.astype(np.uint8), subject_index=subj)
    code, _, err = run_cli("train", "--data", root / "d.npz", "--out", root / "run", "--size", 32, "--channels",
                           "8,16", "--blocks", "1,1", "--batch", 4, "--steps", 2, "--val-subjects", 1,
                           "--val-every", 100, "--no-progress")
    assert code == 0, err
    return root / "run" / "prior.safetensors", root / "d.npz"


def _audit(prior: Path, data: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    return run_cli("audit", "--model", prior, "--train", data, "--embedding-steps", 2, "--out", out, *extra)


def test_cli_audit_flags_copies_of_training_images(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    from mediff.data import load_slices
    from mediff.prior import load_prior

    prior, data = tiny
    meta = load_prior(prior).meta
    sl = load_slices(data, 32)
    train = [k for k, s in enumerate(sl.subjects.tolist()) if s not in meta.data.val_subjects]
    np.savez(tmp_path / "syn.npz", images=sl.images[train[:3], 0].numpy())
    code, _, err = _audit(prior, data, tmp_path / "a", "--synthetic", tmp_path / "syn.npz", "--fail-on-copies")
    assert code == 3, err
    rec = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert rec["copies"] == 3 and rec["n_train_subjects"] == 3 and rec["n_heldout_subjects"] == 1
    assert [c["train_index"] for c in rec["flagged"]] == [0, 1, 2]
    assert {"embedding", "ncc", "carlini"} == set(rec["methods"])
    html = (tmp_path / "a" / "report.html").read_text()
    assert "(flagged)" in html and "Memorization audit" in html
    # the saved embedding reproduces the audit
    code, _, err = _audit(prior, data, tmp_path / "b", "--synthetic", tmp_path / "syn.npz", "--embedding",
                          tmp_path / "a" / "embedding.safetensors")
    assert code == 0, err
    again = json.loads((tmp_path / "b" / "audit.json").read_text())
    assert again["methods"]["embedding"] == rec["methods"]["embedding"]


def test_cli_audit_draws_samples(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    prior, data = tiny
    code, _, err = _audit(prior, data, tmp_path / "a", "--n", 3, "--steps", 2)
    assert code == 0, err
    assert (tmp_path / "a" / "synthetic" / "samples.npz").is_file() and (tmp_path / "a" / "report.html").is_file()


def test_cli_audit_bad_input(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    prior, data = tiny
    code, _, err = _audit(prior, tmp_path / "missing.npz", tmp_path / "a")
    assert_one_line_error(code, err, "--train not found")
    (tmp_path / "empty").mkdir()
    code, _, err = _audit(prior, data, tmp_path / "b", "--synthetic", tmp_path / "empty")
    assert_one_line_error(code, err)
    np.savez(tmp_path / "small.npz", images=np.zeros((2, 16, 16), np.float32))
    code, _, err = _audit(prior, data, tmp_path / "c", "--synthetic", tmp_path / "small.npz")
    assert_one_line_error(code, err, "shape")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["ct", "brain-t1"])
def test_shipped_embedding_is_trained_on_its_priors_data(name: str) -> None:
    """`mediff audit --model NAME` uses the shipped embedding only for the data its prior learnt."""
    from mediff.embedding import shipped_embedding
    from mediff.prior import load_prior
    from mediff.privacy import embedding_for

    path = shipped_embedding(name)
    assert path is not None, f"no embedding shipped for {name}"
    enc, info = load_embedding(path)
    meta = load_prior(name).meta
    assert info["model"] == name and info["data_fingerprint"] == meta.data.fingerprint
    assert info["n_images"] == meta.data.n_train_slices
    x = _images(4, 0, size=meta.image_size)
    got, got_info = embedding_for(None, name, x, meta.data.fingerprint, TINY, 0, Path("unused"), {})
    assert got_info["shipped"] and torch.equal(embed(got, x), embed(enc, x))
