"""MRI physics: the centred FFT (``fourier``), the single-/multi-coil SENSE operators and k-space
simulation (``sense``), coil maps (``coils``) and the estimates taken from the data (``calibration``:
phase, noise level, SENSE residual)."""

from mediff.physics.mri.calibration import estimate_noise_sigma, lowres_phase, sense_residual_sigma, unit_phase
from mediff.physics.mri.coils import estimate_coil_maps, hann_calib_window, simulate_coil_maps
from mediff.physics.mri.fourier import fft2c, ifft2c, rss
from mediff.physics.mri.sense import MagnitudeMRI, MultiCoilMRI, SingleCoilMRI, check_kspace, simulate_kspace

__all__ = [
    "MagnitudeMRI",
    "MultiCoilMRI",
    "SingleCoilMRI",
    "check_kspace",
    "estimate_coil_maps",
    "estimate_noise_sigma",
    "fft2c",
    "hann_calib_window",
    "ifft2c",
    "lowres_phase",
    "rss",
    "sense_residual_sigma",
    "simulate_coil_maps",
    "simulate_kspace",
    "unit_phase",
]
