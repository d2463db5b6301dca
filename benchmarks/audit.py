"""Validate the memorization audit on planted copies (issue 18).

The prior's held-out subjects are split in two halves by subject (``--split-seeds``: one set of rows
per halving): half A sets the threshold exactly as `mediff audit` does (as its --heldout), half B
plays genuine new images (false alarms: a held-out patient flagged as a copy of a training patient). Planted copies are training images changed the way
a leaked copy might be (`mediff.audit.perturb`: exact, flip, rotate 5 deg, noise, intensity), scored
against the training set: recall per change and method. Target: recall >= 0.95 at <= 5 % false alarms.

    python benchmarks/audit.py --model brain-t1 --data ../shared/data/ixi_t1/ixi_t1_axial_128.npz
    python benchmarks/audit.py --model ct --data ../shared/data/ct_tcga/ct_hu_512.npz --name audit_ct
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common import machine, write_table
from mediff.audit import METHODS, PERTURBATIONS, RULES, audit, features, perturb
from mediff.data import split_by_subject
from mediff.embedding import EmbeddingConfig, load_embedding
from mediff.prior import load_prior
from mediff.privacy import fit_embedding, real_sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="brain-t1")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/ixi_t1/ixi_t1_axial_128.npz"))
    ap.add_argument("--n-planted", type=int, default=200, help="training images planted per perturbation")
    ap.add_argument("--embedding-steps", type=int, default=EmbeddingConfig.steps)
    ap.add_argument("--seed", type=int, default=0, help="seed of the embedding and the planted copies")
    ap.add_argument("--split-seeds", default="0,1", help="seeds of the halving of the held-out subjects (rows each)")
    ap.add_argument("--quantiles", default="0.95,0.98")
    ap.add_argument("--embedding", type=Path, help="reuse this embedding if it exists, else train one and save it here")
    ap.add_argument("--name", default="audit_brain_t1")
    args = ap.parse_args()

    meta = load_prior(args.model).meta
    train, held = real_sets(meta, args.data)
    t0 = time.perf_counter()
    cfg = replace(EmbeddingConfig(), steps=args.embedding_steps)
    if args.embedding is not None and args.embedding.exists():
        enc, _ = load_embedding(args.embedding)
    else:
        enc = fit_embedding(train.images, cfg, args.seed, args.embedding,
                            {"model": args.model, "trained_on": str(args.data), "data_fingerprint": train.fingerprint,
                             "n_images": int(train.images.shape[0]), "seed": args.seed})
    train_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(train.images.shape[0], generator=gen)[:args.n_planted]
    planted = {k: perturb(train.images[pick], k, gen) for k in PERTURBATIONS}

    # every image's features once; a halving only picks held-out columns
    feats = {m: {"train": features(m, train.images, enc), "held": features(m, held.images, enc),
                 **{k: features(m, v, enc) for k, v in planted.items()}} for m in METHODS}
    rows = []
    for split in (int(v) for v in args.split_seeds.split(",")):
        novel_idx, calib_idx = (torch.from_numpy(i) for i in
                                split_by_subject(held.subjects, len(np.unique(held.subjects)) // 2, split))
        for method in METHODS:
            f = feats[method]
            ref, cal, new = f["train"], f["held"][:, calib_idx], f["held"][:, novel_idx]
            for rule in RULES:
                for quantile in (float(v) for v in args.quantiles.split(",")):
                    res = audit(method, ref, cal, new, quantile, rule)
                    row = {"split": split, "method": method, "threshold": rule, "quantile": quantile, "tau": res.tau,
                           "false_alarm": float(res.flagged.float().mean())}
                    for kind in PERTURBATIONS:
                        res = audit(method, ref, cal, f[kind], quantile, rule)
                        row[f"recall_{kind}"] = float(res.flagged.float().mean())
                        row[f"source_{kind}"] = float((res.nearest == pick).float().mean())
                    rows.append(row)
    write_table(args.name, rows, {"model": args.model, "data": str(args.data), "n_train": int(train.images.shape[0]),
                                  "n_heldout": int(held.images.shape[0]), "n_planted": int(pick.numel()),
                                  "embedding": cfg.__dict__, "embedding_train_s": round(train_s, 1), "seed": args.seed,
                                  **machine()})


if __name__ == "__main__":
    main()
