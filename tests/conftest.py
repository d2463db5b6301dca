"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The shared data folder sits next to the repository (../shared/data), never inside it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: the tests' problems are tiny, and on a shared 2-core
    machine every OpenMP region otherwise waits for a busy second core (10x slower, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    """Root of the shared real-data folder; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def ixi_dir(shared_data: Path) -> Path:
    """IXI T1 folder (volumes/IXI*_T1.nii.gz, 120x120x90 at 2 mm); skips when absent."""
    d = shared_data / "ixi_t1"
    if not d.is_dir():
        pytest.skip(f"IXI data not found at {d}")
    return d


@pytest.fixture
def ct_dir(shared_data: Path) -> Path:
    """TCGA-LUAD CT folder (ct_hu_512.npz: 77 slices in HU, 42 patients); skips when absent."""
    d = shared_data / "ct_tcga"
    if not (d / "ct_hu_512.npz").is_file():
        pytest.skip(f"CT data not found at {d}")
    return d


@pytest.fixture(scope="session")
def prior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prior trained in-process for 2 steps on blob images (3 subjects, 1 held out)."""
    from cli_helpers import SIZE, blob_slices
    import numpy as np

    from mediff.nets import UNetConfig
    from mediff.train import TrainConfig, train

    root = tmp_path_factory.mktemp("recon_prior")
    imgs, subj = blob_slices(SIZE, subjects=3, per_subject=2)
    np.savez(root / "d.npz", images=imgs.astype(np.float32), subject_index=subj)
    cfg = TrainConfig(size=SIZE, steps=2, batch=4, checkpoint_every=2, val_every=2, n_val_subjects=1,
                      net=UNetConfig(channels=(8, 16), blocks=(1, 1), attention_levels=(1,)).to_dict())
    train(root / "d.npz", root / "run", cfg, progress=False)
    path = root / "run" / "prior.safetensors"
    assert path.is_file()
    return path
