"""Ship a trained prior: copy a run's EMA weights into the package and write its model card.

    python training/ship_prior.py training/brain-t1 brain-t1

Every number in the card comes from the run's metadata, its validation log (val.csv) and
benchmarks/results/denoise.json (python benchmarks/denoise.py --model training/brain-t1/prior.safetensors).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LICENSES = {
    "brain-t1": ("IXI dataset (Imperial College London, brain-development.org/ixi-dataset), T1-weighted, "
                 "Hammersmith Hospital Philips 3T, 2 mm isotropic", "CC BY-SA 3.0 (weights are derived from IXI and "
                 "shared under the same license; credit \"IXI dataset, Imperial College London\")"),
}
COMMANDS = {"brain-t1": "training/train_brain_t1.sh  # = mediff train --data ../shared/data/ixi_t1/ixi_t1_axial_128.npz "
                        "--covariates ../shared/data/ixi_t1/participants.csv --out training/brain-t1 --size 128 "
                        "--batch 16 --steps 100000 --val-subjects 20 [--resume]"}


def main(run: Path, name: str) -> None:
    weights = ROOT / "src" / "mediff" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "prior.safetensors", weights / f"{name}.safetensors")
    meta = json.loads((run / "prior.json").read_text())
    val = list(csv.DictReader(open(run / "val.csv"))) if (run / "val.csv").exists() else []
    last = [r for r in val if r["step"] == val[-1]["step"]] if val else []
    data, lic = LICENSES.get(name, ("see training metadata", "see training data license"))
    size_mb = (weights / f"{name}.safetensors").stat().st_size / 1e6
    lines = [f"# Model card: `{name}`", "",
             f"A 2D diffusion prior (EDM preconditioning, LeanUNet {meta['net']['channels']} channels, "
             f"{size_mb:.1f} MB fp16 EMA weights) of {meta['image_size']}-px axial slices, intensities normalised per "
             "slice (0 -> 0, 99.5th percentile -> 1).", "",
             "## Data and license", f"- Data: {data}.", f"- License: {lic}.",
             f"- Training slices: {meta['data']['n_train_slices']}; validation slices: {meta['data']['n_val_slices']} "
             f"from {len(meta['data']['val_subjects'])} held-out subjects (split by subject): "
             f"{', '.join(meta['data']['val_subjects'])}.",
             f"- Data fingerprint: `{meta['data']['fingerprint']}`.",
             "- Covariates: " + (", ".join(meta["covariates"]["columns"]) + " (classifier-free guidance, 10 % dropout)"
                                 if meta.get("covariates") else "none"), "",
             "## Training", f"- Command: `{COMMANDS.get(name, 'see metadata')}`",
             f"- Steps: {meta['step']}; images seen: {meta['images_seen']}; wall time: {meta['wall_seconds'] / 3600:.2f} h "
             f"(2-core CPU, torch {meta['torch']}).",
             f"- sigma_data {meta['sigma_data']:.4f}, data mean {meta['data_mean']:.4f}, sigma range "
             f"[{meta['sigma_min']:.4g}, {meta['sigma_max']:.4g}].", ""]
    if last:
        lines += ["## Validation denoising (EMA, held-out subjects, normalised units)", "",
                  "| sigma | MSE | PSNR (dB) |", "|---|---|---|"]
        lines += [f"| {r['sigma']} | {float(r['mse']):.5f} | {float(r['psnr']):.2f} |" for r in last]
        lines += ["", f"Logged at step {last[0]['step']} by the training loop (`{run.name}/val.csv`, plot `val.png`).", ""]
    den = ROOT / "benchmarks" / "results" / "denoise.json"
    if den.exists():
        d = json.loads(den.read_text())
        if d["meta"].get("step") == meta["step"]:
            lines += ["## Denoising vs classical denoisers (oracle-tuned), held-out subjects", "",
                      "| sigma | noisy | prior | Gaussian (oracle) | TV (oracle) |", "|---|---|---|---|---|"]
            lines += [f"| {r['sigma']} | {r['noisy_PSNR']:.2f} | {r['prior_PSNR']:.2f} | {r['gaussian_oracle_PSNR']:.2f} | "
                      f"{r['tv_oracle_PSNR']:.2f} |" for r in d["rows"]]
            lines += ["", f"`python benchmarks/denoise.py --model training/{run.name}/prior.safetensors --n "
                          f"{d['meta']['n_slices']}` (PSNR in dB, data range 1).", ""]
    lines += ["## Intended use and limits",
              "Research use: synthesis of brain T1 slices and as the prior of MRI reconstruction. Trained on one site "
              "(Philips 3T, healthy adults); not validated for diagnosis, pathology, other contrasts or paediatric data."]
    (weights / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"shipped {name}: step {meta['step']}, {size_mb:.1f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
