"""What a user asks of a reconstruction: the modality options and the request of one job. Every
default lives here once; the CLI and the Python API read it from these classes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from mediff.errors import MediffError


@dataclass(frozen=True)
class MRIOptions:
    """How k-space is simulated or retrospectively undersampled. ``accel``: acceleration; ``mask``:
    random1d | equispaced1d | poisson2d | radial; ``center_fraction``: fully-sampled centre fraction;
    ``coils``: simulated coils for image input (1 = single-coil); ``noise``: simulated complex noise std
    as a fraction of the image's 99.5th percentile."""

    accel: float = 4.0
    mask: str = "random1d"
    center_fraction: float = 0.08
    coils: int = 1
    noise: float = 0.0

    def changed(self) -> tuple[str, ...]:
        """CLI names (``--accel`` ...) of the options that differ from their defaults."""
        default = MRIOptions()
        return tuple("--" + f.name.replace("_", "-") for f in fields(self)
                     if getattr(self, f.name) != getattr(default, f.name))


@dataclass(frozen=True)
class CTOptions:
    """How a CT sinogram is simulated: ``views`` over 180 degrees for parallel beam, 360 for fan beam
    (None: ``DEFAULT_VIEWS``), or over [0, ``limited_angle``) degrees; ``dose``: I0 photons per
    detector bin (Poisson noise; for a sinogram file, its I0). ``geometry``: "parallel" or "fan" (a
    flat detector; ``source_distance`` source to isocentre and ``detector_distance`` isocentre to
    detector, mm; None: ``FAN_DISTANCES``, a typical clinical scanner's)."""

    views: int | None = None
    limited_angle: float | None = None
    dose: float | None = None
    geometry: str | None = None
    source_distance: float | None = None
    detector_distance: float | None = None

    DEFAULT_VIEWS = 60
    FAN_DISTANCES = (595.0, 490.6)  # mm: source-isocentre 595, source-detector 1085.6

    @property
    def given(self) -> bool:
        """Whether any CT option was set (which selects CT mode)."""
        return any(v is not None for v in (self.views, self.limited_angle, self.dose, self.geometry,
                                           self.source_distance, self.detector_distance))

    @property
    def fan(self) -> bool:
        return self.geometry == "fan"

    @property
    def distances(self) -> tuple[float, float]:
        """(source to isocentre, isocentre to detector) in mm of the fan beam."""
        src, det = self.FAN_DISTANCES
        return (src if self.source_distance is None else float(self.source_distance),
                det if self.detector_distance is None else float(self.detector_distance))

    @property
    def n_views(self) -> int:
        return self.DEFAULT_VIEWS if self.views is None else self.views


@dataclass(frozen=True)
class ReconRequest:
    """One ``mediff reconstruct`` job. ``model``: a built-in prior name or a checkpoint path (unused by
    baselines); ``samples``: posterior samples (> 1 adds a std map and coverage); ``compare``:
    baselines beside the solver (those of the other modality are skipped); ``lam``: baseline weight
    (None: ``policy.BASELINE_LAMBDA``); ``cg_iters``: CG steps per data-consistency update (None:
    ``policy.cg_iters``); ``dicom``: also write recon_dicom/; ``command``: recorded in metrics.json;
    ``slices``: the half-open range (start, stop) of slices to reconstruct, None for an open end
    (None: all slices; ``volume.chosen_slices``)."""

    input: Path
    model: str | None = "brain-t1"
    solver: str = "dds"
    steps: int = 50
    seed: int = 0
    samples: int = 1
    slices: tuple[int | None, int | None] | None = None
    compare: tuple[str, ...] = ("zero-filled",)
    lam: float | None = None
    cg_iters: int | None = None
    dicom: bool = False
    command: str = ""
    mri: MRIOptions = field(default_factory=MRIOptions)
    ct: CTOptions = field(default_factory=CTOptions)


_SLICES = re.compile(r"\s*(\d*)\s*:\s*(\d*)\s*")


def parse_slices(text: str) -> tuple[int | None, int | None]:
    """``--slices a:b`` (half-open, either end may be left out) -> (a, b) with None for an open end."""
    m = _SLICES.fullmatch(text)
    if m is None:
        raise MediffError(f"--slices takes a half-open range START:STOP of slice indices (e.g. 10:20, 40:, :8), "
                          f"got {text!r}")
    return tuple(int(v) if v else None for v in m.groups())  # type: ignore[return-value]
