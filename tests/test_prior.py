"""The shipped priors: load offline by name, are documented, and denoise held-out anatomy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from cli_helpers import run_cli

import mediff
from mediff.data import percentile_scale
from mediff.prior import builtin_priors


def test_brain_t1_ships_with_its_model_card() -> None:
    path = builtin_priors()["brain-t1"]
    assert path.stat().st_size <= 25e6
    card = path.with_suffix(".md").read_text()
    for needle in ("CC BY-SA 3.0", "IXI dataset", "mediff train", "images seen", "| sigma |"):
        assert needle in card, needle
    prior = mediff.load_prior("brain-t1")
    assert prior.name == "brain-t1" and prior.image_size == 128
    assert prior.meta.normalization == {"kind": "percentile", "percentile": 99.5} and not prior.meta.is_hu
    assert set(prior.meta.covariates["columns"]) == {"Age", "Sex"}
    assert prior.covariates(2, Age=60, Sex="F").shape == (2, prior.meta.covariates["dim"])
    # It ships a weaker, earlier state of its own run for autoguidance, used by default when sampling.
    assert prior.guide is not None and prior.guide.meta.step < prior.meta.step
    assert "## Autoguidance" in card and "arXiv 2406.02507" in card
    x, sigma = torch.rand(1, 1, 128, 128), torch.tensor([0.5])
    den, w = prior.autoguided()
    assert w == prior.meta.guide.weight > 1
    with torch.no_grad():
        want = prior.guide(x, sigma) + w * (prior(x, sigma) - prior.guide(x, sigma))
        assert torch.allclose(den(x, sigma), want, atol=1e-5)


def test_brain_t1_denoises_held_out_subjects(ixi_dir: Path) -> None:
    """At sigma = 0.1 the prior must remove most of the noise on slices of subjects it never saw
    (measured at step 1600: 27.6 dB from 20.0 dB noisy; the floor here is +5 dB)."""
    prior = mediff.load_prior("brain-t1")
    d = np.load(ixi_dir / "ixi_t1_axial_128.npz")
    ids = d["subject_ids"][d["subject_index"]].astype(str)
    idx = np.flatnonzero(np.isin(ids, prior.meta.data.val_subjects))
    idx = idx[np.linspace(len(idx) * 0.3, len(idx) * 0.7, 8).astype(int)]
    imgs = d["images"][idx].astype(np.float32)
    x0 = torch.from_numpy(imgs / percentile_scale(imgs)[:, None, None])[:, None]
    noisy = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        den = prior(noisy, torch.full((len(x0),), 0.1))
    gain = 10 * torch.log10(((noisy - x0) ** 2).mean() / ((den - x0) ** 2).mean())
    assert gain > 5.0, f"denoising gain {gain:.2f} dB"


def test_sample_the_shipped_prior(tmp_path: Path) -> None:
    code, _, err = run_cli("sample", "--model", "brain-t1", "--n", 2, "--steps", 2, "--seed", 1, "--age", 40, "--sex",
                           "M", "--out", tmp_path / "s")
    assert code == 0, err
    x = np.load(tmp_path / "s" / "samples.npz")["images"]
    assert x.shape == (2, 128, 128) and np.isfinite(x).all()
    code, _, err = run_cli("sample", "--model", "brain-t1", "--n", 1, "--steps", 1, "--age", 40, "--height", 3,
                           "--out", tmp_path / "t")
    assert code == 2
    code, _, err = run_cli("sample", "--model", "no-such-prior", "--n", 1, "--out", tmp_path / "u")
    assert code == 2 and "no prior" in err and "Traceback" not in err


def test_ct_ships_with_its_model_card_and_hu_mapping() -> None:
    path = builtin_priors()["ct"]
    assert path.stat().st_size <= 25e6
    card = path.with_suffix(".md").read_text()
    for needle in ("CC BY 3.0", "TCGA-LUAD", "mediff train", "--intensity hu", "images seen", "| sigma |",
                   "held-out patients"):
        assert needle in card, needle
    prior = mediff.load_prior("ct")
    assert prior.image_size == 128 and prior.meta.net["pos_channels"] == 2 and prior.meta.is_hu
    x, norm = prior.normalize(np.array([-1000.0, 0.0, 1000.0]))
    assert torch.allclose(x, torch.tensor([0.0, 0.5, 1.0]))
    assert np.allclose(prior.denormalize(x, norm), [-1000.0, 0.0, 1000.0])


def test_ct_denoises_held_out_patients(ct_dir: Path) -> None:
    """At sigma = 0.1 (200 HU) on every slice of the patients the ct prior never saw: > 5 dB gain."""
    from mediff.recon.ct import fit_hu

    prior = mediff.load_prior("ct")
    d = np.load(ct_dir / "ct_hu_512.npz")
    idx = np.flatnonzero(np.isin(d["patient_id"].astype(str), prior.meta.data.val_subjects))
    assert len(idx) >= 8
    u = np.stack([(fit_hu(d["hu"][i].astype(np.float32), 128, 1.0)[0] + 1000) / 2000 for i in idx])
    x0 = torch.from_numpy(u.astype(np.float32)).clamp_min(0)[:, None]
    noisy = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        den = prior(noisy, torch.full((len(x0),), 0.1))
    gain = 10 * torch.log10(((noisy - x0) ** 2).mean() / ((den - x0) ** 2).mean())
    assert gain > 5.0, f"denoising gain {gain:.2f} dB"


def test_brain_t1_records_its_pixel_size_and_reconstruct_warns_on_another(tmp_path: Path) -> None:
    """brain-t1 learnt 2 mm pixels (its card and metadata say so). A 128-px scan of 0.5 mm pixels
    (a 64 mm field of view) shows anatomy at 4x that size: the reconstruction says so in its notes;
    a 2 mm scan gets no such warning."""
    from mediff import io

    prior = mediff.load_prior("brain-t1")
    assert prior.meta.data.pixel_spacing_mm == (2.0, 2.0)
    assert "Pixel size on the prior's grid: 2 mm" in builtin_priors()["brain-t1"].with_suffix(".md").read_text()
    img = np.zeros((128, 128), np.float32)
    img[24:104, 32:96] = 100.0
    notes = {}
    for px in (0.5, 2.0):
        io.write_nifti(tmp_path / f"s{px}.nii.gz", img, np.diag([px, px, 2.0, 1.0]))
        out = tmp_path / f"o{px}"
        code, _, err = run_cli("reconstruct", "--model", "brain-t1", "--input", tmp_path / f"s{px}.nii.gz", "--out", out,
                               "--steps", 2, "--accel", 4)
        assert code == 0, err
        notes[px] = " ".join(json.loads((out / "metrics.json").read_text())["notes"])
    assert "pixel is 0.5 mm, but brain-t1 learnt from 2 mm" in notes[0.5] and "4x the size" in notes[0.5]
    assert "learnt from" not in notes[2.0]
