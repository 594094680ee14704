"""A seeded phantom sample: the known truth behind every simulated detector.

The sample is defined in continuous coordinates (micrometres, on a square
field of view), not as a pixel map. Simulated detectors are evaluated at the
*true* beam position of each point, so a map taken with wrong encoder
positions is blurred and shifted exactly as at a real beamline, and a
position correction can be checked against the truth.

What it holds (all vectorised over arrays of positions):

* ``areal_density(element, x, y)``: µg/cm² of Ca, Fe, Cu, Zn and Pb (Pb is
  the L-line element), each a sum of smooth Gaussian deposits on a weak
  background;
* ``phase_fractions(x, y)``: fractions of three cubic crystalline phases in
  grains (a Voronoi tessellation), summing to one;
* ``thickness(x, y)`` in µm and the DPC phase ``phase(x, y)`` in radians
  with its analytic gradient ``phase_gradient(x, y)``.

Same seed, same sample, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.physics.powder import CubicPhase

ELEMENTS = ("Ca", "Fe", "Cu", "Zn", "Pb")


PHASES = (CubicPhase("Cu", 3.615, "fcc"), CubicPhase("Si", 5.431, "diamond"), CubicPhase("NaCl", 5.640, "rocksalt"))


@dataclass(frozen=True)
class Blob:
    x: float
    y: float
    sigma: float
    height: float


def _blobs(rng: np.random.Generator, n: int, size: float, peak: float) -> tuple[Blob, ...]:
    return tuple(Blob(float(rng.uniform(0, size)), float(rng.uniform(0, size)),
                      float(rng.uniform(0.04, 0.15) * size), float(rng.uniform(0.3, 1.0) * peak))
                 for _ in range(n))


def _evaluate(blobs: tuple[Blob, ...], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(x, y).shape)
    for b in blobs:
        out += b.height * np.exp(-((x - b.x) ** 2 + (y - b.y) ** 2) / (2 * b.sigma**2))
    return out


@dataclass(frozen=True)
class Phantom:
    seed: int
    size_um: float
    deposits: dict[str, tuple[Blob, ...]] = field(repr=False)
    background: dict[str, float] = field(repr=False)
    grain_centres: np.ndarray = field(repr=False)  # (n, 2) µm
    grain_phase: np.ndarray = field(repr=False)  # (n,) index into PHASES
    thickness_blobs: tuple[Blob, ...] = field(repr=False)
    base_thickness_um: float = 5.0
    phase_per_um: float = -0.5  # radians of phase shift per µm of sample (a light matrix at ~15 keV)

    # ------------------------------------------------------------ composition
    def areal_density(self, element: str, x, y) -> np.ndarray:
        """µg/cm² of ``element`` at positions (µm)."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        return self.background[element] + _evaluate(self.deposits[element], x, y)

    def phase_fractions(self, x, y) -> np.ndarray:
        """``(..., len(PHASES))`` fractions: each point lies in one grain; within
        a grain boundary band (0.5 µm) the two nearest grains mix linearly."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        d = np.hypot(x[..., None] - self.grain_centres[:, 0], y[..., None] - self.grain_centres[:, 1])
        order = np.argsort(d, axis=-1)[..., :2]
        d1 = np.take_along_axis(d, order[..., :1], -1)[..., 0]
        d2 = np.take_along_axis(d, order[..., 1:], -1)[..., 0]
        w = np.clip(0.5 + (d2 - d1) / 1.0, 0.5, 1.0)  # 1 inside a grain, 0.5 on its boundary
        out = np.zeros((*d1.shape, len(PHASES)))
        first = self.grain_phase[order[..., 0]]
        second = self.grain_phase[order[..., 1]]
        np.put_along_axis(out, first[..., None], w[..., None], -1)
        extra = np.take_along_axis(out, second[..., None], -1)[..., 0] + (1 - w)
        np.put_along_axis(out, second[..., None], extra[..., None], -1)
        return out

    # ------------------------------------------------------------ shape
    def thickness(self, x, y) -> np.ndarray:
        """Sample thickness, µm."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        return self.base_thickness_um + _evaluate(self.thickness_blobs, x, y)

    def phase(self, x, y) -> np.ndarray:
        """Phase shift of the transmitted wave, radians."""
        return self.phase_per_um * self.thickness(x, y)

    def phase_gradient(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """(dφ/dx, dφ/dy), radians per µm: what a DPC detector measures."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        gx = np.zeros(np.broadcast(x, y).shape)
        gy = np.zeros_like(gx)
        for b in self.thickness_blobs:
            g = b.height * np.exp(-((x - b.x) ** 2 + (y - b.y) ** 2) / (2 * b.sigma**2))
            gx -= g * (x - b.x) / b.sigma**2
            gy -= g * (y - b.y) / b.sigma**2
        return self.phase_per_um * gx, self.phase_per_um * gy

    def truth(self, x, y) -> dict[str, np.ndarray]:
        """Every true quantity at positions: the products' ground truth."""
        fractions = self.phase_fractions(x, y)
        out = {f"{e}_ug_cm2": self.areal_density(e, x, y) for e in ELEMENTS}
        out.update({f"phase_{p.name}": fractions[..., k] for k, p in enumerate(PHASES)})
        out["thickness_um"] = self.thickness(x, y)
        out["phase_rad"] = self.phase(x, y)
        out["dphase_dx"], out["dphase_dy"] = self.phase_gradient(x, y)
        return out


def make_phantom(seed: int = 0, size_um: float = 50.0) -> Phantom:
    """The sample of a simulated scan; every number comes from ``seed``."""
    if size_um <= 0:
        raise ValueError("the field of view must be positive")
    rng = np.random.default_rng(seed)
    peaks = {"Ca": 40.0, "Fe": 8.0, "Cu": 2.0, "Zn": 3.0, "Pb": 1.0}  # µg/cm², a biological / environmental sample
    deposits = {e: _blobs(rng, int(rng.integers(3, 7)), size_um, peak) for e, peak in peaks.items()}
    background = {e: 0.02 * peak for e, peak in peaks.items()}
    n_grains = 24
    centres = rng.uniform(0, size_um, (n_grains, 2))
    grain_phase = rng.integers(0, len(PHASES), n_grains)
    thickness = _blobs(rng, 6, size_um, 3.0)
    return Phantom(seed, size_um, deposits, background, centres, grain_phase, thickness)
