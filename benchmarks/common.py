"""Shared helpers of the benchmarks: held-out slices and result tables (JSON + markdown)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine()}


def heldout_slices(npz: Path, subjects: list[str], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` slices (n, 128, 128) float32 of the given subjects, from the middle 60 % of each subject's
    axial range (brain, not the skull cap), spread evenly over subjects; and their subject ids."""
    d = np.load(npz)
    ids = d["subject_ids"][d["subject_index"]].astype(str)
    rng = np.random.default_rng(seed)
    per = int(np.ceil(n / len(subjects)))
    picks = []
    for s in subjects:
        idx = np.flatnonzero(ids == s)
        lo, hi = int(len(idx) * 0.2), int(len(idx) * 0.8)
        picks.extend(rng.choice(idx[lo:hi], size=min(per, hi - lo), replace=False).tolist())
    picks = np.array(sorted(picks)[:n]) if len(picks) <= n else np.sort(rng.choice(picks, n, replace=False))
    return d["images"][picks].astype(np.float32), ids[picks]


def write_table(name: str, rows: list[dict], meta: dict) -> Path:
    """Write results/NAME.json (rows + meta) and results/NAME.md (a markdown table); print the table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    return RESULTS / f"{name}.md"
