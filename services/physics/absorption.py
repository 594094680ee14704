"""Attenuation and detector response of an XRF set-up, from xraylib.

Why here: the relative intensities of one element's lines (K-alpha / K-beta,
L3 / L2 lines, M lines at 2-3 keV) in a *measured* spectrum are the
production rates times what the photons cross on the way out (sample matrix,
air, window, filters) times the detector's efficiency. A thin-sample,
perfect-detector ratio is wrong by tens of percent on thick samples and at
low energies, and a wrong ratio moves counts to the neighbouring element
(Cr K-beta on Mn K-alpha). The escape peaks of the detector material follow
from the same cross sections.

A material is a mapping {formula or element: mass fraction} (``{"Fe": 0.65,
"Cr": 0.18}``, ``{"H2O": 1}``); formulas are parsed by xraylib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import xraylib

Material = dict[str, float]


@lru_cache(maxsize=None)
def _mass_fractions(formula: str) -> tuple[tuple[int, float], ...]:
    try:
        parsed = xraylib.CompoundParser(formula)
    except ValueError:
        raise ValueError(f"material {formula!r} is neither an element nor a formula xraylib can parse") from None
    return tuple(zip(parsed["Elements"], parsed["massFractions"]))


def element_fractions(material: Material) -> dict[int, float]:
    """Atomic number -> mass fraction (normalised to 1)."""
    out: dict[int, float] = {}
    total = sum(material.values())
    if not material or total <= 0:
        raise ValueError(f"material {material} has no positive mass fraction")
    for formula, fraction in material.items():
        for z, w in _mass_fractions(formula):
            out[z] = out.get(z, 0.0) + w * fraction / total
    return out


def mu_cm2_g(material: Material, energy_keV: np.ndarray | float, kind: str = "total") -> np.ndarray:
    """Mass attenuation coefficient (``total``) or photoabsorption (``photo``), cm²/g."""
    function = {"total": xraylib.CS_Total, "photo": xraylib.CS_Photo}[kind]
    energies = np.atleast_1d(np.asarray(energy_keV, dtype=np.float64))
    out = np.zeros_like(energies)
    for z, w in element_fractions(material).items():
        out += w * np.array([function(z, float(e)) for e in energies])
    return out


@dataclass(frozen=True)
class Layer:
    """A homogeneous layer photons cross: material, density (g/cm³), thickness (cm)."""

    material: tuple[tuple[str, float], ...]
    density_g_cm3: float
    thickness_cm: float

    @classmethod
    def of(cls, material: Material, density_g_cm3: float, thickness_cm: float) -> "Layer":
        element_fractions(material)  # refuses an unparsable material now
        return cls(tuple(sorted(material.items())), float(density_g_cm3), float(thickness_cm))

    @property
    def composition(self) -> Material:
        return dict(self.material)

    def transmission(self, energy_keV: np.ndarray) -> np.ndarray:
        return np.exp(-mu_cm2_g(self.composition, energy_keV) * self.density_g_cm3 * self.thickness_cm)

    def absorbed(self, energy_keV: np.ndarray) -> np.ndarray:
        """Fraction absorbed (photoelectric) in the layer: a detector crystal's efficiency."""
        total = mu_cm2_g(self.composition, energy_keV)
        photo = mu_cm2_g(self.composition, energy_keV, "photo")
        return photo / total * (1 - np.exp(-total * self.density_g_cm3 * self.thickness_cm))


@dataclass(frozen=True)
class Matrix:
    """The sample as a slab: emission from depth is absorbed on the way in
    (at the incident energy, angle ``angle_in_deg`` to the surface) and out
    (at the line energy, ``angle_out_deg``). Thickness 0 is a thin sample."""

    layer: Layer
    angle_in_deg: float = 45.0
    angle_out_deg: float = 45.0

    def factor(self, incident_keV: float, energy_keV: np.ndarray) -> np.ndarray:
        """Relative emitted intensity per unit of the element's mass (self-absorption),
        ``(1 - exp(-chi rho d)) / (chi rho d)`` with ``chi = mu(E0)/sin(a_in) + mu(E)/sin(a_out)``;
        1 for a thin layer."""
        mu_in = mu_cm2_g(self.layer.composition, incident_keV)[0] / math.sin(math.radians(self.angle_in_deg))
        chi = mu_in + mu_cm2_g(self.layer.composition, energy_keV) / math.sin(math.radians(self.angle_out_deg))
        x = chi * self.layer.density_g_cm3 * self.layer.thickness_cm
        return np.where(x > 1e-9, -np.expm1(-x) / np.maximum(x, 1e-300), 1.0)


@dataclass(frozen=True)
class EscapeLine:
    energy_offset_keV: float  # subtracted from the parent line's energy
    fraction: float  # escape counts per photopeak count


def escape_lines(detector: Material, energy_keV: float) -> tuple[EscapeLine, ...]:
    """Escape peaks of a photon of ``energy_keV`` absorbed in a thick detector at
    normal incidence: the K fluorescence of a detector atom leaves the crystal
    with probability ``w_K (1 - 1/J_K) share / 2 * (1 - (mu_f / mu_0) ln(1 + mu_0 / mu_f))``
    (J_K the K jump ratio, ``mu_0`` the absorption at the photon's energy, ``mu_f``
    at the fluorescence's), the classic result for a semi-infinite absorber
    (Reed and Ware, J. Phys. E 5 (1972) 582), per detector element and K line."""
    out = []
    mu_0_total = float(mu_cm2_g(detector, energy_keV, "photo")[0])
    for z, w in element_fractions(detector).items():
        edge = xraylib.EdgeEnergy(z, xraylib.K_SHELL)
        if energy_keV <= edge:
            continue
        # share of the absorption at energy_keV made on this element's K shell
        k_share = w * xraylib.CS_Photo(z, energy_keV) * (1 - 1 / xraylib.JumpFactor(z, xraylib.K_SHELL)) / mu_0_total
        omega = xraylib.FluorYield(z, xraylib.K_SHELL)
        for code in (xraylib.KL3_LINE, xraylib.KL2_LINE, xraylib.KM3_LINE, xraylib.KM2_LINE):
            try:
                rate, line = xraylib.RadRate(z, code), xraylib.LineEnergy(z, code)
            except ValueError:
                continue
            mu_f = float(mu_cm2_g(detector, line, "photo")[0])
            ratio = mu_f / mu_0_total
            fraction = 0.5 * omega * rate * k_share * (1 - ratio * math.log1p(1 / ratio))
            if fraction > 1e-5:
                out.append(EscapeLine(line, fraction))
    return tuple(out)
