"""Synthesis metrics of the brain-t1 prior on real IXI slices (issue 18): Fréchet distance, precision /
recall / density / coverage and MS-SSIM diversity, with and without autoguidance, beside the real-data
floor and two deliberately degraded generators.

Feature space: the NT-Xent embedding of :mod:`mediff.embedding`, trained once here on the real slices
of the prior's training subjects (not Inception: no ImageNet weights exist offline). The held-out
subjects (``meta.data.val_subjects``, never seen by the prior or the embedding) are split in two
halves by subject: half A is the reference of every row, half B the real-vs-real row (measured: with
10 subjects a half, subject-to-subject differences put it above the samples' FD, whose 145 training
subjects are spread wider). Every row is scored on the same number of images ``n``.

Rows: real half B; real slices of the training subjects (many subjects, as the prior's samples
model them, but seen by the prior and the embedding); brain-t1 samples with the shipped
autoguidance and without (``--autoguidance 1``), from ``mediff sample`` folders; the autoguided
samples blurred by a Gaussian (sigmas ``--blur`` px), degraded generators; and the shipped guide
model alone (the early checkpoint), sampled here with the same sampler when ``--guide-n`` > 0.
FD and PRDC use the embedding's pooled backbone features (``mediff.evaluate.features``).

    mediff sample --model brain-t1 --n 200 --sampler dpmpp2m --steps 32 --seed 1 --out runs/syn/bt1-auto-n200
    mediff sample --model brain-t1 --n 200 --sampler dpmpp2m --steps 32 --seed 2 --autoguidance 1 \
        --out runs/syn/bt1-noauto-n200
    cd benchmarks && python synthesis.py --data ../../shared/data/ixi_t1/ixi_t1_axial_128.npz \
        --auto ../runs/syn/bt1-auto-n200 --noauto ../runs/syn/bt1-noauto-n200 --cache ../runs/synthesis
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from common import machine, write_table
from mediff.data import split_by_subject
from mediff.embedding import EmbeddingConfig, Encoder, load_embedding
from mediff.evaluate import evaluate_sets
from mediff.prior import Prior, load_prior
from mediff.privacy import fit_embedding, real_sets
from mediff.samplers import SAMPLERS
from mediff.schedules import karras
from mediff.synthesis import read_samples

def feature_space(path: Path, images: Tensor, source: str) -> Encoder:
    """The embedding saved at ``path``, else one trained on ``images`` (default config, seed 0) and
    saved there."""
    if path.is_file():
        return load_embedding(path)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    return fit_embedding(images, EmbeddingConfig(), 0, path, {"trained_on": source, "n_images": int(images.shape[0]),
                                                      "subjects": "brain-t1 training subjects"})


def blur(images: Tensor, sigma: float) -> Tensor:
    """Images (N, 1, H, W) convolved with a Gaussian of std ``sigma`` px (a degraded generator)."""
    from monai.networks.layers import GaussianFilter

    return GaussianFilter(spatial_dims=2, sigma=sigma)(images)


@torch.no_grad()
def sample_guide(prior: Prior, n: int, steps: int, sampler: str, seed: int, cache: Path, batch: int = 16) -> Tensor:
    """``n`` samples (n, 1, S, S) of the prior's shipped guide model alone, in normalised units; kept
    in the folder ``cache`` (one file per n, steps, sampler and seed) so a rerun does not resample."""
    path = cache / f"guide_{prior.guide.meta.step}_{sampler}{steps}_n{n}_seed{seed}.pt"
    if path.is_file():
        return torch.load(path)
    guide = prior.guide
    sigmas = karras(steps, guide.sigma_min, guide.sigma_max).float()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        x = torch.randn((min(batch, n - start), 1, guide.image_size, guide.image_size), generator=gen) * sigmas[0]
        out.append(SAMPLERS[sampler](guide, x, sigmas, generator=gen).clamp_min(0))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(torch.cat(out), path)
    return torch.cat(out)


def samples(folder: Path) -> tuple[Tensor, dict]:
    got = read_samples(folder)
    if got is None:
        raise SystemExit(f"{folder} is not a 'mediff sample' output")
    return got[0], got[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="ixi_t1_axial_128.npz (all subjects)")
    ap.add_argument("--auto", type=Path, required=True, help="'mediff sample' folder, shipped autoguidance")
    ap.add_argument("--noauto", type=Path, required=True, help="'mediff sample' folder, --autoguidance 1")
    ap.add_argument("--cache", type=Path, default=Path("runs/synthesis"),
                    help="folder of the embedding (embedding.safetensors: loaded when it exists, else trained "
                    "and written) and of the guide's samples")
    ap.add_argument("--n", type=int, default=500, help="images per row (at most)")
    ap.add_argument("--guide-n", type=int, default=300, help="guide-alone samples (0: no guide row)")
    ap.add_argument("--blur", default="1,2", help="Gaussian blur stds (px) of the degraded rows, comma-separated")
    ap.add_argument("--pairs", type=int, default=1000, help="MS-SSIM pairs per row")
    ap.add_argument("--name", default="synthesis")
    args = ap.parse_args()
    torch.set_num_threads(1)

    prior = load_prior("brain-t1")
    train, held = real_sets(prior.meta, args.data)
    encoder = feature_space(args.cache / "embedding.safetensors", train.images, str(args.data))
    idx_a, idx_b = split_by_subject(held.subjects, len(set(held.subjects.tolist())) // 2, seed=0)
    ref = held.images[torch.from_numpy(idx_a)]
    auto, auto_rec = samples(args.auto)
    noauto, noauto_rec = samples(args.noauto)
    weight = (auto_rec.get("autoguidance") or {}).get("weight")
    sets = {"real, held-out half B": held.images[torch.from_numpy(idx_b)],
            "real, training subjects": train.images,
            f"brain-t1, autoguidance w={weight}": auto,
            "brain-t1, no autoguidance": noauto}
    sets.update({f"autoguided, blurred sigma={s:g} px": blur(auto, s) for s in map(float, args.blur.split(","))})
    if args.guide_n > 0:
        sets[f"guide alone (step {prior.guide.meta.step})"] = sample_guide(
            prior, args.guide_n, auto_rec["steps"], auto_rec["sampler"], auto_rec["seed"], args.cache)
    n = min(args.n, *(x.shape[0] for x in sets.values()))
    t0 = time.time()
    rows = evaluate_sets(encoder, ref, sets, n, k=5, pairs=args.pairs, seed=0)
    meta = {"data": str(args.data), "prior": "brain-t1", "prior_step": prior.meta.step,
            "reference": {"images": int(ref.shape[0]), "subjects": len(set(held.subjects[idx_a].tolist()))},
            "embedding": {"file": str(args.cache / "embedding.safetensors"), "config": asdict(encoder.cfg),
                          "trained_on_images": int(train.images.shape[0])},
            "samples": {"auto": {"path": str(args.auto), **auto_rec},
                        "noauto": {"path": str(args.noauto), **noauto_rec}},
            "n": n, "k": 5, "pairs": args.pairs, "cache": str(args.cache), "metrics_seconds": time.time() - t0,
            "machine": machine()}
    write_table(args.name, [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows], meta)


if __name__ == "__main__":
    main()
