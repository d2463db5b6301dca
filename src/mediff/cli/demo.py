"""The ``demo`` command: reconstruct a real brain MR slice from 4x undersampled k-space with the shipped prior.

The image is the MNI152 (ICBM 2009a) T1 template that nilearn ships inside its wheel; it is read
straight from the installed package (nilearn itself is not imported), so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

import typer

from mediff.cli.app import app, console
from mediff.cli.output import check_output, output_dir
from mediff.cli.reconstruct import print_metrics
from mediff.errors import MediffError

MNI_FILE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
DEMO_Z_MM = 15.0  # axial level through the lateral ventricles, inside the training slices' range
DEMO_SPACING_MM = 2.0  # the brain-t1 prior was trained on 2 mm slices


def mni_template_path() -> Path:
    """Path of the MNI152 T1 template inside the installed nilearn package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MediffError("the demo needs nilearn's MNI152 template: pip install 'mediff[demo]'")
    path = Path(list(spec.submodule_search_locations)[0]) / MNI_FILE
    if not path.is_file():
        raise MediffError(f"MNI152 template not found in the nilearn package ({path})")
    return path


def demo_slice(out: Path) -> Path:
    """Write the demo input: the axial MNI slice at z = 15 mm, 2 mm pixels, P-S-R order, as NIfTI."""
    import nibabel as nib
    import nibabel.orientations as nio
    import torch
    import torch.nn.functional as F

    from mediff import io

    img = nib.load(str(mni_template_path()))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    transform = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(("P", "S", "R")))
    vol = nio.apply_orientation(arr, transform)
    affine = img.affine @ nio.inv_ornt_aff(transform, arr.shape)
    k = int(round(np.linalg.solve(affine, [0, 0, DEMO_Z_MM, 1])[1]))
    zoom = np.sqrt((affine[:3, :3] ** 2).sum(0))
    step = int(round(DEMO_SPACING_MM / zoom[1]))
    slab = torch.from_numpy(np.ascontiguousarray(vol[:, k: k + step, :].mean(axis=1)))[None, None]
    factor = (DEMO_SPACING_MM / zoom[0], DEMO_SPACING_MM / zoom[2])
    small = F.avg_pool2d(slab, kernel_size=(round(factor[0]), round(factor[1])))[0, 0].numpy()
    slice_affine = affine @ np.diag([factor[0], 1.0, factor[1], 1.0])
    slice_affine = slice_affine @ np.array([[1, 0, 0, 0], [0, 0, 1, k], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    return io.write_nifti(out, small, slice_affine, overwrite=True)


@app.command()
def demo(
    out: Path = typer.Option(Path("mediff-demo"), help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Reconstruct a real brain MR slice (MNI152 T1, shipped in nilearn) from 4x undersampled k-space."""
    run_demo(out, overwrite)


def run_demo(out: Path = Path("mediff-demo"), overwrite: bool = False, solver: str = "mcg", steps: int = 50) -> dict:
    """Reconstruct the MNI slice at x4 (1D random mask, 8 % centre) with MCG beside zero-filled and TV.

    MCG, not the CLI's fast default DDS: on single-coil data it is the most accurate solver at the same
    50 NFE (benchmarks/mri.py), at a few times DDS's time, well inside the demo's budget."""
    import tempfile

    from mediff.recon import ReconRequest, reconstruct

    check_output(out, overwrite)
    console.print(f"[bold]mediff demo[/]: MNI152 T1 slice (z = {DEMO_Z_MM:g} mm, {DEMO_SPACING_MM:g} mm pixels), "
                  f"k-space simulated and undersampled x4, reconstructed with {solver} ({steps} steps) and brain-t1")
    with tempfile.TemporaryDirectory() as tmp, output_dir(out, overwrite) as dest:
        src = demo_slice(Path(tmp) / "mni152_t1_slice.nii.gz")
        req = ReconRequest(input=src, model="brain-t1", solver=solver, steps=steps, seed=0,
                           compare=("zero-filled", "tv"), command=f"mediff demo --out {out}")
        rec = reconstruct(req, dest)
        (dest / "input.nii.gz").write_bytes(src.read_bytes())
    print_metrics(rec["metrics"])
    console.print(f"[green]report:[/] {out / 'report.html'}")
    return rec
