"""MRI physics: FFT conventions, SENSE operators, coil maps, k-space simulation, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mediff.errors import MediffError
from mediff.physics.masks import equispaced_1d, make_mask, poisson_disc_2d, random_1d
from mediff.physics.mri import (
    MagnitudeMRI,
    MultiCoilMRI,
    SingleCoilMRI,
    check_kspace,
    estimate_coil_maps,
    estimate_noise_sigma,
    fft2c,
    hann_calib_window,
    ifft2c,
    lowres_phase,
    rss,
    sense_residual_sigma,
    simulate_coil_maps,
    simulate_kspace,
)
from mediff.physics.operators import CenterCrop, PhaseModulated, adjoint_check, conjugate_gradient

H, W, C = 32, 40, 4  # non-square on purpose: catches swapped axes


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cplx(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.complex128, generator=_gen(seed))


def _rand_mask(shape: tuple[int, ...], seed: int = 0, columns: bool = False) -> torch.Tensor:
    """Random 0/1 mask; ``columns``: a 1D mask (random columns, the same on every row)."""
    if columns:
        return (torch.rand(*shape[:-2], 1, shape[-1], generator=_gen(seed)) < 0.4).expand(shape).clone()
    return torch.rand(*shape, generator=_gen(seed)) < 0.4


def _phantom(n: int = 128, inside: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth complex ellipse phantom (n, n) with a gentle phase ramp, and its (eroded) support."""
    y = (torch.arange(n, dtype=torch.float64) - n // 2) / (n / 2)
    yy, xx = torch.meshgrid(y, y, indexing="ij")
    r2 = (yy / 0.7) ** 2 + (xx / 0.55) ** 2
    mag = torch.sigmoid((1 - r2) * 20) * (1 + 0.3 * torch.cos(3 * xx))
    return mag * torch.exp(1j * (0.8 * yy - 0.4 * xx)), r2 < inside


# ----------------------------------------------------------------------------- FFT


def test_fft2c_parseval_inverse_and_centring() -> None:
    x = _cplx(2, 3, H, W)
    k = fft2c(x)
    assert torch.allclose(k.norm(), x.norm(), rtol=1e-12)
    assert torch.allclose(ifft2c(k), x, atol=1e-12)
    assert torch.allclose(fft2c(ifft2c(x)), x, atol=1e-12)
    # centred: a delta at the image centre has a flat real spectrum; a constant image is a delta at DC
    d = torch.zeros(1, 1, H, W, dtype=torch.float64)
    d[..., H // 2, W // 2] = 1.0
    assert torch.allclose(fft2c(d), torch.full_like(fft2c(d), 1 / math.sqrt(H * W)), atol=1e-14)
    # odd sizes: ifftshift and fftshift differ, so their order matters
    xo = _cplx(1, 1, 15, 21)
    assert torch.allclose(ifft2c(fft2c(xo)), xo, atol=1e-12)
    do = torch.zeros(1, 1, 15, 21, dtype=torch.float64)
    do[..., 7, 10] = 1.0
    assert torch.allclose(fft2c(do), torch.full_like(fft2c(do), 1 / math.sqrt(15 * 21)), atol=1e-14)
    dc = fft2c(torch.ones(1, 1, H, W, dtype=torch.float64))
    assert dc[..., H // 2, W // 2].real.item() == pytest.approx(math.sqrt(H * W))
    assert dc.abs().sum().item() == pytest.approx(math.sqrt(H * W))


# ----------------------------------------------------------------------------- operators


# The normal operators skip the FFT shifts (a circulant commutes with them): odd sizes, where
# fftshift and ifftshift differ, check that the shifted mask is the right one. Column (1D) masks
# take the 1D-FFT path of the normal operator.
@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("hw", [(H, W), (15, 21)])
@pytest.mark.parametrize("batched_mask", [False, True])
def test_single_coil_adjoint_and_normal(batched_mask: bool, hw: tuple[int, int], columns: bool) -> None:
    mask = _rand_mask((2, 1, *hw) if batched_mask else hw, columns=columns)
    op = SingleCoilMRI(mask)
    x = _cplx(2, 1, *hw)
    assert adjoint_check(op, x, _gen(1)) <= 1e-10
    assert torch.allclose(op.normal(x), op.AH(op.A(x)), atol=1e-12)
    y = op.A(x)
    assert y.shape == (2, 1, *hw)
    assert (y[~mask.expand(2, 1, *hw)] == 0).all()  # unsampled entries exactly zero


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("hw", [(H, W), (15, 21)])
@pytest.mark.parametrize("batched", [False, True])
def test_multi_coil_adjoint_and_normal(batched: bool, hw: tuple[int, int], columns: bool) -> None:
    maps = _cplx(*((2, C, *hw) if batched else (C, *hw)), seed=3)
    op = MultiCoilMRI(_rand_mask(hw, columns=columns).double(), maps)  # float 0/1 mask works too
    x = _cplx(2, 1, *hw)
    assert adjoint_check(op, x, _gen(2)) <= 1e-10
    assert torch.allclose(op.normal(x), op.AH(op.A(x)), atol=1e-12)
    assert op.A(x).shape == (2, C, *hw) and op.AH(op.A(x)).shape == (2, 1, *hw)


def test_wrapped_operators_keep_the_fast_normal_exact() -> None:
    """PhaseModulated and Composed (CenterCrop) forward ``normal`` to the wrapped operator's."""
    phase = torch.exp(1j * torch.rand(1, 1, 15, 21, generator=_gen(4), dtype=torch.float64))
    op = PhaseModulated(MultiCoilMRI(_rand_mask((15, 21)), _cplx(C, 15, 21, seed=5)), phase)
    x = torch.randn(2, 1, 15, 21, dtype=torch.float64, generator=_gen(6))
    assert adjoint_check(op, x, _gen(7)) <= 1e-10
    assert torch.allclose(op.normal(x), op.AH(op.A(x)), atol=1e-12)
    crop = SingleCoilMRI(_rand_mask((15, 21))) @ CenterCrop((20, 24), (15, 21))
    xc = _cplx(2, 1, 20, 24, seed=8)
    assert adjoint_check(crop, xc, _gen(9)) <= 1e-10
    assert torch.allclose(crop.normal(xc), crop.AH(crop.A(xc)), atol=1e-12)


@pytest.mark.parametrize("support", [False, True])
@pytest.mark.parametrize("columns", [True, False])
def test_magnitude_mri_row_normal_is_exact(columns: bool, support: bool) -> None:
    """MagnitudeMRI's per-row normal matrices (1D mask, several coils) equal A^H A of the phase-modulated
    SENSE operator in float64 for a batch of real images, also when the maps vanish outside an irregular
    support (then only the support's box is stored); a 2D mask keeps the FFT normal, same values."""
    hw = (15, 21)
    phase = torch.exp(1j * torch.rand(1, 1, *hw, generator=_gen(4), dtype=torch.float64))
    maps = _cplx(C, *hw, seed=5)
    if support:  # an ellipse in rows 2..12 and columns 4..16, and a hole inside it
        yy, xx = torch.meshgrid(torch.arange(15.0), torch.arange(21.0), indexing="ij")
        inside = ((yy - 7) / 5.5) ** 2 + ((xx - 10) / 6.5) ** 2 <= 1
        inside[7, 10] = False
        maps = maps * inside
    op = MagnitudeMRI(MultiCoilMRI(_rand_mask(hw, columns=columns), maps), phase)
    assert (op._gram is not None) == columns  # the matrices exist exactly when rows decouple
    if columns:
        assert op._gram.value.shape == ((11, 13, 13) if support else (15, 21, 21))
    x = torch.randn(3, 1, *hw, dtype=torch.float64, generator=_gen(6))
    assert adjoint_check(op, x, _gen(7)) <= 1e-10
    assert torch.allclose(op.normal(x), op.AH(op.A(x)), atol=1e-12)
    assert torch.allclose(op.normal(x[1:2]), op.AH(op.A(x[1:2])), atol=1e-12)
    if columns:  # the matrices follow the image's dtype
        assert op.normal(x.float()).dtype == torch.float32
    assert MagnitudeMRI(SingleCoilMRI(_rand_mask(hw, columns=columns)), phase)._gram is None


def test_multi_coil_full_mask_is_identity() -> None:
    maps = simulate_coil_maps((H, W), 6, seed=0, dtype=torch.complex128)
    assert torch.allclose((maps.abs() ** 2).sum(0), torch.ones(H, W, dtype=torch.float64), atol=1e-12)
    op = MultiCoilMRI(torch.ones(H, W, dtype=torch.bool), maps)
    x = _cplx(2, 1, H, W)
    assert (op.normal(x) - x).abs().max() <= 1e-10
    assert (op.AH(op.A(x)) - x).abs().max() <= 1e-10


def test_dtype_device_following_and_real_promotion() -> None:
    maps = simulate_coil_maps((H, W), C, dtype=torch.complex128)
    op = MultiCoilMRI(_rand_mask((H, W)), maps)
    x32 = torch.randn(1, 1, H, W, generator=_gen())
    assert op.A(x32).dtype == torch.complex64
    assert op.normal(x32.to(torch.complex64)).dtype == torch.complex64
    assert op.A(x32.double()).dtype == torch.complex128
    assert torch.allclose(op.A(x32.double()), op.A(x32.double().to(torch.complex128)))


def test_operator_is_immutable_and_copies_inputs() -> None:
    mask = _rand_mask((H, W))
    maps = _cplx(C, H, W)
    op = MultiCoilMRI(mask, maps)
    x = _cplx(1, 1, H, W)
    y0 = op.A(x)
    mask[:] = True
    maps.zero_()
    assert torch.equal(op.A(x), y0)
    op.mask.zero_()  # the property hands out a copy
    assert torch.equal(op.A(x), y0)
    with pytest.raises(AttributeError):
        op.coil_maps = maps  # type: ignore[misc]


def test_operator_input_errors() -> None:
    with pytest.raises(MediffError):
        SingleCoilMRI(torch.full((H, W), 0.5))  # not 0/1
    with pytest.raises(MediffError):
        SingleCoilMRI(torch.ones(2, 2, H, W))  # channel dim must be 1
    with pytest.raises(MediffError):
        MultiCoilMRI(torch.ones(H, W), _cplx(C, H, W + 1))
    op = MultiCoilMRI(torch.ones(H, W), _cplx(C, H, W))
    with pytest.raises(MediffError):
        op.A(_cplx(1, 1, H, W + 2))
    with pytest.raises(MediffError):
        op.AH(_cplx(1, C + 1, H, W))


def test_cg_inverts_sense_on_sampled_problem() -> None:
    # uniform 2x SENSE with 8 coils is well posed (eigenvalues of A^H A >= ~0.15): CG on the normal
    # equations recovers x. (Random 1D masks leave runs of missing columns that smooth maps cannot
    # resolve, so they are not used here.)
    maps = simulate_coil_maps((H, W), 8, seed=1, dtype=torch.complex128)
    op = MultiCoilMRI(equispaced_1d((H, W), 2, 0.0, 0), maps)
    x = _cplx(1, 1, H, W)
    rec = conjugate_gradient(op.normal, op.AH(op.A(x)), torch.zeros_like(x), iters=200, tol=1e-12)
    assert (rec - x).norm() / x.norm() < 1e-4


# ----------------------------------------------------------------------------- coil maps


def test_simulated_coil_maps() -> None:
    maps = simulate_coil_maps((64, 48), 8, seed=2, dtype=torch.complex128)
    assert maps.shape == (8, 64, 48) and maps.dtype == torch.complex128
    assert torch.allclose((maps.abs() ** 2).sum(0), torch.ones(64, 48, dtype=torch.float64), atol=1e-12)
    assert torch.equal(maps, simulate_coil_maps((64, 48), 8, seed=2, dtype=torch.complex128))
    assert not torch.equal(maps, simulate_coil_maps((64, 48), 8, seed=3, dtype=torch.complex128))
    assert simulate_coil_maps((16, 16), 4).dtype == torch.complex64
    # smooth: neighbouring pixels differ little (pixel-to-pixel change << 1)
    assert (maps[:, 1:] - maps[:, :-1]).abs().max() < 0.1 and (maps[:, :, 1:] - maps[:, :, :-1]).abs().max() < 0.1
    # coils differ: each has its own bright region
    peaks = {int(m.abs().argmax()) for m in maps}
    assert len(peaks) == 8


@pytest.mark.parametrize("method", ["espirit", "lowres"])
def test_estimate_coil_maps_reproduces_coil_images(method: str) -> None:
    obj, support = _phantom(128)
    true = simulate_coil_maps((128, 128), 8, seed=1, dtype=torch.complex128)
    coil = true * obj
    ksp = fft2c(coil)
    # only the calibration centre is used: undersampling outside it must not matter
    ksp = ksp * poisson_disc_2d((128, 128), 4, 24, 0).tensor()
    est = estimate_coil_maps(ksp, calib_size=24, method=method)
    assert est.shape == (8, 128, 128) and est.dtype == torch.complex128
    energy = (est.abs() ** 2).sum(0)
    inside = energy > 0
    assert support.logical_and(~inside).sum() == 0  # the object lies inside the estimated support
    assert torch.allclose(energy[inside], torch.ones_like(energy[inside]), atol=1e-10)
    assert (est[:, 0, 0] == 0).all()  # background corner: zero outside the support
    # agree with the truth up to one phase per pixel: |<S_est, S_true>| ~ 1
    coherence = (est.conj() * true).sum(0).abs()
    assert coherence[support].min() > 0.99
    # and reproduce the fully-sampled coil images through the SENSE model
    combined = (est.conj() * coil).sum(0)
    rel = (est * combined - coil)[:, support].norm() / coil[:, support].norm()
    assert rel < (0.01 if method == "espirit" else 0.03)
    # maps are smooth (phase-aligned, no per-pixel phase jumps) inside the object
    jump = (est[:, 1:, :] - est[:, :-1, :]).abs().sum(0)
    assert jump[support[1:] & support[:-1]].max() < 0.2


def test_espirit_and_lowres_share_the_phase_convention() -> None:
    # both are referenced to the same virtual body coil, so they agree pixelwise including phase:
    # <S_espirit, S_lowres> ~ 1 (real, positive), not merely |<.,.>| ~ 1
    obj, support = _phantom(96)
    ksp = fft2c(simulate_coil_maps((96, 96), 8, seed=4, dtype=torch.complex128) * obj)
    esp = estimate_coil_maps(ksp, 20, method="espirit")
    low = estimate_coil_maps(ksp, 20, method="lowres")
    agree = (esp.conj() * low).sum(0)[support]
    assert (agree - 1).abs().max() < 0.05


def test_estimate_coil_maps_batch_and_errors() -> None:
    obj, _ = _phantom(64)
    ksp = fft2c(simulate_coil_maps((64, 64), 4, dtype=torch.complex128) * obj)
    est = estimate_coil_maps(torch.stack([ksp, 2 * ksp]).to(torch.complex64), 16, method="lowres")
    assert est.shape == (2, 4, 64, 64) and est.dtype == torch.complex64
    assert torch.allclose(est[0], est[1], atol=1e-5)  # scale invariant
    with pytest.raises(MediffError):
        estimate_coil_maps(ksp, 16, method="walsh")
    with pytest.raises(MediffError):
        estimate_coil_maps(ksp, 200)
    with pytest.raises(MediffError):
        estimate_coil_maps(ksp, 6, kernel_size=6)


# ----------------------------------------------------------------------------- simulation


def test_simulate_kspace_noise_statistics() -> None:
    mask = random_1d((64, 64), 4, 0.08, 0).tensor()
    maps = simulate_coil_maps((64, 64), 4, dtype=torch.complex128)
    x = torch.zeros(2, 1, 64, 64, dtype=torch.float64)
    sigma = 0.3
    y = simulate_kspace(x, mask, maps, noise_sigma=sigma, generator=_gen(7))
    assert y.shape == (2, 4, 64, 64) and y.dtype == torch.complex128
    sampled = mask.expand_as(y)
    assert (y[~sampled] == 0).all()
    n = y[sampled]
    count = n.numel()
    # |n|^2 / sigma^2 ~ Exp(1): mean 1, std 1 -> CLT bound 5 / sqrt(N)
    assert abs((n.abs() ** 2).mean().item() / sigma**2 - 1) < 5 / math.sqrt(count)
    # real and imaginary parts each have variance sigma^2 / 2 (var of a chi^2_1 sample mean: 2 / N)
    for part in (n.real, n.imag):
        assert abs((part**2).mean().item() / (sigma**2 / 2) - 1) < 5 * math.sqrt(2 / count)
    assert abs(n.mean().item()) < 5 * sigma / math.sqrt(count)
    # reproducible with the same generator seed; noiseless is exactly A x
    assert torch.equal(y, simulate_kspace(x, mask, maps, noise_sigma=sigma, generator=_gen(7)))
    img = _cplx(2, 1, 64, 64)
    assert torch.equal(simulate_kspace(img, mask, maps), MultiCoilMRI(mask, maps).A(img))
    assert simulate_kspace(img.real, mask).shape == (2, 1, 64, 64)
    with pytest.raises(MediffError):
        simulate_kspace(img, mask, noise_sigma=-1.0)


def test_rss() -> None:
    c = torch.tensor([[3.0 + 0j, 0 + 4j]]).view(1, 2, 1, 1)
    assert rss(c).item() == pytest.approx(5.0)
    assert rss(c).shape == (1, 1, 1, 1)


# ----------------------------------------------------------------------------- phase, validation


def test_lowres_phase_matches_smooth_object_phase() -> None:
    obj, support = _phantom(64)
    interior = _phantom(64, inside=0.6)[1]  # away from the edge, where low-pass blurring mixes phases
    x = obj.view(1, 1, 64, 64)
    mask = random_1d((64, 64), 4, 0.25, 0).tensor()
    true_phase = x / x.abs()
    # single-coil with a bare mask
    ph = lowres_phase(SingleCoilMRI(mask).A(x), mask, calib=16)
    assert ph.shape == (1, 1, 64, 64)
    assert torch.allclose(ph.abs(), torch.ones(1, 1, 64, 64, dtype=torch.float64))
    assert (ph - true_phase)[..., support].abs().max() < 0.05
    # multi-coil through the SENSE operator
    maps = simulate_coil_maps((64, 64), 6, dtype=torch.complex128)
    op = MultiCoilMRI(mask, maps)
    ph_mc = lowres_phase(op.A(x), op, calib=16)
    err = (ph_mc - true_phase).abs()
    # low-pass(S_c x) != S_c low-pass(x): coil phase costs accuracy at the object's edge only
    assert err[..., interior].max() < 0.05 and err[..., support].mean() < 0.03
    # magnitude * phase recovers the object where the phase is right
    assert ((x.abs() * ph_mc - x)[..., interior].abs().max()) < 0.05 * x.abs().max()
    with pytest.raises(MediffError):
        lowres_phase(op.A(x), mask, calib=16)  # multi-coil data without maps


def test_hann_calib_window_square_band_and_full_axis() -> None:
    sq = hann_calib_window((H, W), 8)
    assert sq.shape == (H, W) and sq[H // 2, W // 2] == 1.0
    assert torch.equal(sq, hann_calib_window((H, W), (8, 8)))
    assert (sq > 0).sum() == 64 and sq.min() >= 0
    # a band (rows, cols) that covers every row: flat (= 1) along the rows, Hann across the columns
    band = hann_calib_window((H, W), (H, 8))
    assert (band > 0).sum() == H * 8
    assert torch.equal(band, sq[H // 2].expand(H, W))  # every row equals the Hann profile of the centre row
    assert torch.equal(hann_calib_window((H, W), (H + 5, W)), torch.ones(H, W, dtype=torch.float64))
    with pytest.raises(MediffError):
        hann_calib_window((H, W), (8, 8, 8))


def test_lowres_phase_full_band_resolves_the_sampled_direction() -> None:
    # An object whose phase varies quickly along the rows (the readout, fully sampled by a 1D mask):
    # the whole calibration band (all rows x centre columns) resolves it, a square of the centre
    # columns' width cannot.
    n = 64
    obj, support = _phantom(n)
    y = (torch.arange(n, dtype=torch.float64) - n // 2) / (n / 2)
    x = (obj.abs() * torch.exp(1j * 1.5 * torch.sin(4 * math.pi * y))[:, None]).view(1, 1, n, n)
    from mediff.recon.mri import calib_region

    mask = random_1d((n, n), 4, 0.16, 0).tensor()
    rows, cols = calib_region(mask.numpy())
    assert rows == n and 8 <= cols <= 12
    k = SingleCoilMRI(mask).A(x)
    true_phase = x / x.abs()
    interior = _phantom(n, inside=0.6)[1]
    err_band = (lowres_phase(k, mask, calib=(n, cols)) - true_phase)[..., interior].abs()
    err_square = (lowres_phase(k, mask, calib=cols) - true_phase)[..., interior].abs()
    assert err_band.mean() < 0.05 and err_square.mean() > 3 * err_band.mean(), (err_band.mean(), err_square.mean())
    # same accuracy through the SENSE operator
    maps = simulate_coil_maps((n, n), 6, dtype=torch.complex128)
    op = MultiCoilMRI(mask, maps)
    assert (lowres_phase(op.A(x), op, calib=(n, cols)) - true_phase)[..., interior].abs().mean() < 0.05


def _brain_like(n: int = 128, seed: int = 0) -> np.ndarray:
    """A real-looking T1-like slice in MR units (peak ~1000): scalp, textured grey/white matter,
    ventricles, all with 1-pixel smooth edges like a band-limited acquisition (no sharp steps)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[:n, :n] - n / 2) / (n / 2)
    img = np.where((yy / 0.85) ** 2 + (xx / 0.68) ** 2 < 1, 0.6, 0.0)
    texture = gaussian_filter(rng.standard_normal((n, n)), 3)
    white = gaussian_filter(rng.standard_normal((n, n)), 6) > 0
    tissue = np.where(white, 1.0, 0.75) + 0.05 * texture / texture.std()
    img = np.where((yy / 0.76) ** 2 + (xx / 0.6) ** 2 < 1, tissue, img)
    img = np.where(((yy + 0.05) / 0.25) ** 2 + ((np.abs(xx) - 0.09) / 0.06) ** 2 < 1, 0.25, img)
    return gaussian_filter(img, 1.0) * 900


@pytest.mark.parametrize("coils, kind", [(1, "random1d"), (8, "random1d"), (8, "poisson2d"), (4, "radial")])
def test_estimate_noise_sigma_recovers_known_noise(coils: int, kind: str) -> None:
    n = 128
    image = torch.from_numpy(_brain_like(n))[None, None]
    ref = float(np.percentile(image.numpy(), 99.5))
    mask = make_mask(kind, (n, n), 4, 0.08, 0).mask
    maps = simulate_coil_maps((n, n), coils, dtype=torch.complex128) if coils > 1 else None
    for level in (0.002, 0.01, 0.05):
        sigma = level * ref
        y = simulate_kspace(image, mask, maps, noise_sigma=sigma, generator=_gen(3))
        est = estimate_noise_sigma(y, mask)
        assert est == pytest.approx(sigma, rel=0.1), (level, est / sigma)
    # noiseless: what is left of the image in the outer k-space is ~0 (measured < 1e-3 of the scale)
    clean = estimate_noise_sigma(simulate_kspace(image, mask, maps), mask)
    assert 0 <= clean < 1e-3 * ref, clean / ref


def test_estimate_noise_sigma_inputs() -> None:
    n = 64
    image = torch.from_numpy(_brain_like(n))[None, None]
    sigma = 20.0
    mask = random_1d((n, n), 3, 0.1, 0)
    maps = simulate_coil_maps((n, n), 4, dtype=torch.complex128)
    y = simulate_kspace(image.expand(2, 1, n, n), mask.tensor(), maps, noise_sigma=sigma, generator=_gen(5))
    est = estimate_noise_sigma(y, mask)  # a Mask object, a batch (B, C, H, W)
    assert est == pytest.approx(sigma, rel=0.1)
    assert estimate_noise_sigma(y[0].numpy(), mask.mask) == pytest.approx(estimate_noise_sigma(y[:1], mask), rel=1e-12)
    batched = torch.from_numpy(mask.mask.copy())[None, None].expand(2, 1, n, n)
    assert estimate_noise_sigma(y, batched) == pytest.approx(est, rel=1e-12)
    # scales with the data
    assert estimate_noise_sigma(3 * y, mask) == pytest.approx(3 * est, rel=1e-9)
    # entries that are exactly zero in every coil (zero-padded readout) are not measurements
    padded = y.clone()
    padded[..., :6, :] = 0
    padded[..., -6:, :] = 0
    assert estimate_noise_sigma(padded, mask) == pytest.approx(sigma, rel=0.15)
    bad = y.clone()
    bad[0, 0, 0, 0] = complex(float("nan"), 0)
    with pytest.raises(MediffError, match="NaN"):
        estimate_noise_sigma(bad, mask)
    with pytest.raises(MediffError, match="grid"):
        estimate_noise_sigma(y, torch.ones(n, n + 1))
    with pytest.raises(MediffError, match="too few"):
        estimate_noise_sigma(y[:1, :, :3, :3], torch.ones(3, 3))  # 4 corner entries
    with pytest.raises(MediffError):
        estimate_noise_sigma(y, mask, fraction=0)


def test_check_kspace() -> None:
    mask = torch.ones(H, W, dtype=torch.bool)
    ksp = _cplx(1, C, H, W)
    check_kspace(ksp, mask)
    check_kspace(ksp[0], mask.numpy())
    with pytest.raises(MediffError, match="grid"):
        check_kspace(ksp, torch.ones(H, W + 1))
    with pytest.raises(MediffError, match="batch"):
        check_kspace(ksp, torch.ones(3, 1, H, W))
    bad = ksp.clone()
    bad[0, 0, 0, 0] = complex(float("nan"), 0)
    with pytest.raises(MediffError, match="NaN"):
        check_kspace(bad, mask)
    bad[0, 0, 0, 0] = complex(0, float("inf"))
    with pytest.raises(MediffError, match="NaN or inf"):
        check_kspace(bad, mask)
    with pytest.raises(MediffError, match="all zero"):
        check_kspace(torch.zeros_like(ksp), mask)
    with pytest.raises(MediffError):
        check_kspace(np.zeros((H, W)), mask)  # 2D: no coil axis


def test_sense_residual_sigma_measures_noise_and_model_error() -> None:
    """Right maps: the residual std estimates the noise (CG stops before fitting the ill-conditioned
    components, so it reads a little high: measured +9 % at 0.2-5 % noise here). Noiseless data: ~0.
    Maps that miss part of the object (support cut): the miss shows up without any noise. As many
    unknowns as data: 0."""
    n = 64
    image = torch.from_numpy(_brain_like(n))[None, None]
    ref = float(np.percentile(image.numpy(), 99.5))
    mask = random_1d((n, n), 4, 0.08, 0).mask
    maps = simulate_coil_maps((n, n), 8, dtype=torch.complex128)
    op = MultiCoilMRI(mask, maps)
    for level in (0.002, 0.01, 0.05):
        sigma = level * ref
        est = sense_residual_sigma(op, simulate_kspace(image, mask, maps, noise_sigma=sigma, generator=_gen(2)))
        assert sigma <= est <= 1.15 * sigma, (level, est / sigma)
    clean = simulate_kspace(image, mask, maps)
    assert sense_residual_sigma(op, clean) < 1e-3 * ref
    cut = maps.clone()
    cut[:, : n // 4] = 0  # the top quarter of the head is outside these maps' support
    assert sense_residual_sigma(MultiCoilMRI(mask, cut), clean) > 0.01 * ref
    mask8, maps4 = random_1d((n, n), 8, 0.08, 0).mask, simulate_coil_maps((n, n), 4, dtype=torch.complex128)
    assert sense_residual_sigma(MultiCoilMRI(mask8, maps4), simulate_kspace(image, mask8, maps4)) == 0.0
    with pytest.raises(MediffError, match="1, C, H, W"):
        sense_residual_sigma(op, clean[0])
