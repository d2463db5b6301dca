"""The ``mediff audit`` job: embed training, held-out and synthetic images, flag copies, write the report.

The embedding decides (Dar et al.); the two pixel-space scores of :mod:`mediff.audit` run beside it
so a reader sees whether they agree. Held-out real images are also scored against the training set
exactly like the synthetic ones: the fraction of them flagged estimates the audit's false alarms on
genuinely new images at this threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mediff import audit as A
from mediff.embedding import EmbeddingConfig
from mediff.prior_meta import PriorMeta
from mediff.privacy import embedding_for, real_sets
from mediff.report import Panel, histogram_chart, write_report


@dataclass(frozen=True)
class AuditRequest:
    """What to audit: ``meta`` of the prior; training / held-out data paths (``heldout`` None: split
    ``train`` by the prior's held-out subjects); ``synthetic`` images (N, 1, S, S) in the prior's
    units; ``embedding``: a saved embedding's path, "train", or None (``privacy.embedding_for``)."""

    meta: PriorMeta
    model: str
    train: Path
    synthetic: Tensor
    heldout: Path | None = None
    embedding: str | None = None
    quantile: float = A.QUANTILE
    rule: str = "heldout"
    seed: int = 0
    config: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    pairs: int = 16
    source: str = ""


def run_audit(req: AuditRequest, out: Path) -> dict:
    """Audit ``req`` and write audit.json, report.html and (when trained) embedding.safetensors into
    ``out`` (which the caller creates atomically). Returns the audit record."""
    train, held = real_sets(req.meta, req.train, req.heldout)
    info = {"model": req.model, "trained_on": str(req.train), "data_fingerprint": train.fingerprint,
            "n_images": int(train.images.shape[0]), "seed": req.seed}
    enc, enc_info = embedding_for(req.embedding, req.model, train.images, train.fingerprint, req.config, req.seed,
                                  out / "embedding.safetensors", info)
    results, false_alarm, other = {}, {}, {}
    for method in A.METHODS:
        tr, he = A.features(method, train.images, enc), A.features(method, held.images, enc)
        results[method] = A.audit(method, tr, he, A.features(method, req.synthetic, enc), req.quantile, req.rule)
        # the other rule's real scores, for the report's histograms (train / held-out / synthetic)
        other[method] = A.null_scores(method, tr, he, "dar" if req.rule == "heldout" else "heldout")
        false_alarm[method] = A.cross_validated_false_alarm(method, tr, he, held.subjects, req.quantile, req.rule)
    main = results["embedding"]
    copies = [_copy_row(k, main, train.subjects) for k in torch.nonzero(main.flagged).flatten().tolist()]
    record = {
        "model": req.model, "synthetic": req.source, "n_synthetic": int(req.synthetic.shape[0]),
        "n_train": int(train.images.shape[0]), "n_heldout": int(held.images.shape[0]),
        "n_train_subjects": int(len(np.unique(train.subjects))), "n_heldout_subjects": int(len(np.unique(held.subjects))),
        "quantile": req.quantile, "threshold_rule": req.rule, "copies": len(copies), "copied_subjects": sorted({c["subject"] for c in copies}),
        "methods": {m: _method_row(r, false_alarm[m]) for m, r in results.items()},
        "agreement": {f"embedding~{m}": A.agreement(main, results[m]) for m in ("ncc", "carlini")},
        "flagged": copies, "embedding": enc_info,
    }
    (out / "audit.json").write_text(json.dumps(record, indent=2))
    _write_report(out / "report.html", req, record, results, other, train.images, train.subjects)
    return record


def verdict_line(record: dict) -> str:
    """One sentence on the embedding's flags, set against the rate at which real images of unseen
    subjects are flagged: flags at or below that rate are what new patients' images get too."""
    m = record["methods"]["embedding"]
    if not record["copies"]:
        return f"no synthetic image is closer to a training image than the threshold ({m['tau']:.3f})"
    fa = m["heldout_false_alarm"]
    than = "more often than" if m["flagged_fraction"] > fa else "no more often than"
    return (f"{record['copies']} of {record['n_synthetic']} synthetic images ({m['flagged_fraction']:.1%}) are flagged "
            f"as copies of {len(record['copied_subjects'])} training subject(s), {than} real images of unseen subjects "
            f"({fa:.1%}, cross-validated)")


def _copy_row(k: int, res: A.AuditResult, subjects: np.ndarray) -> dict:
    j = int(res.nearest[k])
    return {"synthetic_index": k, "train_index": j, "subject": str(subjects[j]), "score": float(res.scores[k])}


def _method_row(res: A.AuditResult, false_alarm: float) -> dict:
    return {"tau": res.tau, "flagged": int(res.flagged.sum()), "flagged_fraction": float(res.flagged.float().mean()),
            "heldout_false_alarm": false_alarm, "max_score": float(res.scores.max())}


def _write_report(path: Path, req: AuditRequest, record: dict, results: dict[str, A.AuditResult],
                  other: dict[str, Tensor], train_images: Tensor, subjects: np.ndarray) -> None:
    """Histograms of every method's scores with its threshold, the synthetic images closest to a
    training image beside that image (flagged or not), and the method table."""
    main = results["embedding"]
    names = {"heldout": "held-out vs training", "dar": "training vs held-out"}
    null, alt = names[req.rule] + " (sets the threshold)", names["dar" if req.rule == "heldout" else "heldout"]
    charts = [histogram_chart(f"{m} scores", {null: r.null.numpy(), alt: other[m].numpy(),
                                              "synthetic vs training": r.scores.numpy()},
                              "Pearson correlation" if m != "carlini" else "-d1 / mean(d1..d50)", r.tau)
              for m, r in results.items()]
    order = torch.argsort(main.scores, descending=True)[:req.pairs].tolist()
    pairs = []
    for k in order:
        j = int(main.nearest[k])
        tag = "flagged" if bool(main.flagged[k]) else "below threshold"
        pairs += [Panel(f"synthetic {k} ({tag})", req.synthetic[k, 0].numpy(), vmin=0, vmax=1,
                        caption=f"r = {float(main.scores[k]):.3f}"),
                  Panel(f"training {j}", train_images[j, 0].numpy(), vmin=0, vmax=1,
                        caption=f"subject {subjects[j]}")]
    rows = [{"method": m, **r} for m, r in record["methods"].items()]
    verdict = verdict_line(record) + ("; the closest pairs are below" if record["copies"] else "")
    how = ("real images of the held-out subjects scored against the training set exactly like the synthetic "
           "ones" if req.rule == "heldout" else "training images scored against the held-out set (Dar et al.'s rule)")
    notes = [verdict,
             f"threshold of each method: the {req.quantile:.0%} quantile of {how}; the embedding is self-supervised "
             "(NT-Xent, Dar et al., arXiv 2402.01054), trained here on the training images, not on ImageNet",
             "heldout_false_alarm: the fraction of real images of unseen subjects flagged, out of sample (threshold "
             "set on one half of the held-out subjects, counted on the other, both ways)",
             *[f"agreement {k}: both {v['both']}, either {v['either']}, kappa {v['kappa']:.2f}"
               for k, v in record["agreement"].items()]]
    write_report(path, f"Memorization audit: {req.model}", [*charts, *pairs], rows, notes,
                 {"model": req.model, "synthetic": req.source, "training images": record["n_train"],
                  "held-out images": record["n_heldout"], "seed": req.seed})

