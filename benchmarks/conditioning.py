"""Does `brain-t1`'s age / sex conditioning work? (issue 19, the 2D part.)

An age regressor and a sex classifier (one small CNN with two outputs: the architecture of
`mediff.embedding.Encoder`, trained supervised here) learn from real slices of the prior's training
subjects, are checked on real slices of its 20 held-out subjects, and then predict the covariates of
synthetic slices drawn with `--age A --sex S` for each requested pair. If the conditioning works, the
predicted age follows the requested age and the predicted sex matches the requested one, about as
well as on real held-out slices: ``age_slope`` (predicted on requested age) against the same slope
of real slices (predicted on true age), since a regressor trained on few subjects shrinks ages
towards their mean for real slices too.

    python benchmarks/conditioning.py --data ../shared/data/ixi_t1
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import machine, write_table
from mediff.data import load_slices
from mediff.embedding import EmbeddingConfig, Encoder, prepare
from mediff.prior import load_prior
from mediff.synthesis import sample_images


def covariates(csv_path: Path, subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Age (years, NaN if unknown) and sex (1 = F, 0 = M, NaN if unknown) per slice."""
    rows = {r["MRID"]: r for r in csv.DictReader(open(csv_path))}
    age = np.array([float(rows[s]["Age"]) if s in rows and rows[s]["Age"] else np.nan for s in subjects])
    sex = np.array([{"F": 1.0, "M": 0.0}.get(rows[s]["Sex"], np.nan) if s in rows else np.nan for s in subjects])
    return age, sex


def train_predictor(x: torch.Tensor, age: np.ndarray, sex: np.ndarray, steps: int, seed: int) -> tuple[Encoder, float, float]:
    """A CNN predicting (standardised age, sex logit) from slices; returns it, the age mean and std."""
    keep = ~np.isnan(age) & ~np.isnan(sex)
    x, a, s = prepare(x[torch.from_numpy(keep)], 64), torch.tensor(age[keep]).float(), torch.tensor(sex[keep]).float()
    mu, sd = float(a.mean()), float(a.std())
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Encoder(EmbeddingConfig(dim=2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (128,), generator=gen)
        out = net(x[idx])
        loss = F.mse_loss(out[:, 0], (a[idx] - mu) / sd) + F.binary_cross_entropy_with_logits(out[:, 1], s[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False), mu, sd


def slope(true: np.ndarray, predicted: np.ndarray) -> float:
    """Least-squares slope of predicted on true (or requested) age: how much of an age change the
    predictor sees (1 = all of it); compare synthetic with real, as the predictor itself shrinks it."""
    return float(np.polyfit(true, predicted, 1)[0])


@torch.no_grad()
def predict(net: Encoder, x: torch.Tensor, mu: float, sd: float) -> tuple[np.ndarray, np.ndarray]:
    out = torch.cat([net(prepare(x[i:i + 256], 64)) for i in range(0, x.shape[0], 256)])
    return (out[:, 0] * sd + mu).numpy(), (out[:, 1] > 0).float().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/ixi_t1"))
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--ages", default="30,50,70")
    ap.add_argument("--n", type=int, default=48, help="samples per (age, sex)")
    ap.add_argument("--steps", type=int, default=32, help="sampler steps (dpmpp2m)")
    ap.add_argument("--train-steps", type=int, default=1000, help="optimiser steps of the predictor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="conditioning")
    args = ap.parse_args()

    prior = load_prior(args.model)
    sl = load_slices(args.data / "ixi_t1_axial_128.npz", prior.image_size)
    age, sex = covariates(args.data / "participants.csv", sl.subjects)
    held = np.isin(sl.subjects, list(prior.meta.data.val_subjects))
    t0 = time.perf_counter()
    net, mu, sd = train_predictor(sl.images[torch.from_numpy(~held)], age[~held], sex[~held], args.train_steps,
                                  args.seed)
    rows = []
    ok = held & ~np.isnan(age) & ~np.isnan(sex)
    pa, ps = predict(net, sl.images[torch.from_numpy(ok)], mu, sd)
    rows.append({"set": "real, held-out subjects", "requested_age": "", "requested_sex": "", "n": int(ok.sum()),
                 "predicted_age_mean": float(pa.mean()), "age_MAE": float(np.abs(pa - age[ok]).mean()),
                 "sex_accuracy": float((ps == sex[ok]).mean()),
                 "age_corr": float(np.corrcoef(pa, age[ok])[0, 1]), "age_slope": slope(age[ok], pa)})
    train_s = time.perf_counter() - t0
    req_age, pred_age = [], []
    for a in (float(v) for v in args.ages.split(",")):
        for s in ("F", "M"):
            x, _ = sample_images(args.model, n=args.n, steps=args.steps, sampler="dpmpp2m", seed=args.seed, age=a, sex=s)
            pa, ps = predict(net, x, mu, sd)
            req_age += [a] * len(pa)
            pred_age += pa.tolist()
            rows.append({"set": "synthetic", "requested_age": a, "requested_sex": s, "n": len(pa),
                         "predicted_age_mean": float(pa.mean()), "age_MAE": float(np.abs(pa - a).mean()),
                         "sex_accuracy": float((ps == (1.0 if s == "F" else 0.0)).mean())})
    corr = float(np.corrcoef(req_age, pred_age)[0, 1])
    rows.append({"set": "synthetic, all", "requested_age": "", "requested_sex": "", "n": len(pred_age),
                 "predicted_age_mean": float(np.mean(pred_age)),
                 "age_MAE": float(np.mean(np.abs(np.array(pred_age) - np.array(req_age)))),
                 "sex_accuracy": float(np.mean([r["sex_accuracy"] for r in rows if r["set"] == "synthetic"])),
                 "age_corr": corr, "age_slope": slope(np.array(req_age), np.array(pred_age))})
    write_table(args.name, rows, {"model": args.model, "step": prior.meta.step, "sampler": f"dpmpp2m {args.steps}",
                                  "autoguidance": "shipped weight", "predictor_train_steps": args.train_steps,
                                  "predictor_train_s": round(train_s, 1), "seed": args.seed, **machine()})


if __name__ == "__main__":
    main()
