"""Ship a trained prior: copy a run's EMA weights into the package, write its model card, and write
the run's compact resumable state (``resume.safetensors``, the file version control keeps).

    python training/ship_prior.py training/brain-t1 brain-t1 [--guide FILE --guide-weight W]
    python training/ship_prior.py training/ct-whole ct
    python training/ship_prior.py training/ct-native ct-native --coarse ct --coarse-from-sigma 0.2

A fresh clone has only the compact state: then the prior is its EMA (``mediff.train.prior_from_compact``,
the same fp16 weights training wrote) and the compact state is kept as it is.

``--coarse`` stores a whole-image prior of the same images on a coarser grid in the shipped file
(``mediff.denoiser.TwoScale``), used from ``--coarse-from-sigma`` up (benchmarks/two_scale.py).
``--guide`` stores a weaker model of the same data (a prior file or checkpoint, e.g. an earlier
shipped version; the built-in name reads the currently shipped weights before they are replaced) in
the shipped file for autoguidance, with ``--guide-weight`` as the default sampling weight.

Every number in the card comes from the run's metadata, its validation log (val.csv) and the
benchmark results: benchmarks/results/denoise.json for brain-t1
(python benchmarks/denoise.py --model training/brain-t1/prior.safetensors) and
benchmarks/results/ct_prior.json for ct (python benchmarks/ct_prior.py ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mediff.prior import attach_coarse, attach_guide  # noqa: E402
from mediff.prior_meta import PriorMeta, read_prior_file, spacing_text  # noqa: E402
from mediff.recon.job import SCALE_TOLERANCE  # noqa: E402
from mediff.train import COMPACT_NAME, compact_checkpoint, prior_from_compact  # noqa: E402
from ship_audit import audit_lines  # noqa: E402 - training/ is on sys.path when this script runs

CARDS = {
    "brain-t1": {
        "data": "IXI dataset (Imperial College London, brain-development.org/ixi-dataset), T1-weighted, Hammersmith "
                "Hospital Philips 3T, 2 mm isotropic",
        "license": "CC BY-SA 3.0 (weights are derived from IXI and shared under the same license; credit \"IXI "
                   "dataset, Imperial College London\")",
        "command": "{env}training/train_brain_t1.sh  # = mediff train "
                   "--data ../shared/data/ixi_t1/ixi_t1_axial_128.npz "
                   "--covariates ../shared/data/ixi_t1/participants.csv --out training/{run} --size 128 "
                   "--batch 16 --steps {steps} --val-subjects 20 --pixel-spacing 2 --decay-steps {decay} [--resume]",
        "what": "axial brain T1 slices",
        "use": "Research use: synthesis of brain T1 slices and as the prior of MRI reconstruction. Trained on one site "
               "(Philips 3T, healthy adults); not validated for diagnosis, pathology, other contrasts or paediatric "
               "data.",
    },
    "ct": {
        "data": "The Cancer Imaging Archive (TCIA), TCGA-LUAD collection: 77 chest/abdomen/pelvis CT slices in HU "
                "of 42 patients (one slice per series), downsampled to 128 px",
        "license": "CC BY 3.0 (credit \"The Cancer Imaging Archive (TCIA), TCGA-LUAD\")",
        "command": "{env}training/train_ct.sh {kind} {steps}  # = mediff train "
                   "--data ../shared/data/ct_tcga/ct_hu_512.npz "
                   "--out training/ct-{kind} --size 128 --batch 16 --steps {steps} --val-subjects 8 --val-every 200 "
                   "--intensity hu --position{patch} [--resume]",
        "what": "axial CT slices",
        "use": "Research use: the prior of sparse-view, limited-angle and low-dose CT reconstruction at 128 px. "
               "Learnt from 63 slices of 34 patients: a small-data prior, not validated for diagnosis. On whole "
               "slices the network memorises them: held-out validation PSNR peaks at step 2000 and falls at every "
               "sigma after it (step 2000 -> 4400: -0.54 dB at sigma 0.05, -1.45 dB at 0.5; "
               "`docs/ct-whole-val-to-step4400.csv` / `.png`, logged by `training/train_ct.sh whole 9000`), so that "
               "candidate is scored at step 2000 (`training/train_ct.sh whole 2000` from the committed step-1400 "
               "state). The Patch Diffusion candidate ships at step 5600: from step 3000 (the `ct` it replaced) its "
               "held-out validation PSNR rose 0.26 / 0.24 / 0.11 dB at sigma 0.05 / 0.1 / 0.2, levelling off at the "
               "higher noise levels, and DDS at 60 views gained 0.6 dB by step 4800 "
               "(`benchmarks/results/ct_prior_latest.md`); training continues from its resumable state.",
    },
    "ct-native": {
        "data": "The Cancer Imaging Archive (TCIA), TCGA-LUAD collection: 77 chest/abdomen/pelvis CT slices in HU "
                "of 42 patients (one slice per series), at their own 512 x 512 grid (0.54-0.78 mm pixels)",
        "license": "CC BY 3.0 (credit \"The Cancer Imaging Archive (TCIA), TCGA-LUAD\")",
        "command": "{env}training/train_ct.sh native {steps}  # = mediff train "
                   "--data ../shared/data/ct_tcga/ct_hu_512.npz --out training/ct-native --size 512 --batch 2 "
                   "--steps {steps} --val-subjects 8 --intensity hu --position{patch} --checkpoint-every 100 "
                   "--val-every 1000 [--resume]",
        "what": "axial CT slices at native resolution",
        "use": "Research use: the prior of sparse-view, limited-angle and low-dose CT reconstruction on a 512-px "
               "slice's own grid. Trained on 64- and 128-px crops only (Patch Diffusion with the crops' coordinates "
               "in the whole slice), never on whole slices: it denoises a slice tile by tile "
               "(`EDMPrecond.tile`), and the whole-slice layout at high noise comes from the 128-px `ct` shipped "
               "inside it (Two scales, above). Learnt from 63 slices of 34 patients: a small-data prior, not "
               "validated for diagnosis.",
    },
}


def units(meta: PriorMeta) -> str:
    if meta.is_hu:
        lo, hi = meta.normalization["params"]["hu_min"], meta.normalization["params"]["hu_max"]
        return (f"in u = (HU - ({lo:g})) / {hi - lo:g} (u = 0 at {lo:g} HU, 1 at {hi:g} HU; stored in the metadata "
                "`normalization`, so `Prior.normalize` / `denormalize` map HU <-> u exactly)")
    return "with intensities normalised per slice (0 -> 0, 99.5th percentile -> 1)"


def _cell(key: str, value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def md_table(rows: list[dict], keys: list[str], fmt: Callable[[str, object], str] = _cell) -> list[str]:
    """Markdown table lines of ``rows`` in the columns ``keys``; ``fmt(key, value)`` writes a cell
    (default: floats to 2 decimals)."""
    return (["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
            + ["| " + " | ".join(fmt(k, r[k]) for k in keys) + " |" for r in rows])


def benchmark_lines(name: str, run: Path, meta: PriorMeta) -> list[str]:
    """The card's measured comparison with classical methods, if the benchmark ran on this step."""
    res = ROOT / "benchmarks" / "results"
    if name == "ct" and (res / "ct_prior.json").exists():
        d = json.loads((res / "ct_prior.json").read_text())
        rows = d["rows"]
        if not any(r["step"] == meta.step and d["meta"]["candidates"].get(r["candidate"], "").startswith(
                f"training/{run.name}/") for r in rows):
            return []
        keys = [k for k in rows[0] if k not in ("candidate",)]
        lines = [f"## Candidates on the {d['meta']['n_slices']} slices of the {len(d['meta']['eval_patients'])} "
                 "held-out patients", "", *md_table(rows, ["candidate", *keys])]
        cands = ",".join(f"{k}={v}" for k, v in d["meta"]["candidates"].items())
        solvers = ",".join(k.split("_")[0] for k in keys if k.endswith("v_PSNR") and not k.startswith("fbp"))
        return lines + ["", f"`python benchmarks/ct_prior.py --solvers {solvers} --candidates {cands}` (denoising PSNR "
                            "in u units, data range 1; reconstruction PSNR in the HU window [-1000, 1000]; FBP has no "
                            "prior). Shipped: the candidate with the higher DDS PSNR (the CLI's default solver), "
                            "denoising PSNR breaking ties. Samples of both (`mediff sample --n 8 --steps 24 --seed 0`): "
                            "`docs/ct-samples-whole.png`, `docs/ct-samples-patch.png`.", ""]
    runs = [json.loads(f.read_text()) for f in sorted(res.glob("ct_native*.json")) if not f.stem.endswith("_lambda")]
    runs = [d for d in runs if meta.step in d["meta"].get("prior_step", {}).values()]
    if name == "ct-native" and runs:
        keys = ["task", "method", "grid", "NFE", "PSNR", "SSIM", "s_per_slice"]
        ns = sorted({d["meta"]["n_slices"] for d in runs})
        lines = [f"## Reconstruction on the slices' own 512-px grid ({ns[0]}{f'-{ns[-1]}' if len(ns) > 1 else ''} slices of "
                 "held-out patients per task)", "", *md_table([r for d in runs for r in d["rows"]], keys)]
        return lines + ["", f"`python benchmarks/ct.py --native --model {runs[0]['meta']['model']} ...` (README; "
                            "PSNR/SSIM in the HU window [-1000, 1000] on each slice's own grid, against the slice; "
                            "grid: the method's working grid).", ""]
    den = res / "denoise.json"
    if name == "brain-t1" and den.exists():
        d = json.loads(den.read_text())
        if d["meta"].get("step") == meta.step:
            lines = ["## Denoising vs classical denoisers (oracle-tuned), held-out subjects", "",
                     "| sigma | noisy | prior | Gaussian (oracle) | TV (oracle) |", "|---|---|---|---|---|"]
            lines += [f"| {r['sigma']} | {r['noisy_PSNR']:.2f} | {r['prior_PSNR']:.2f} | "
                      f"{r['gaussian_oracle_PSNR']:.2f} | {r['tv_oracle_PSNR']:.2f} |" for r in d["rows"]]
            return lines + ["", f"`python benchmarks/denoise.py --model training/{run.name}/prior.safetensors --n "
                                f"{d['meta']['n_slices']}` (PSNR in dB, data range 1).", ""]
    return []


def guide_lines(meta: PriorMeta) -> list[str]:
    """The card's autoguidance section: the guide model and, if run on these weights, the benchmark."""
    g = meta.guide
    lines = ["## Autoguidance (sampling)", "",
             f"The file also holds a guide model: this prior's own run at step {g.step} ({g.images_seen} "
             f"images seen; LeanUNet {g.net['channels']} channels). `mediff sample` draws from "
             f"D_guide + w (D - D_guide) with w = {g.weight:g} by default (autoguidance, Karras et al. 2024, "
             "arXiv 2406.02507): the better-trained model's improvements over the weaker one are amplified, which "
             "removes the speckle and blur the prior alone leaves in samples. `--autoguidance 1` samples the prior "
             "alone; reconstruction always uses the prior alone.", ""]
    res = ROOT / "benchmarks" / "results" / "autoguidance.json"
    if res.exists():
        d = json.loads(res.read_text())
        if d["meta"]["step"] == meta.step and d["meta"]["guide_step"] == g.step:
            keys = [k for k in d["rows"][0] if k not in ("s_per_image",)]
            lines += md_table(d["rows"], keys, lambda k, v: f"{v:.3f}" if isinstance(v, float) else str(v))
            m = d["meta"]
            lines += ["", f"`python benchmarks/autoguidance.py --n {m['n']}` ({m['n']} samples per row, {m['sampler']} "
                          f"{m['steps']} steps, seed {m['seed']}, against real slices of the held-out subjects; "
                          "spectral distances in mean |log10 power difference|, intensity W1 in normalised units: "
                          "lower is closer to real; foreground_frac: mean fraction of pixels > 0.05). The shipped "
                          "weight is the one these distances favour.", ""]
    return lines


def coarse_lines(meta: PriorMeta) -> list[str]:
    """The card's two-scale section: the coarse model and, if run on these weights, the crossover benchmark."""
    c = meta.coarse
    lines = ["## Two scales", "",
             f"The file also holds a whole-image model on a {c.factor(meta)}x coarser grid ({c.image_size} px, step "
             f"{c.step}; LeanUNet {c.net['channels']} channels). From sigma {c.from_sigma:g} up, the prior's estimate "
             "takes its block means from that model (`mediff.denoiser.TwoScale`): the crops this prior learnt from "
             "never showed it a whole slice, the coarse model did.", ""]
    res = ROOT / "benchmarks" / "results" / "two_scale.json"
    if res.exists():
        d = json.loads(res.read_text())
        if d["meta"]["step"] == meta.step and d["meta"]["coarse_step"] == c.step:
            lines += md_table(d["rows"], list(d["rows"][0]), lambda k, v: f"{v:g}" if k == "sigma" else f"{v:.2f}")
            lines += ["", f"`python benchmarks/two_scale.py --model {d['meta']['model']}` (denoising PSNR, u units, "
                          f"data range 1, {d['meta']['n_slices']} slices of the held-out patients).", ""]
    rec = ROOT / "benchmarks" / "results" / "two_scale_recon.json"
    if rec.exists():
        d = json.loads(rec.read_text())
        if d["meta"]["step"] == meta.step and d["meta"]["coarse_step"] == c.step:
            lines += ["Reconstruction (DDS, 50 NFE, PSNR in the HU window [-1000, 1000] on the 512-px grid; `off`: the "
                      "fine network alone):", "",
                      *md_table(d["rows"], ["task", "from_sigma", "PSNR", "s_per_slice"],
                                lambda k, v: f"{v:.1f}" if k == "s_per_slice" else _cell(k, v))]
            lines += ["", f"`python benchmarks/two_scale.py --model {d['meta']['model']} --recon-slices "
                          f"{d['meta']['n_slices']}` (the first {d['meta']['n_slices']} held-out slices).", ""]
    return lines


def main(run: Path, name: str, guide: str | None, guide_weight: float, coarse: str | None = None,
         from_sigma: float = 0.2) -> None:
    weights = ROOT / "src" / "mediff" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    fresh = not (run / "checkpoint.safetensors").exists()  # a fresh clone keeps only the compact state
    if fresh:
        prior_from_compact(run)
    if guide is None:
        shutil.copyfile(run / "prior.safetensors", weights / f"{name}.safetensors")
    else:  # reads both files before it replaces the shipped one, so --guide NAME may be the shipped prior
        attach_guide(run / "prior.safetensors", guide, guide_weight, weights / f"{name}.safetensors")
        (weights / f"{name}.json").unlink(missing_ok=True)  # the sidecar is for runs, not for the package
    if coarse is not None:  # reads the coarse model (e.g. the built-in ct) before writing the shipped file
        attach_coarse(weights / f"{name}.safetensors", coarse, from_sigma, weights / f"{name}.safetensors")
        (weights / f"{name}.json").unlink(missing_ok=True)
    compact = run / COMPACT_NAME if fresh else compact_checkpoint(run)
    meta = read_prior_file(weights / f"{name}.safetensors")[1]
    val = list(csv.DictReader(open(run / "val.csv"))) if (run / "val.csv").exists() else []
    last = [r for r in val if r["step"] == val[-1]["step"]] if val else []
    card = CARDS[name]
    kind = run.name.removeprefix("ct-")
    patch = "" if not meta.train.get("patch_sizes") else \
        f" --patch-sizes {','.join(map(str, meta.train['patch_sizes']))} --full-prob {meta.train['full_prob']}"
    size_mb = (weights / f"{name}.safetensors").stat().st_size / 1e6
    steps, decay = meta.train["steps"], meta.train.get("decay_steps", 0)
    env = f"STEPS={steps} DECAY={decay} " if decay and name == "brain-t1" else f"DECAY={decay} " if decay else ""
    command = card["command"].format(kind=kind, patch=patch, steps=steps, decay=decay, env=env, run=run.name)
    base = run.name.split("-decay")[0]
    schedule = (f"- Learning rate: constant to step {steps - decay} (run `training/{base}`), then falling linearly "
                f"to 0 over the last {decay} steps on a copy of that run's state (`training/{run.name}`)."
                if decay else "- Learning rate: warm-up, then constant.")
    kept = ROOT / "training" / base / compact.name
    kept_step = json.loads(kept.with_suffix(".json").read_text())["step"] if kept.exists() else "?"
    resumable = (f"- Resumable state: `training/{base}/{compact.name}` (compact: 16-bit weights and Adam second "
                 f"moments), the constant-rate run at step {kept_step}; `" + command.split("  #")[0].removeprefix(env)
                 + "` continues it; `STEPS=S DECAY=N` before it finishes it with a decay on a copy again."
                 if decay else
                 f"- Resumable state: `training/{run.name}/{compact.name}` (compact: 16-bit weights and Adam second "
                 "moments); the script above continues from it.")
    net = meta.net
    lines = [f"# Model card: `{name}`", "",
             f"A 2D diffusion prior (EDM preconditioning, LeanUNet {net['channels']} channels"
             + (", pixel coordinates as 2 extra inputs" if net.get("pos_channels") else "")
             + f", {size_mb:.1f} MB fp16 EMA weights" + (", guide model included" if meta.guide is not None else "")
             + (", coarse whole-image model included" if meta.coarse is not None else "")
             + f") of {meta.image_size}-px {card['what']}, {units(meta)}.", "",
             "## Data and license", f"- Data: {card['data']}.", f"- License: {card['license']}.",
             f"- Training slices: {meta.data.n_train_slices}; validation slices: {meta.data.n_val_slices} "
             f"from {len(meta.data.val_subjects)} held-out subjects (split by subject): "
             f"{', '.join(meta.data.val_subjects)}.",
             f"- Data fingerprint: `{meta.data.fingerprint}`.",
             *([f"- Pixel size on the prior's grid: {spacing_text(meta.data.pixel_spacing_mm)} mm (`mediff "
                f"reconstruct` warns when a scan's working pixel lies outside it by more than {SCALE_TOLERANCE:g}x)."]
               if meta.data.pixel_spacing_mm else []),
             "- Covariates: " + (", ".join(meta.covariates["columns"]) + " (classifier-free guidance, 10 % dropout)"
                                 if meta.covariates else "none"), "",
             "## Training", f"- Command: `{command}`", schedule,
             f"- Steps: {meta.step}; images seen: {meta.images_seen}; wall time: {meta.wall_seconds / 3600:.2f} h "
             f"(2-core CPU, torch {meta.torch_version}).",
             f"- sigma_data {meta.sigma_data:.4f}, data mean {meta.data_mean:.4f}, sigma range "
             f"[{meta.sigma_min:.4g}, {meta.sigma_max:.4g}].",
             resumable, ""]
    if last:
        lines += ["## Validation denoising (EMA, held-out subjects, normalised units)", "",
                  "| sigma | MSE | PSNR (dB) |", "|---|---|---|"]
        lines += [f"| {r['sigma']} | {float(r['mse']):.5f} | {float(r['psnr']):.2f} |" for r in last]
        lines += ["", f"Logged at step {last[0]['step']} by the training loop (`{run.name}/val.csv`, plot `val.png`).", ""]
    lines += benchmark_lines(name, run, meta)
    if meta.guide is not None:
        lines += guide_lines(meta)
    if meta.coarse is not None:
        lines += coarse_lines(meta)
    lines += audit_lines(name, meta)
    lines += ["## Intended use and limits", card["use"]]
    (weights / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"shipped {name}: step {meta.step}, {size_mb:.1f} MB; resumable state {compact} "
          f"({compact.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("name", choices=sorted(CARDS))
    ap.add_argument("--guide", help="guide model for autoguidance: a prior file, checkpoint or built-in name")
    ap.add_argument("--guide-weight", type=float, default=2.0)
    ap.add_argument("--coarse", help="a whole-image prior on a coarser grid (file or built-in name, e.g. ct) to ship "
                                     "inside it (mediff.prior.attach_coarse)")
    ap.add_argument("--coarse-from-sigma", type=float, default=0.2,
                    help="the noise level from which the coarse model is used (benchmarks/two_scale.py)")
    args = ap.parse_args()
    main(args.run, args.name, args.guide, args.guide_weight, args.coarse, args.coarse_from_sigma)
