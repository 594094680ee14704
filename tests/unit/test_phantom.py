"""The phantom sample: deterministic by seed, physically sane, and its DPC
gradient consistent with its phase."""

from __future__ import annotations

import numpy as np
import pytest

from services.sim.phantom import ELEMENTS, PHASES, make_phantom


def grid(size: float, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(0, size, n)
    return np.meshgrid(axis, axis)


def test_same_seed_same_bytes_other_seed_other_sample() -> None:
    x, y = grid(50.0)
    a, b, c = (make_phantom(seed).truth(x, y) for seed in (7, 7, 8))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert not np.array_equal(a["Fe_ug_cm2"], c["Fe_ug_cm2"])


def test_composition_is_physical_and_has_contrast() -> None:
    phantom = make_phantom(3)
    x, y = grid(phantom.size_um)
    for element in ELEMENTS:
        density = phantom.areal_density(element, x, y)
        assert density.min() > 0 and density.max() > 3 * density.min(), element
    fractions = phantom.phase_fractions(x, y)
    assert fractions.shape == (*x.shape, len(PHASES))
    assert fractions.min() >= 0 and fractions.max() <= 1
    np.testing.assert_allclose(fractions.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    dominant = fractions.argmax(axis=-1)
    assert set(np.unique(dominant)) == set(range(len(PHASES))), "every phase has grains"
    assert (fractions.max(axis=-1) == 1).mean() > 0.8, "most points lie inside one grain"
    assert phantom.thickness(x, y).min() >= phantom.base_thickness_um


def test_dpc_gradient_is_the_derivative_of_the_phase() -> None:
    phantom = make_phantom(5)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(5, 45, 200), rng.uniform(5, 45, 200)
    h = 1e-4
    gx, gy = phantom.phase_gradient(x, y)
    numeric_x = (phantom.phase(x + h, y) - phantom.phase(x - h, y)) / (2 * h)
    numeric_y = (phantom.phase(x, y + h) - phantom.phase(x, y - h)) / (2 * h)
    np.testing.assert_allclose(gx, numeric_x, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gy, numeric_y, rtol=1e-6, atol=1e-9)
    assert np.abs(gx).max() > 0.01  # the sample has edges a DPC map can see


def test_a_field_of_view_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        make_phantom(0, size_um=0)
