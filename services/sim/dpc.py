"""The ``dpc`` detector: a small pixel detector in the far field of the focus.

It sees the bright-field disc of the focused beam. A phase gradient in the
sample deflects the beam by ``alpha = lambda / (2 pi) grad(phi)``, which moves
the disc by ``distance x alpha`` on the detector; absorption dims it. The
disc has a soft edge (the zone plate's aperture, blurred by the source); the
frame is Poisson of the expected counts. The geometry (pixel size, distance,
wavelength) is in the metadata, so the DPC processor turns a centre-of-mass
shift back into a gradient in rad/µm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from services.sim.counters import CounterModel
from services.sim.detector import Acquisition, SimDetector
from services.sim.phantom import Phantom
from services.physics.powder import wavelength_A


@dataclass(frozen=True)
class DpcModel:
    energy_keV: float = 15.0
    pixels: int = 64
    pixel_m: float = 55e-6
    distance_m: float = 3.0
    disc_radius_px: float = 14.0
    edge_px: float = 1.0
    counts_per_photon: float = 5.0e-3  # behind an attenuator: ~1e6 counts per frame
    mu_per_um: float = CounterModel.mu_per_um


def shift_px_per_rad_per_um(model: DpcModel) -> float:
    """Disc displacement in pixels per rad/µm of phase gradient."""
    return model.distance_m * wavelength_A(model.energy_keV) * 1e-10 / (2 * math.pi) * 1e6 / model.pixel_m


@dataclass
class Dpc(SimDetector):
    phantom: Phantom
    stream: str = "dpc"
    model: DpcModel = field(default_factory=DpcModel)

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"image": ("<u4", (self.model.pixels, self.model.pixels))}

    def units(self) -> dict[str, str]:
        return {"image": "counts"}

    def metadata(self) -> dict[str, Any]:
        m = self.model
        return {"kind": "pixel detector", "shape": [m.pixels, m.pixels], "pixel_size_m": m.pixel_m,
                "distance_m": m.distance_m, "photon_energy_keV": m.energy_keV,
                "wavelength_m": wavelength_A(m.energy_keV) * 1e-10, "model": asdict(m)}

    @cached_property
    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        centre = (self.model.pixels - 1) / 2
        row, col = np.mgrid[0:self.model.pixels, 0:self.model.pixels].astype(np.float64) - centre
        return col, row

    def expected(self, acq: Acquisition) -> np.ndarray:
        m = self.model
        gx, gy = self.phantom.phase_gradient(acq.x, acq.y)
        scale = shift_px_per_rad_per_um(m)
        col, row = self._grid
        r = np.hypot(col[None] - scale * gx[:, None, None], row[None] - scale * gy[:, None, None])
        disc = 1.0 / (1.0 + np.exp((r - m.disc_radius_px) / m.edge_px))
        disc /= disc.sum(axis=(1, 2), keepdims=True)
        bright = acq.photons * m.counts_per_photon * np.exp(-m.mu_per_um * self.phantom.thickness(acq.x, acq.y))
        return disc * bright[:, None, None]

    def acquire(self, acq: Acquisition, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"image": rng.poisson(self.expected(acq)).astype(np.uint32)}
