"""Powder diffraction of cubic phases: which rings, where, how strong.

Shared by the XRD simulator (to draw the rings) and the XRD processor (to
place a phase's peak windows), so that both use the same selection rules.
Intensities are a kinematic approximation: multiplicity, a structure-type
weight, Lorentz-polarisation and a Debye-Waller fall-off. Good enough to
tell phases apart and to weigh rings sensibly; not a Rietveld model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

STRUCTURES = ("fcc", "bcc", "diamond", "rocksalt", "primitive")


@dataclass(frozen=True)
class CubicPhase:
    name: str
    lattice_A: float  # cubic lattice constant, Ångström
    structure: str  # one of STRUCTURES: decides which hkl reflect

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"phase {self.name}: structure {self.structure!r} not in {STRUCTURES}")
        if not self.lattice_A > 0:
            raise ValueError(f"phase {self.name}: lattice constant must be positive")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "lattice_A": self.lattice_A, "structure": self.structure}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "CubicPhase":
        return cls(str(doc["name"]), float(doc["lattice_A"]), str(doc["structure"]))


@dataclass(frozen=True)
class Reflection:
    hkl: tuple[int, int, int]
    d_A: float
    two_theta_rad: float
    intensity: float  # relative, strongest ring of the phase = 1


def structure_weight(structure: str, h: int, k: int, l: int) -> float:
    """|F|² relative to the strongest class of reflections (0: forbidden)."""
    parity = {h % 2, k % 2, l % 2}
    mixed = len(parity) > 1
    if structure == "primitive":
        return 1.0
    if structure == "bcc":
        return 1.0 if (h + k + l) % 2 == 0 else 0.0
    if mixed:
        return 0.0  # fcc lattice rule, shared by fcc, diamond and rocksalt
    if structure == "fcc":
        return 1.0
    if structure == "diamond":
        if parity == {1}:
            return 0.5
        return 1.0 if (h + k + l) % 4 == 0 else 0.0
    # rocksalt: all even F = 4(f_A + f_B), all odd 4(f_A - f_B); for NaCl (17 - 11)² / 28² ~ 0.05
    return 1.0 if parity == {0} else 0.05


def multiplicity(h: int, k: int, l: int) -> int:
    """Symmetry-equivalent reflections of a cubic crystal (m-3m)."""
    return len({tuple(s * v for s, v in zip(signs, perm))
                for perm in itertools.permutations((h, k, l))
                for signs in itertools.product((1, -1), repeat=3)})


def reflections(phase: CubicPhase, wavelength_A: float, max_two_theta_rad: float = math.pi / 2,
                debye_waller_A2: float = 0.5) -> tuple[Reflection, ...]:
    """Allowed rings of ``phase`` below ``max_two_theta_rad``, by increasing angle."""
    out = []
    limit = int(2 * phase.lattice_A / wavelength_A) + 1  # sin(theta) <= 1
    for h in range(limit + 1):
        for k in range(h + 1):
            for l in range(k + 1):
                n2 = h * h + k * k + l * l
                weight = structure_weight(phase.structure, h, k, l) if n2 else 0.0
                if weight == 0:
                    continue
                d = phase.lattice_A / math.sqrt(n2)
                s = wavelength_A / (2 * d)
                if s >= 1:
                    continue
                theta = math.asin(s)
                if 2 * theta > max_two_theta_rad:
                    continue
                lp = (1 + math.cos(2 * theta) ** 2) / (math.sin(theta) ** 2 * math.cos(theta))
                dw = math.exp(-2 * debye_waller_A2 * (s / wavelength_A) ** 2)
                out.append(Reflection((h, k, l), d, 2 * theta, weight * multiplicity(h, k, l) * lp * dw))
    if not out:
        return ()
    top = max(r.intensity for r in out)
    return tuple(sorted((Reflection(r.hkl, r.d_A, r.two_theta_rad, r.intensity / top) for r in out),
                        key=lambda r: r.two_theta_rad))


def wavelength_A(energy_keV: float) -> float:
    """Photon wavelength for an energy: hc = 12.398419843 keV Å."""
    return 12.398419843320026 / energy_keV


def ring_profile(two_theta: np.ndarray, rings: tuple[Reflection, ...], sigma_rad: float) -> np.ndarray:
    """Intensity of a powder's rings at scattering angles ``two_theta``: each
    ring a Gaussian in 2θ, spread over its Debye cone (``1 / sin 2θ``)."""
    out = np.zeros_like(two_theta, dtype=np.float64)
    for r in rings:
        out += r.intensity * np.exp(-0.5 * ((two_theta - r.two_theta_rad) / sigma_rad) ** 2) / math.sin(r.two_theta_rad)
    return out
