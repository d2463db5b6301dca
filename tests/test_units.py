"""Tests for mediff.units: intensity normalisation, its inverse and its JSON record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mediff.errors import MediffError
from mediff.units import Normalization, normalize


def test_normalization_mr_percentile() -> None:
    x = np.random.default_rng(8).gamma(2.0, 100.0, size=(32, 32)).astype(np.float32)
    y, norm = normalize(x)
    assert norm.kind == "percentile" and norm.offset == 0
    assert norm.scale == pytest.approx(np.percentile(x, 99.5))
    assert y.max() > 1.0  # top not clipped
    assert np.mean(y <= 1.0) == pytest.approx(0.995, abs=0.002)
    restored = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert restored == norm
    np.testing.assert_allclose(restored.invert(y), x, rtol=1e-5)


def test_normalization_ct_hu_window() -> None:
    hu = np.array([-1000.0, 0.0, 1000.0, 3000.0])
    y, norm = normalize(hu, modality="CT")
    np.testing.assert_allclose(y, [0.0, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(norm.invert(y), hu)
    y2, norm2 = normalize(hu, "hu_window", hu_min=-1024, hu_max=3071, clip=(0.0, 1.0))
    assert y2.min() >= 0 and y2.max() <= 1 and norm2.to_dict()["clip"] == [0.0, 1.0]
    with pytest.raises(MediffError):
        Normalization.from_dict({"kind": "percentile"})
