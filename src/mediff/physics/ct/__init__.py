"""CT physics: parallel- and fan-beam Joseph projectors with exact adjoints (``projector``), FBP
(``fbp``), and HU / attenuation / low-dose simulation (``attenuation``)."""

from mediff.physics.ct.attenuation import MU_WATER_PER_MM, check_hu, hu_to_mu, mu_to_hu, simulate_sinogram
from mediff.physics.ct.fbp import FILTERS, fbp, filter_sinogram
from mediff.physics.ct.projector import FanBeamCT, ParallelBeamCT, check_sinogram, limited_angle_angles, sparse_view_angles

__all__ = [
    "FILTERS",
    "MU_WATER_PER_MM",
    "FanBeamCT",
    "ParallelBeamCT",
    "check_hu",
    "check_sinogram",
    "fbp",
    "filter_sinogram",
    "hu_to_mu",
    "limited_angle_angles",
    "mu_to_hu",
    "simulate_sinogram",
    "sparse_view_angles",
]
