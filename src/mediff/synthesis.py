"""Synthesis: sample a prior and export the images (PNG grid, NIfTI, NPZ, DICOM)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mediff import io
from mediff.errors import MediffError
from mediff.prior import load_prior
from mediff.samplers import SAMPLERS, nfe
from mediff.schedules import karras
from mediff.units import Normalization


def progress_callback(total: int, label: str):
    """A rich progress bar over sampler steps, as a context manager yielding a sampler callback."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextmanager
    def bar():
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as p:
            task = p.add_task(label, total=total)
            # ``advance``: steps completed per sampler step (a batch of several problems advances each).
            yield lambda i, x, d, advance=1: p.advance(task, advance)

    return bar()


@torch.no_grad()
def sample_images(model: str | Path, n: int = 16, steps: int = 50, sampler: str = "heun", seed: int = 0,
                  age: float | None = None, sex: str | None = None, guidance: float = 1.0,
                  autoguidance: float | None = None, guide: str | Path | None = None,
                  batch: int = 16) -> tuple[Tensor, dict]:
    """n images (n, 1, S, S) in the prior's normalised units, and a record of how they were made.

    ``autoguidance`` is the weight of the guide model (``guide``, else the one the prior ships; None =
    the shipped weight, 1 = off); ``guidance`` the classifier-free guidance weight of covariates.
    """
    if sampler not in SAMPLERS:
        raise MediffError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if n < 1 or steps < 1:
        raise MediffError("--n and --steps must be positive")
    if guide is not None and autoguidance is None:
        raise MediffError("--guide needs --autoguidance W (its weight; 1 = off)")
    prior = load_prior(model)
    bad = load_prior(guide) if guide is not None else None
    cov = {k: v for k, v in (("Age", age), ("Sex", sex)) if v is not None}
    sigmas = karras(steps, prior.sigma_min, prior.sigma_max).float()
    gen = torch.Generator().manual_seed(seed)
    s = prior.image_size
    out = []
    with progress_callback(math.ceil(n / batch) * steps, f"sampling {n} images") as cb:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            den, weight = prior.autoguided(autoguidance, bad, prior.covariates(b, **cov), guidance)
            x = torch.randn((b, 1, s, s), generator=gen) * sigmas[0]
            out.append(SAMPLERS[sampler](den, x, sigmas, generator=gen, callback=cb))
    units = "HU" if prior.meta.is_hu else "normalised (1 = 99.5th percentile)"
    used = bad or prior.guide
    auto = None if weight == 1.0 else {"weight": weight, "guide": used.name, "guide_step": used.meta.step}
    meta = {"model": prior.name, "step": prior.meta.step, "sampler": sampler, "steps": steps,
            "nfe_per_image": nfe(sampler, steps), "seed": seed, "covariates": cov, "guidance": guidance,
            "autoguidance": auto, "units": units, "normalization": prior.meta.normalization}
    if prior.meta.tile is not None and prior.meta.coarse is None:  # it never saw more of an image than one crop
        meta["note"] = (f"{prior.name} was trained on crops of at most {prior.meta.tile} px, never on whole "
                        f"{s}-px images: its samples are plausible tile by tile but have no whole-image anatomy; "
                        "it is a reconstruction prior (the data supply the layout)")
    return torch.cat(out).clamp_min(0), meta


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W) images into one (rows*(H+pad), cols*(W+pad)) array."""
    n, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), images.dtype)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


def write_samples(folder: Path, images: Tensor, meta: dict, dicom: bool = False) -> None:
    """PNG grid + NIfTI stack (H, W, N) + NPZ (+ DICOM series) of samples (N, 1, H, W) in the prior's
    units: CT priors (``meta["units"] == "HU"``) write HU everywhere but the PNG, which shows the
    [-1000, 1000] HU window; MR priors write normalised units (DICOM: x 1000)."""
    arr = images[:, 0].cpu().numpy().astype(np.float32)
    folder = Path(folder)
    io.write_png(folder / "samples_grid.png", grid(arr), vmin=0.0, vmax=1.0)
    ct = meta.get("units") == "HU"
    if ct:
        arr = Normalization.from_dict(meta["normalization"]).invert(arr)
    io.write_nifti(folder / "samples.nii.gz", np.moveaxis(arr, 0, -1))
    io.write_npz(folder / "samples.npz", **{"hu" if ct else "images": arr}, meta=np.array(json.dumps(meta)))
    if dicom:
        io.write_dicom(folder / "dicom", np.moveaxis(arr if ct else arr * 1000, 0, -1), modality="CT" if ct else "MR")
    (folder / "samples.json").write_text(json.dumps(meta, indent=2))


def read_samples(path: Path) -> tuple[Tensor, dict, bool] | None:
    """The images (N, 1, S, S) of a :func:`write_samples` output (its folder or its samples.npz) in
    normalised units (CT: HU through the samples' own HU window, clipped at air like
    :func:`mediff.data.load_slices`), the record of how they were made (``{}`` if it has none) and
    whether they are CT (stored in HU).
    None when ``path`` is not such an output, e.g. a training NPZ (it has subject labels)."""
    from mediff.data import hu_normalization

    npz = Path(path) / "samples.npz" if Path(path).is_dir() else Path(path)
    if npz.suffix != ".npz" or not npz.is_file():
        return None
    try:
        with np.load(npz, allow_pickle=False) as z:
            if "subject_index" in z.files or "patient_id" in z.files:
                return None
            key = "images" if "images" in z.files else "hu" if "hu" in z.files else None
            if key is None:
                return None
            arr = z[key].astype(np.float32)
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError) as exc:
        raise MediffError(f"cannot read {npz}: {exc}") from exc
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise MediffError(f"{npz}: '{key}' must be a non-empty stack (N, H, W), got shape {arr.shape}")
    x = torch.from_numpy(arr)
    if key == "hu":
        x = Normalization.from_dict(meta.get("normalization") or hu_normalization()).apply(x).clamp_min(0)
    return x[:, None], meta, key == "hu"
