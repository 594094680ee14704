"""The line model of an XRF fit: one unit-area spectrum per component.

A component is one element's series (``Fe K``, ``Pb L``, ``W L3``, ``Fe Kb``:
all its lines, each weighted by its production rate (xraylib) times what the
photon crosses on its way out (sample self-absorption, air, window, filters)
times the detector's efficiency, normalised so that the component's
amplitude is the counts in its photopeaks), plus the escape peaks of those
lines in the detector material, and the elastic and Compton scatter peaks.
Shapes are Gaussians of the Fano-limited width, integrated over each
channel's bin. Pile-up is not a fixed shape (it is the spectrum convolved
with itself): :func:`pileup_shape` builds it from fitted amplitudes.

Built once per scan (on the first spectrum, when the channel count is known);
the fit itself (pipelines/processors/xrf.py) is then linear algebra only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.physics.absorption import Layer, Matrix, escape_lines
from services.physics.xraylines import Calibration, Line, Resolution, compton_keV, gaussian_counts, series_lines

#: A series whose share of its photopeak counts inside the fit window is below this is left out of the fit.
MIN_IN_WINDOW = 0.01


@dataclass(frozen=True)
class Setup:
    """What the model needs to know of the instrument and the sample."""

    calibration: Calibration
    resolution: Resolution
    incident_keV: float
    elements: dict[str, tuple[str, ...]]  # symbol -> series ("K", "L", "M", "Ka", "L3", ...)
    path: tuple[Layer, ...] = ()  # between sample and detector crystal: air, window, filters, dead layer
    detector: Layer | None = None  # the crystal: efficiency and escape peaks
    matrix: Matrix | None = None  # thick-sample self-absorption of the lines
    escape: bool = True
    scatter: bool = True
    compton_angle_deg: float = 90.0
    compton_fwhm_keV: float = 0.35

    def weights(self, energies: np.ndarray) -> np.ndarray:
        """Relative detection of lines at ``energies`` (before the matrix): path transmission x efficiency."""
        out = np.ones(len(energies))
        for layer in self.path:
            out *= layer.transmission(energies)
        if self.detector is not None:
            out *= self.detector.absorbed(energies)
        return out


@dataclass
class Component:
    name: str  # "Fe K", "elastic", "compton"
    element: str | None
    lines: tuple[tuple[Line, float], ...]  # (line, share of the component's photopeak counts)
    shape: np.ndarray  # counts per channel of the window, per unit amplitude
    in_window: float  # share of the photopeak counts inside the window


@dataclass
class Model:
    components: list[Component]
    dropped: dict[str, str] = field(default_factory=dict)  # component -> why it is not fitted

    @property
    def matrix(self) -> np.ndarray:
        return np.array([c.shape for c in self.components])


def _peaks(setup: Setup, edges: np.ndarray, lines: list[tuple[float, float]]) -> np.ndarray:
    """Sum of unit Gaussians (energy, weight) with their escape peaks, over the bins ``edges``."""
    out = np.zeros(len(edges) - 1)
    escapes = setup.escape and setup.detector is not None
    for energy, weight in lines:
        out += weight * gaussian_counts(edges, energy, float(setup.resolution.sigma_keV(energy)))
        if escapes:
            for esc in escape_lines(setup.detector.composition, energy):
                e = energy - esc.energy_offset_keV
                if e > 0:
                    out += weight * esc.fraction * gaussian_counts(edges, e, float(setup.resolution.sigma_keV(e)))
    return out


def line_shares(setup: Setup, element: str, series: str) -> tuple[tuple[Line, float], ...]:
    """The series' lines with their shares of its detected photopeak counts (sum 1)."""
    lines = series_lines(element, series, setup.incident_keV)
    if not lines:
        return ()
    energies = np.array([line.energy_keV for line in lines])
    rates = np.array([line.cross_section_cm2_g for line in lines]) * setup.weights(energies)
    if setup.matrix is not None:
        rates = rates * setup.matrix.factor(setup.incident_keV, energies)
    if rates.sum() <= 0:
        return ()
    return tuple(zip(lines, rates / rates.sum()))


def build(setup: Setup, window_edges: np.ndarray) -> Model:
    """Components whose photopeaks fall in the window; the others in ``dropped`` with the reason."""
    lo, hi = float(window_edges[0]), float(window_edges[-1])
    model = Model([])
    for element, all_series in setup.elements.items():
        for series in all_series:
            name = f"{element} {series}"
            shares = line_shares(setup, element, series)
            if not shares:
                model.dropped[name] = f"{name} lines are not excited at {setup.incident_keV:g} keV"
                continue
            peaks = [(line.energy_keV, share) for line, share in shares]
            shape = _peaks(setup, window_edges, peaks)
            inside = float(sum(share * gaussian_counts(window_edges, e, float(setup.resolution.sigma_keV(e))).sum()
                               for e, share in peaks))
            if inside < MIN_IN_WINDOW:
                energies = [e for e, _ in peaks]
                model.dropped[name] = (f"{name} lines ({min(energies):.2f}-{max(energies):.2f} keV) lie outside "
                                       f"the fit range [{lo:.2f}, {hi:.2f}] keV")
                continue
            model.components.append(Component(name, element, shares, shape, inside))
    if setup.scatter:
        compton = compton_keV(setup.incident_keV, setup.compton_angle_deg)
        for name, energy, extra in (("elastic", setup.incident_keV, 0.0),
                                    ("compton", compton, setup.compton_fwhm_keV / 2.3548)):
            sigma = float(np.hypot(setup.resolution.sigma_keV(energy), extra))
            inside = float(gaussian_counts(window_edges, energy, sigma).sum())
            if inside < MIN_IN_WINDOW:
                model.dropped[name] = (f"the {name} peak ({energy:.2f} keV) lies outside the fit range "
                                       f"[{lo:.2f}, {hi:.2f}] keV")
                continue
            shape = gaussian_counts(window_edges, energy, sigma)
            if setup.escape and setup.detector is not None:
                for esc in escape_lines(setup.detector.composition, energy):
                    shape = shape + esc.fraction * gaussian_counts(window_edges, energy - esc.energy_offset_keV, sigma)
            model.components.append(Component(name, None, (), shape, inside))
    return model


def pileup_shape(line_spectrum: np.ndarray, calibration: Calibration, first_channel: int) -> np.ndarray:
    """Shape (unit area) of the sum peaks of a window's fitted line spectrum: two
    photons within the pulse-pair resolution are recorded at E1 + E2. With
    ``E = z + g c`` that is the self-convolution shifted by ``z / g`` channels
    (linear calibration; the quadratic term is neglected here). Zero if nothing
    lands in the window."""
    y = np.clip(line_spectrum, 0, None)
    n = len(y)
    conv = np.convolve(y, y)  # index i + j  <->  channels (first + i) + (first + j)
    z, g = calibration.offset_keV, calibration.gain_keV_per_channel
    # sum channel c = c1 + c2 + z / g  ->  window index k = i + j + first + z / g
    shift = first_channel + z / g
    k = np.arange(len(conv)) + shift
    out = np.interp(np.arange(n), k, conv, left=0.0, right=0.0)
    total = out.sum()
    return out / total if total > 0 else out
