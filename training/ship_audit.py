"""Ship a shipped prior's memorization audit: its embedding into the package, its summary into
benchmarks/results, and the audit section of its model card.

    mediff audit --model brain-t1 --train ../shared/data/ixi_t1/ixi_t1_axial_128.npz \
        --synthetic runs/syn/brain-t1 --embedding train --out runs/audit/brain-t1
    python training/ship_audit.py brain-t1 runs/audit/brain-t1 --command "<the two commands above>"

The embedding (trained on the prior's training subjects, stored fp16) becomes the default of
``mediff audit --model NAME`` when --train is that prior's data. The card section is written by
:func:`audit_lines`, which training/ship_prior.py calls too, so re-shipping weights keeps it only
while it describes the same step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from mediff.audit_job import verdict_line  # noqa: E402
from mediff.embedding import load_embedding, save_embedding  # noqa: E402
from mediff.prior import load_prior  # noqa: E402
from mediff.prior_meta import PriorMeta  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SECTION = "## Memorization audit"


def audit_lines(name: str, meta: PriorMeta) -> list[str]:
    """The card's audit section from benchmarks/results/audit_shipped_NAME.json, if it audited this step."""
    path = RESULTS / f"audit_shipped_{name}.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    if d["step"] != meta.step:
        return []
    m = d["methods"]
    rows = ["| method | threshold | samples flagged | unseen-subject real images flagged (cross-validated) |",
            "|---|---|---|---|"]
    rows += [f"| {k} | {v['tau']:.3f} | {v['flagged']} of {d['n_synthetic']} ({v['flagged_fraction']:.1%}) | "
             f"{v['heldout_false_alarm']:.1%} |" for k, v in m.items()]
    verdict = verdict_line(d)
    return [SECTION, "",
            f"{d['n_synthetic']} samples ({d['sampling']}) audited against the {d['n_train']} training slices of "
            f"{d['n_train_subjects']} subjects, the threshold set by the {d['n_heldout']} slices of the "
            f"{d['n_heldout_subjects']} held-out subjects (the {d['quantile']:.0%} quantile of their images' "
            "correlation with the closest training image in a self-supervised embedding trained on the training slices, after Dar et al., "
            f"arXiv 2402.01054): {verdict}. The pixel-space NCC and Carlini et al.'s nearest-neighbour ratio run "
            "beside the embedding; the last column is the audit's false-alarm rate on new patients (threshold set on "
            "half of the held-out subjects, counted on the other half, both ways).", "", *rows, "",
            f"`{d['command']}`. The embedding it trained ships as `weights/embeddings/{name}.safetensors` and is the "
            f"default of `mediff audit --model {name}` on this data; the planted-copy validation of the method is "
            "`benchmarks/audit.py` (README).", "", ""]


def main(name: str, folder: Path, command: str) -> None:
    meta = load_prior(name).meta
    rec = json.loads((folder / "audit.json").read_text())
    samples = json.loads((Path(rec["synthetic"]) / "samples.json").read_text())
    used = folder / "embedding.safetensors"
    enc, info = load_embedding(used if used.exists() else Path(rec["embedding"]["file"]))
    info = {k: v for k, v in info.items() if k not in ("file", "shipped")}
    if info.get("data_fingerprint") != meta.data.fingerprint:
        raise SystemExit(f"the audit's embedding was not trained on {name}'s training data (its record: {info})")
    out = ROOT / "src" / "mediff" / "weights" / "embeddings" / f"{name}.safetensors"
    save_embedding(out, enc, info, dtype=torch.float16)
    out.with_suffix(".json").unlink()  # the sidecar is for runs, not for the package
    auto = samples.get("autoguidance")
    summary = {k: rec[k] for k in ("n_synthetic", "threshold_rule", "quantile", "n_train", "n_heldout", "n_train_subjects", "n_heldout_subjects",
                                   "copies", "copied_subjects", "methods", "agreement")}
    summary.update(step=meta.step, command=command,
                   sampling=f"{samples['sampler']} {samples['steps']} steps, seed {samples['seed']}"
                            + (f", autoguidance {auto['weight']:g}" if auto else ""))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"audit_shipped_{name}.json").write_text(json.dumps(summary, indent=2))
    card = ROOT / "src" / "mediff" / "weights" / f"{name}.md"
    text = card.read_text()
    if SECTION in text:  # replace the section up to the next one
        head, _, rest = text.partition(SECTION)
        tail = rest[rest.index("\n## ") + 1:]
    else:  # first audit: before the intended-use section
        head, _, tail = text.partition("## Intended use")
        tail = "## Intended use" + tail
    card.write_text(head + "\n".join(audit_lines(name, meta)) + tail)
    print(f"shipped the audit of {name}: {rec['copies']} copies; embedding {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("folder", type=Path, help="the mediff audit output folder")
    ap.add_argument("--command", required=True, help="the commands that made the audit, for the card")
    args = ap.parse_args()
    main(args.name, args.folder, args.command)
