"""The ``eiger`` detector: a powder diffraction frame per point.

The detector geometry is a pyFAI one (pixel size, distance, PONI, tilts,
wavelength); its ``get_config()`` goes into the scan metadata, so the XRD
processor can build the same integrator. Per pixel the simulator evaluates
the rings of each phase (services.physics.powder) at the pixel's 2θ, times the pixel's
solid angle, weighs them by the phantom's phase fractions at the true beam
position and adds a smooth background (air and amorphous scatter, growing
with the sample's thickness). Counts are Poisson of that, as uint32.

Frames default to 256 x 256 pixels of 150 µm (an Eiger read out 2x2-binned):
drawing Poisson noise is the simulator's dominant cost (about 3 ms a frame
here, 14 ms at 512 x 512), and the demo must stay within a minute on two cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from services.sim.detector import Acquisition, SimDetector
from services.sim.phantom import PHASES, Phantom
from services.physics.pyfai import integrator
from services.physics.powder import reflections, ring_profile, wavelength_A


@dataclass(frozen=True)
class XrdModel:
    energy_keV: float = 15.0
    pixels: int = 256
    pixel_m: float = 150e-6
    distance_m: float = 0.05
    poni_m: tuple[float, float] = (0.008, 0.008)  # the direct beam near a corner: rings out to ~40°
    ring_sigma_deg: float = 0.12
    ring_counts_per_photon: float = 2.0e-3  # into the whole detector, for a pure phase
    background_counts_per_photon: float = 2.0e-4
    background_per_um: float = 0.05  # amorphous scatter, relative, per µm of sample


@dataclass
class Eiger(SimDetector):
    phantom: Phantom
    stream: str = "eiger"
    model: XrdModel = field(default_factory=XrdModel)

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"image": ("<u4", (self.model.pixels, self.model.pixels))}

    def units(self) -> dict[str, str]:
        return {"image": "counts"}

    @cached_property
    def geometry(self) -> dict[str, Any]:
        """pyFAI's configuration of this detector's geometry (a PONI file's content)."""
        m = self.model
        detector = {"pixel1": m.pixel_m, "pixel2": m.pixel_m, "orientation": 3, "max_shape": [m.pixels, m.pixels]}
        ai = integrator({"poni_version": 2.1, "dist": m.distance_m, "poni1": m.poni_m[0], "poni2": m.poni_m[1],
                         "rot1": 0.0, "rot2": 0.0, "rot3": 0.0, "wavelength": wavelength_A(m.energy_keV) * 1e-10,
                         "detector": "Detector", "detector_config": detector})
        return json.loads(json.dumps(ai.get_config()))  # plain JSON types, as it travels in the document

    def metadata(self) -> dict[str, Any]:
        return {"kind": "eiger", "shape": [self.model.pixels] * 2, "photon_energy_keV": self.model.energy_keV,
                "geometry": self.geometry, "phases": [p.to_json() for p in PHASES]}

    @cached_property
    def templates(self) -> np.ndarray:
        """(phases + 1, pixels²) float32: expected counts per incident photon of
        each pure phase, and (last row) of the background per unit weight."""
        m = self.model
        ai = integrator(self.geometry)
        shape = (m.pixels, m.pixels)
        two_theta = ai.center_array(shape, unit="2th_rad")
        solid = ai.solidAngleArray(shape)
        sigma = np.radians(m.ring_sigma_deg)
        rows = []
        for phase in PHASES:
            rings = reflections(phase, wavelength_A(m.energy_keV), float(two_theta.max()) + 5 * sigma)
            image = ring_profile(two_theta, rings, sigma) * solid
            rows.append(image / image.sum() * m.ring_counts_per_photon)
        background = solid * (1 + 2 * np.cos(two_theta))  # falling with angle, like air scatter
        rows.append(background / background.sum() * m.background_counts_per_photon)
        return np.array(rows, dtype=np.float32).reshape(len(rows), -1)

    def expected(self, acq: Acquisition) -> np.ndarray:
        fractions = self.phantom.phase_fractions(acq.x, acq.y)
        amorphous = 1 + self.model.background_per_um * self.phantom.thickness(acq.x, acq.y)
        weights = np.concatenate([fractions, amorphous[:, None]], axis=1) * acq.photons[:, None]
        return (weights.astype(np.float32) @ self.templates).reshape(len(acq.index), self.model.pixels,
                                                                     self.model.pixels)

    def acquire(self, acq: Acquisition, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"image": rng.poisson(self.expected(acq)).astype(np.uint32)}
