"""X-ray emission lines and an energy-dispersive detector's response.

One place for what the XRF simulator and the XRF processor must agree on:
line energies and production cross sections from xraylib, the energy
calibration of a multichannel analyser, and the Gaussian line shape whose
width follows Fano statistics. Everything is vectorised over channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import xraylib
from scipy.special import erf

#: Lines considered per series; xraylib knows more, these carry nearly all the intensity.
SERIES_LINES = {
    "K": ("KA1", "KA2", "KB1", "KB3"),
    "L": ("LA1", "LA2", "LB1", "LB2", "LB3", "LB4", "LG1", "LG3", "LL"),
}
EPSILON_SI_KEV = 3.85e-3  # energy per electron-hole pair in silicon
ELECTRON_REST_KEV = 510.999


@dataclass(frozen=True)
class Line:
    element: str
    name: str  # xraylib's, without _LINE: "KA1", "LB1"
    energy_keV: float
    cross_section_cm2_g: float  # fluorescence production at the incident energy (Kissel)


@lru_cache(maxsize=None)
def emission_lines(element: str, series: str, incident_keV: float) -> tuple[Line, ...]:
    """The lines of one series excited at ``incident_keV`` (empty if its edge is above)."""
    z = xraylib.SymbolToAtomicNumber(element)
    if z <= 0:
        raise ValueError(f"unknown element {element!r}")
    if series not in SERIES_LINES:
        raise ValueError(f"unknown series {series!r} (known: {sorted(SERIES_LINES)})")
    lines = []
    for name in SERIES_LINES[series]:
        code = getattr(xraylib, f"{name}_LINE")
        try:
            energy = xraylib.LineEnergy(z, code)
            cs = xraylib.CS_FluorLine_Kissel(z, code, incident_keV)
        except ValueError:  # xraylib has no data for this line of this element
            continue
        if energy > 0 and cs > 0:
            lines.append(Line(element, name, energy, cs))
    return tuple(lines)


#: Series a fit can name: whole shells (K, L, M), PyMca's K sub-groups (Ka: K-L
#: transitions, Kb: the rest of K) and single subshells (L1..L3, M1..M5).
SERIES_SHELLS = {"K": ("K",), "Ka": ("K",), "Kb": ("K",), "L": ("L1", "L2", "L3"), "L1": ("L1",), "L2": ("L2",),
                 "L3": ("L3",), "M": ("M1", "M2", "M3", "M4", "M5"), **{f"M{i}": (f"M{i}",) for i in range(1, 6)}}
#: Lines below this share of their series' production are left out (they are below any detection limit).
MIN_LINE_SHARE = 1e-4


def _transitions(shell: str) -> list[str]:
    """xraylib's IUPAC line macros starting from one vacancy shell (``KL3``, ``L3M5``, ...)."""
    n = len(shell)
    return sorted(name[:-5] for name in dir(xraylib) if name.endswith("_LINE") and name.startswith(shell)
                  and len(name) > n + 5 and name[n] in "KLMNOPQ" and name[n + 1:-5].isdigit())


@lru_cache(maxsize=None)
def series_lines(element: str, series: str, incident_keV: float) -> tuple[Line, ...]:
    """Every line of ``series`` (see :data:`SERIES_SHELLS`) excited at ``incident_keV``,
    with its production cross section (xraylib Kissel photoionisation, fluorescence
    yield, radiative rate, with Coster-Kronig and cascade transfers); empty if no
    vacancy of the series can be made. Why all transitions: on real spectra the
    small ones (K-N, L3-N1, ...) are counts a four-line model pushes onto neighbours."""
    z = xraylib.SymbolToAtomicNumber(element)
    if z <= 0:
        raise ValueError(f"unknown element {element!r}")
    if series not in SERIES_SHELLS:
        raise ValueError(f"unknown series {series!r} (known: {sorted(SERIES_SHELLS)})")
    lines = []
    for shell in SERIES_SHELLS[series]:
        for name in _transitions(shell):
            if series == "Ka" and not name.startswith("KL") or series == "Kb" and name.startswith("KL"):
                continue
            code = getattr(xraylib, f"{name}_LINE")
            try:
                energy = xraylib.LineEnergy(z, code)
                cs = xraylib.CS_FluorLine_Kissel_Cascade(z, code, incident_keV)
            except ValueError:  # no data for this line of this element
                continue
            if 0 < energy < incident_keV and cs > 0:
                lines.append(Line(element, name, energy, cs))
    total = sum(line.cross_section_cm2_g for line in lines)
    return tuple(line for line in lines if line.cross_section_cm2_g >= MIN_LINE_SHARE * total)


def default_series(element: str, incident_keV: float) -> str:
    """K if the K edge is excited, else L: what an XRF user looks at first."""
    z = xraylib.SymbolToAtomicNumber(element)
    return "K" if xraylib.EdgeEnergy(z, xraylib.K_SHELL) < incident_keV else "L"


def compton_keV(incident_keV: float, angle_deg: float) -> float:
    """Energy of photons Compton-scattered by ``angle_deg``."""
    return incident_keV / (1 + incident_keV / ELECTRON_REST_KEV * (1 - math.cos(math.radians(angle_deg))))


@dataclass(frozen=True)
class Calibration:
    """Channel -> energy of an MCA: ``E = offset + gain c + quadratic c²`` (keV)."""

    offset_keV: float
    gain_keV_per_channel: float
    quadratic_keV_per_channel2: float = 0.0

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Calibration":
        return cls(float(doc["offset_keV"]), float(doc["gain_keV_per_channel"]),
                   float(doc.get("quadratic_keV_per_channel2", 0.0)))

    def to_json(self) -> dict[str, float]:
        return {"offset_keV": self.offset_keV, "gain_keV_per_channel": self.gain_keV_per_channel,
                "quadratic_keV_per_channel2": self.quadratic_keV_per_channel2}

    def energy(self, channel: np.ndarray) -> np.ndarray:
        c = np.asarray(channel, dtype=np.float64)
        return self.offset_keV + self.gain_keV_per_channel * c + self.quadratic_keV_per_channel2 * c * c

    def edges(self, channels: int) -> np.ndarray:
        """Energies of the channel boundaries (``channels + 1``)."""
        return self.energy(np.arange(channels + 1) - 0.5)


@dataclass(frozen=True)
class Resolution:
    """Detector resolution: electronic noise plus Fano statistics.
    ``sigma(E)² = (noise_fwhm / 2.3548)² + epsilon F E``."""

    noise_fwhm_keV: float = 0.06
    fano: float = 0.114

    def sigma_keV(self, energy_keV: np.ndarray | float) -> np.ndarray:
        return np.sqrt((self.noise_fwhm_keV / 2.3548) ** 2 + EPSILON_SI_KEV * self.fano * np.asarray(energy_keV))

    def fwhm_keV(self, energy_keV: np.ndarray | float) -> np.ndarray:
        return 2.3548 * self.sigma_keV(energy_keV)


def gaussian_counts(edges_keV: np.ndarray, centre_keV: float, sigma_keV: float) -> np.ndarray:
    """Fraction of a unit-area Gaussian falling into each channel (exact bin integral)."""
    cdf = 0.5 * (1 + erf((edges_keV - centre_keV) / (math.sqrt(2) * sigma_keV)))
    return np.diff(cdf)
