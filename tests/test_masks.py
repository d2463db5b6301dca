"""Sampling masks: rates, calibration regions, determinism, registry errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mediff.errors import MediffError
from mediff.physics.masks import (
    MASK_KINDS,
    Mask,
    achieved_acceleration,
    equispaced_1d,
    make_mask,
    poisson_disc_2d,
    radial,
    random_1d,
)

SHAPE = (128, 128)
# fastMRI's default pairs: 8% centre at 4x, 4% centre at 8x
CF = {4: 0.08, 8: 0.04}


def _build(kind: str, accel: int, seed: object) -> Mask:
    if kind == "random1d":
        return random_1d(SHAPE, accel, CF[accel], seed)
    if kind == "equispaced1d":
        return equispaced_1d(SHAPE, accel, CF[accel], seed)
    return poisson_disc_2d(SHAPE, accel, 16, seed)


@pytest.mark.parametrize("accel", [4, 8])
@pytest.mark.parametrize("kind", ["random1d", "equispaced1d", "poisson2d"])
def test_rate_centre_and_determinism(kind: str, accel: int) -> None:
    m = _build(kind, accel, 0)
    assert m.mask.shape == SHAPE and m.mask.dtype == bool and m.kind == kind
    assert abs(m.accel - accel) <= 0.1 * accel
    assert m.accel == pytest.approx(achieved_acceleration(m.mask))
    # fully sampled centre (DC at index N // 2)
    if kind == "poisson2d":
        assert m.mask[64 - 8:64 + 8, 64 - 8:64 + 8].all()
    else:
        n_low = round(128 * CF[accel])
        start = 64 - n_low // 2
        assert m.mask[:, start:start + n_low].all()
        assert (m.mask == m.mask[:1]).all()  # whole phase-encode columns
    # same seed (int or Generator) -> same mask
    assert np.array_equal(m.mask, _build(kind, accel, 0).mask)
    assert np.array_equal(_build(kind, accel, np.random.default_rng(3)).mask, _build(kind, accel, np.random.default_rng(3)).mask)
    # different seeds -> different masks (equispaced has only a few possible offsets: look at several)
    if kind == "equispaced1d":
        assert len({_build(kind, accel, s).mask.tobytes() for s in range(8)}) > 1
    else:
        assert not np.array_equal(m.mask, _build(kind, accel, 1).mask)


def test_rate_holds_across_seeds() -> None:
    for seed in range(5):
        for kind in MASK_KINDS:
            m = make_mask(kind, (96, 128), 6, 0.06, seed)
            assert abs(m.accel - 6) <= 0.6, (kind, seed, m.accel)


def test_global_rng_is_not_used() -> None:
    np.random.seed(0)
    a = random_1d(SHAPE, 4, 0.08, 5).mask
    np.random.seed(1)
    assert np.array_equal(a, random_1d(SHAPE, 4, 0.08, 5).mask)


def test_equispaced_lines_are_regular() -> None:
    m = equispaced_1d((8, 256), 4, 0.0, 0)
    gaps = np.diff(np.flatnonzero(m.mask[0]))
    assert set(gaps.tolist()) <= {3, 4, 5}


def test_poisson_is_variable_density_and_spread() -> None:
    m = poisson_disc_2d(SHAPE, 8, 12, 0).mask
    yy, xx = np.meshgrid(np.arange(128) - 64, np.arange(128) - 64, indexing="ij")
    rho = np.hypot(yy, xx)
    inner, outer = m[(rho > 10) & (rho < 30)].mean(), m[(rho > 45) & (rho < 64)].mean()
    assert inner > 2 * outer > 0
    # Poisson-disc: outside the centre no two samples are 4-neighbours at 8x
    far = m & (rho > 30)
    assert not (far[:, 1:] & far[:, :-1]).any() and not (far[1:] & far[:-1]).any()


def test_radial_line_count() -> None:
    r = min(SHAPE) // 2
    one = radial(SHAPE, 1, 0).mask
    assert r <= one.sum() <= 3 * r + 1
    for n in (8, 32):
        m = radial(SHAPE, n, 0)
        assert m.mask[64, 64] and m.params["n_lines"] == n
        assert 0.5 * n * 2 * r < m.mask.sum() <= n * (3 * r + 1)
    # more spokes, more samples; uniform angles: spokes on the axes when the offset is 0 mod pi/n
    assert radial(SHAPE, 16, 0).mask.sum() > radial(SHAPE, 8, 0).mask.sum()
    assert radial(SHAPE, 10, 0, golden=False).params["golden"] is False
    # corners beyond the inscribed circle are never sampled
    assert not radial(SHAPE, 200, 0).mask[0, 0]
    rm = make_mask("radial", SHAPE, 8, 0.08, 0)
    assert abs(rm.accel - 8) <= 0.8 and 8 <= rm.params["n_lines"] <= 40


def test_mask_is_immutable() -> None:
    m = random_1d(SHAPE, 4, 0.08, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.accel = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        m.mask[0, 0] = True
    with pytest.raises(TypeError):
        m.params["seed"] = 1  # type: ignore[index]
    t = m.tensor()
    assert t.dtype == torch.bool and t.shape == SHAPE


@pytest.mark.parametrize(
    "args",
    [
        ("spiral", SHAPE, 4, 0.08, 0),  # unknown kind
        ("random1d", SHAPE, 1.0, 0.08, 0),  # accel <= 1
        ("random1d", SHAPE, 0.5, 0.08, 0),
        ("equispaced1d", SHAPE, float("nan"), 0.08, 0),
        ("random1d", SHAPE, 4, 1.0, 0),  # center_fraction not in [0, 1)
        ("poisson2d", SHAPE, 4, -0.1, 0),
        ("random1d", SHAPE, 8, 0.5, 0),  # centre alone exceeds the budget
        ("random1d", (0, 128), 4, 0.08, 0),  # bad shape
        ("random1d", SHAPE, 4, 0.08, None),  # no implicit global RNG
    ],
)
def test_make_mask_errors(args: tuple) -> None:
    with pytest.raises(MediffError):
        make_mask(*args)


def test_achieved_acceleration() -> None:
    m = np.zeros((4, 4), dtype=bool)
    m[0] = True
    assert achieved_acceleration(m) == 4.0
    assert achieved_acceleration(torch.from_numpy(m)) == 4.0
    with pytest.raises(MediffError):
        achieved_acceleration(np.zeros((4, 4)))
