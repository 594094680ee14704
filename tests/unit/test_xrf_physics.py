"""The XRF physics kit (services/physics/): continuum, escape peaks, pile-up,
line shares and self-absorption, each against an independent value."""

from __future__ import annotations

import numpy as np
import pytest

from services.physics.absorption import Layer, Matrix, escape_lines, mu_cm2_g
from services.physics.continuum import smooth, snip
from services.physics.xraylines import Calibration, Resolution, gaussian_counts, series_lines
from services.physics.xrfmodel import Setup, build, line_shares, pileup_shape


@pytest.mark.parametrize("energy", [4.0, 6.4, 9.0, 14.1])
def test_silicon_escape_fractions_agree_with_pymca(energy) -> None:
    """Our Reed-Ware escape probabilities against PyMca's own (Elements.getEscape),
    per escape energy, within 5 %."""
    from PyMca5.PyMcaPhysics.xrf import Elements

    theirs: dict[float, float] = {}
    for e, rate, *_ in Elements.getEscape(["Si", 1.0, 1.0], energy, ethreshold=0.0, ithreshold=0.0, nthreshold=4):
        theirs[round(e, 2)] = theirs.get(round(e, 2), 0.0) + rate
    ours: dict[float, float] = {}
    for line in escape_lines({"Si": 1.0}, energy):
        key = round(energy - line.energy_offset_keV, 2)
        ours[key] = ours.get(key, 0.0) + line.fraction
    main = max(theirs, key=theirs.get)
    assert ours[main] == pytest.approx(theirs[main], rel=0.05)
    assert sum(ours.values()) == pytest.approx(sum(theirs.values()), rel=0.05)


def test_no_escape_below_the_detector_edge() -> None:
    assert escape_lines({"Si": 1.0}, 1.7) == ()  # below Si K (1.839 keV)


def test_snip_never_rises_above_the_data_and_recovers_a_smooth_continuum() -> None:
    """A linear continuum under three Gaussians, noiseless: SNIP gives the
    continuum within 1 % under the peaks and never exceeds the spectrum."""
    channels = np.arange(2000)
    continuum = 200.0 + 0.05 * channels
    peaks = sum(a * np.exp(-0.5 * ((channels - c) / 8.0) ** 2) for a, c in ((5e4, 500), (2e4, 900), (1e5, 1400)))
    spectra = np.stack([continuum + peaks, 3 * (continuum + peaks)])
    background = snip(spectra, width=60)
    assert np.all(background <= spectra * (1 + 1e-6))
    inner = slice(100, 1900)
    np.testing.assert_allclose(background[0, inner], continuum[inner], rtol=0.01)
    np.testing.assert_allclose(background[1, inner], 3 * continuum[inner], rtol=0.01)  # each row its own


def test_smooth_is_a_moving_average() -> None:
    y = np.arange(10.0)[None]
    np.testing.assert_allclose(smooth(y, 3)[0, 1:-1], y[0, 1:-1])  # a line is its own average
    assert smooth(y, 3)[0, 0] == pytest.approx(0.5)  # shorter window at the edge


def test_pileup_of_a_line_lands_at_twice_its_energy() -> None:
    calibration = Calibration(-0.05, 0.01)
    edges = calibration.edges(2000)
    line = 1e4 * gaussian_counts(edges, 6.4, 0.06)
    shape = pileup_shape(line, calibration, 0)
    energy = calibration.energy(np.arange(2000))
    assert energy[np.argmax(shape)] == pytest.approx(12.8, abs=0.015)
    assert shape.sum() == pytest.approx(1.0)


def test_line_shares_sum_to_one_and_follow_self_absorption() -> None:
    """In thick steel the Cr K-beta / K-alpha ratio rises (the matrix absorbs Cr K-alpha,
    5.41 keV, more than K-beta, 5.95 keV), by the slab factor 1 / chi of the thick limit."""
    thin = Setup(Calibration(0, 0.01), Resolution(), 16.0, {"Cr": ("K",)})
    steel = Layer.of({"Fe": 0.7, "Cr": 0.2, "Ni": 0.1}, 7.9, 0.1)
    thick = Setup(Calibration(0, 0.01), Resolution(), 16.0, {"Cr": ("K",)}, matrix=Matrix(steel, 45.0, 45.0))
    for setup in (thin, thick):
        assert sum(share for _, share in line_shares(setup, "Cr", "K")) == pytest.approx(1.0)

    def beta_alpha(setup):
        shares = line_shares(setup, "Cr", "K")
        return (sum(s for line, s in shares if line.name.startswith("KM")) /
                sum(s for line, s in shares if line.name.startswith("KL")))

    mu = lambda e: float(mu_cm2_g(steel.composition, e)[0])  # noqa: E731
    chi = lambda e: mu(16.0) / np.sin(np.pi / 4) + mu(e) / np.sin(np.pi / 4)  # noqa: E731
    expected = beta_alpha(thin) * chi(5.41) / chi(5.947)  # thick limit: intensity ~ 1 / chi
    assert beta_alpha(thick) == pytest.approx(expected, rel=0.01)
    assert beta_alpha(thick) > 1.1 * beta_alpha(thin)


def test_the_model_drops_what_lies_outside_the_window_and_says_why() -> None:
    calibration = Calibration(0.0, 0.01)
    setup = Setup(calibration, Resolution(), 17.5, {"Fe": ("K",), "Pb": ("L", "M")})
    model = build(setup, calibration.edges(1300)[400:1301])  # 4.0 to 13.0 keV
    names = [c.name for c in model.components]
    assert names == ["Fe K", "Pb L"]
    assert "Pb M lines" in model.dropped["Pb M"] and "outside the fit range [4.00, 13.00] keV" in model.dropped["Pb M"]
    assert "elastic" in model.dropped and "compton" in model.dropped
    assert len(series_lines("Pb", "L", 17.5)) > 9  # every L transition, not the four of a thin-sample table
