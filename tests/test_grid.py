"""Slices of a volume in any voxel order: the same anatomy reaches the prior, and results go back
onto the input's own voxel grid (voxel order and affine), for all 48 axis orientations."""

from __future__ import annotations

import itertools

import nibabel.orientations as nio
import numpy as np
import pytest

from mediff.io import MedicalImage
from mediff.recon.grid import SLICE_ORIENTATION, pick_slice

SHAPE = (6, 5, 4)  # in the canonical P-S-R frame; distinct sizes catch any axis mix-up


def _orientations():
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            yield np.column_stack([perm, flips]).astype(float)


def _as_input(canonical: np.ndarray, ornt: np.ndarray) -> MedicalImage:
    """The canonical P-S-R volume stored in voxel order ``ornt`` (relative to P-S-R), with the affine
    that keeps every voxel at its world position (canonical affine: 1.5 mm, origin (10, -20, 5))."""
    aff0 = np.diag([1.5, 1.5, 1.5, 1.0])
    aff0[:3, :3] = aff0[:3, :3] @ nio.inv_ornt_aff(nio.axcodes2ornt(SLICE_ORIENTATION), (1, 1, 1))[:3, :3]
    aff0[:3, 3] = (10.0, -20.0, 5.0)
    arr = nio.apply_orientation(canonical, ornt)
    affine = aff0 @ nio.inv_ornt_aff(ornt, canonical.shape)
    return MedicalImage(array=arr, affine=affine, meta={})


@pytest.mark.parametrize("ornt", list(_orientations()), ids=lambda o: "".join(f"{int(a)}{'+' if f > 0 else '-'}"
                                                                                for a, f in o))
def test_slice_is_orientation_invariant_and_goes_back_onto_the_input_grid(ornt: np.ndarray) -> None:
    canonical = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    img = _as_input(canonical, ornt)
    ref = _as_input(canonical, np.column_stack([np.arange(3), np.ones(3)]).astype(float))
    for k in (0, 2, SHAPE[1] - 1):
        sl, aff, _, grid = pick_slice(img, k)
        sl_ref, aff_ref, _, _ = pick_slice(ref, k)
        np.testing.assert_array_equal(sl, sl_ref)  # the prior sees the same slice in every voxel order
        np.testing.assert_allclose(aff, aff_ref, atol=1e-9)
        placed = grid.place(sl)
        # On the input grid: its voxel order, length 1 on the slice axis, and the voxel values of the
        # input at that slice, where the shifted affine says they are.
        slice_axis = [i for i, n in enumerate(placed.shape) if n == 1 and img.array.shape[i] != 1]
        assert len(slice_axis) == 1 and placed.shape[:slice_axis[0]] == img.array.shape[:slice_axis[0]]
        ax = slice_axis[0]
        k_in = round(np.linalg.solve(img.affine, grid.affine @ np.array([0, 0, 0, 1.0]))[ax])
        np.testing.assert_array_equal(placed, np.take(img.array, [k_in], axis=ax))
        np.testing.assert_allclose(grid.affine[:3, :3], img.affine[:3, :3])


def test_single_slice_volume_keeps_shape_and_affine() -> None:
    arr = np.random.default_rng(0).random((8, 7, 1)).astype(np.float32)
    img = MedicalImage(array=arr, affine=np.diag([0.9, 0.9, 3.0, 1.0]), meta={})
    sl, _, note, grid = pick_slice(img, None)
    assert note is None
    np.testing.assert_array_equal(grid.place(sl), arr)
    np.testing.assert_allclose(grid.affine, img.affine)


@pytest.mark.parametrize("ornt", list(_orientations()), ids=lambda o: "".join(f"{int(a)}{'+' if f > 0 else '-'}"
                                                                                for a, f in o))
def test_slices_stack_back_into_the_input_volume(ornt: np.ndarray) -> None:
    """All slices picked from a volume stack back into the input itself (voxel order and affine), and
    a range of them into that block of the input's grid, in any of the 48 orientations."""
    from mediff.recon.grid import slice_count, stack_on_input_grid

    canonical = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    img = _as_input(canonical, ornt)
    n = slice_count(img)
    picked = [pick_slice(img, k) for k in range(n)]
    assert n == img.array.shape[picked[0][3].input_axis]
    arr, affine = stack_on_input_grid([p[3] for p in picked], [p[0] for p in picked])
    np.testing.assert_array_equal(arr, img.array)
    np.testing.assert_allclose(affine, img.affine, atol=1e-9)
    block, block_aff = stack_on_input_grid([p[3] for p in picked[1:3]], [p[0] for p in picked[1:3]])
    ax = picked[1][3].input_axis
    lo = min(p[3].input_index for p in picked[1:3])
    np.testing.assert_array_equal(block, np.take(img.array, [lo, lo + 1], axis=ax))
    np.testing.assert_allclose(block_aff[:3, 3], (img.affine @ np.eye(4)[:, ax] * lo + img.affine[:, 3])[:3])
