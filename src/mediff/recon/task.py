"""The inverse problem every solver and baseline works on, one class per modality.

A ``Task`` lives on the working grid in the prior's normalised units: input units (MR: the file's
intensities; CT: HU) are ``x * scale + offset``. The modality subclasses (``recon.mri.MRITask``,
``recon.ct.CTTask``) say what the solvers see (``solver_operator``), which image is scored and
written (``image``), their classical baselines, how they are scored and how the report shows them;
the pipeline (``recon.run``, ``recon.job``, ``recon.outputs``) never branches on the modality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import Tensor

from mediff import metrics
from mediff.errors import MediffError
from mediff.physics.operators import LinearOperator
from mediff.recon.grid import GridMap, InputGrid
from mediff.report import Panel


def _same_grid(a: np.ndarray) -> np.ndarray:
    return a


@dataclass(kw_only=True)
class Task:
    """op: image (1, 1, H, W) -> data y; y: data in normalised units; noise_sigma: std per entry of y
    (normalised); scale: input units per normalised unit; reference: (1, 1, H, W) real, normalised, or
    None; to_input: working-grid image -> the input's grid; affine: the input slice's 4x4 affine;
    grid: where that slice sits on the input's voxel grid (None: the input is 2D, its grid is the slice's);
    input_reference: the reference on the input's own grid in input units (H_in, W_in), when the
    working grid differs from it (resampled or padded): ``score`` then scores there, since a user
    reads a reconstruction of their scan at its resolution, and the working-grid figures come second."""

    op: LinearOperator
    y: Tensor
    noise_sigma: float
    scale: float
    reference: Tensor | None = None
    to_input: GridMap = _same_grid
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    grid: InputGrid | None = None
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    offset: float = 0.0  # input units at normalised 0
    input_reference: np.ndarray | None = None

    kind: ClassVar[str]  # "mri" | "ct": the key of policy.BASELINE_LAMBDA / BASELINE_ITERS
    baselines: ClassVar[tuple[str, ...]]
    companion: ClassVar[str]  # the classical reconstruction written next to every result
    title: ClassVar[str]
    dicom_modality: ClassVar[str]

    # ---- what the solvers see
    def data(self) -> tuple[LinearOperator, Tensor]:
        """(op, y) of the likelihood, whose noise std is ``noise_sigma`` on every entry."""
        return self.op, self.y

    def solver_operator(self) -> LinearOperator:
        """The operator the diffusion solvers invert: from a real image (B, 1, H, W) to ``data()[1]``."""
        return self.data()[0]

    def normal_diagonal(self) -> Tensor | None:
        """A positive (1, 1, H, W) approximation of the diagonal of the solver operator's normal
        A^H A, which preconditions the solvers' CG steps (``solvers.Problem.diagonal``), or None
        where that diagonal is flat and plain CG is as good."""
        return None

    @property
    def shape(self) -> tuple[int, int]:
        """Working-grid image shape (H, W)."""
        raise NotImplementedError

    @property
    def summary(self) -> str:
        """The problem in a few words, for progress bars (e.g. "x4.0", "60 views")."""
        raise NotImplementedError

    @property
    def family(self) -> str:
        """Operator family, the key of ``policy.DDS_CG_ITERS``."""
        raise NotImplementedError

    def image(self, x: Tensor) -> Tensor:
        """Solver output (K, 1, H, W) -> the real image that is scored and written."""
        raise NotImplementedError

    def baseline(self, method: str, lam: float | None) -> Tensor:
        """Classical reconstruction ``method`` (one of ``baselines``), (1, 1, H, W) normalised."""
        raise NotImplementedError

    def check_baseline(self, method: str) -> None:
        """Raise MediffError unless ``method`` is one of this modality's baselines."""
        if method not in self.baselines:
            other = "MRI" if self.kind == "ct" else "CT"
            raise MediffError(f"{method} is a{'n' if other == 'MRI' else ''} {other}-only baseline; for "
                              f"{self.kind.upper()} use {', '.join(self.baselines)} or a diffusion solver")

    # ---- scoring
    def score(self, image: Tensor) -> dict[str, float]:
        """PSNR / SSIM / NMSE of a working-grid image (1, 1, H, W) vs the reference ({} without one): on
        the input grid when ``input_reference`` is set (the image mapped there by ``to_input``), with the
        working grid's figures beside them as ``PSNR_working_grid`` etc."""
        if self.reference is None:
            return {}
        work = self._figures(image.float(), self.reference.float())
        if self.input_reference is None:
            return work

        def normalised(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray((a - self.offset) / self.scale, dtype=np.float32))[None, None]

        native = self._figures(normalised(self.input_units(image)), normalised(self.input_reference))
        return {**native, **{f"{k}_working_grid": v for k, v in work.items()}}

    def _figures(self, image: Tensor, reference: Tensor) -> dict[str, float]:
        img, ref, data_range = self.scored(image, reference)
        return {"PSNR": float(metrics.psnr(img, ref, data_range)[0]),
                "SSIM": float(metrics.ssim(img, ref, data_range)[0]), "NMSE": float(metrics.nmse(img, ref)[0])}

    def scored(self, image: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, float]:
        """(image, reference, data_range) as the metrics see them."""
        raise NotImplementedError

    @property
    def units(self) -> str:
        """How the figures of ``score`` are computed, for metrics.json."""
        h, w = self.shape
        if self.input_reference is None:
            return f"{self.metric_units}; on the {h}x{w} grid of the input"
        hi, wi = self.input_reference.shape
        return (f"{self.metric_units}; on the input's {hi}x{wi} grid (the reconstruction mapped back from the "
                f"{h}x{w} working grid); *_working_grid: the same on the working grid (secondary)")

    @property
    def metric_units(self) -> str:
        """How the metrics see the images (units, data range)."""
        raise NotImplementedError

    # ---- output
    def input_units(self, x: Tensor, shift: bool = True) -> np.ndarray:
        """A working-grid image (1, 1, H, W) in normalised units -> input units on the input grid;
        ``shift=False`` for differences such as a posterior std (scaled, no offset)."""
        a = x[0, 0].detach().float().cpu().numpy() * self.scale + (self.offset if shift else 0.0)
        return self.to_input(a)

    def on_input_grid(self, x: Tensor, shift: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(array, 4x4 affine) of a working-grid image (1, 1, H, W) in input units on the input's own
        voxel grid: the input's voxel order and affine, length 1 on the slice axis of a volume."""
        a = self.input_units(x, shift)
        return (a, self.affine) if self.grid is None else (self.grid.place(a), self.grid.affine)

    def shown(self, x: Tensor) -> np.ndarray:
        """A working-grid image (1, 1, H, W) in the report's display units (H, W)."""
        return x[0, 0].detach().float().cpu().numpy()

    def display_range(self, fallback: Tensor) -> tuple[float, float]:
        """(vmin, vmax) of the report's image panels; ``fallback`` stands in for a missing reference."""
        raise NotImplementedError

    error_fraction: ClassVar[float]  # |error| panels saturate at this fraction of the display range

    def data_panels(self) -> list[Panel]:
        """Report panels of the measurement (MRI: the mask; CT: the sinogram)."""
        return []

    def shown_std(self, std: Tensor) -> np.ndarray:
        """A posterior std (1, 1, H, W) in the report's display units."""
        return self.shown(std)


@dataclass(frozen=True)
class SliceSource:
    """The slices of one input (1 for a 2D image or a one-slice k-space file): ``n`` of them, slice k
    built into its ``Task`` by ``build(k)`` (0 <= k < n) only when it is reconstructed, so a volume's
    preparation (reading, ESPIRiT, phase) is paid per slice as the job advances. ``what``: the slices
    in words, for messages ("axial slices", "k-space slices")."""

    n: int
    build: Callable[[int], Task]
    what: str = "slices"

    def middle(self, slice_index: int | None) -> int:
        """``slice_index``, or the middle slice when None, checked against ``n``."""
        k = self.n // 2 if slice_index is None else slice_index
        if not 0 <= k < self.n:
            raise MediffError(f"--slice {k} out of range: the input has {self.n} {self.what}")
        return k
