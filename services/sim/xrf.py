"""The ``xspress3`` detector: one energy-dispersive XRF spectrum per point.

Model (per point, before noise), with ``N`` incident photons:

* characteristic lines of every phantom element: ``N Ω/4π ρ σ_line`` counts
  per line (``ρ`` the areal density, ``σ_line`` xraylib's Kissel fluorescence
  production cross section at the incident energy), each a Gaussian whose
  width follows Fano statistics plus electronic noise, integrated over the
  channel bins of the energy calibration;
* elastic (at the incident energy) and Compton (at 90°, Doppler-broadened)
  scatter and a continuum falling with energy, all proportional to the
  sample's thickness;
* counting: the detector's dead time is paralysable, ``OCR = ICR exp(-ICR τ)``;
  the spectrum is Poisson of the expected counts times the live fraction.
  ``icr`` and ``ocr`` (counts/s) are recorded as Xspress3 does, so the
  processor can correct for dead time.

Not modelled: escape and pile-up peaks, incomplete charge collection tails,
self-absorption of the emitted lines, detector window efficiency beyond a
smooth low-energy cut-off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from services.sim.detector import Acquisition, SimDetector
from services.sim.phantom import ELEMENTS, Phantom
from services.physics.xraylines import Calibration, Resolution, compton_keV, default_series, emission_lines, gaussian_counts


@dataclass(frozen=True)
class XrfModel:
    incident_keV: float = 15.0
    channels: int = 4096
    calibration: Calibration = Calibration(-0.012, 0.01)
    resolution: Resolution = Resolution()
    solid_angle_fraction: float = 0.1  # Ω / 4π
    scatter_angle_deg: float = 90.0
    elastic_per_photon_um: float = 1.0e-6  # elastic counts per incident photon per µm of sample
    compton_per_photon_um: float = 2.0e-6
    compton_sigma_keV: float = 0.15  # Doppler broadening
    continuum_per_photon_um: float = 2.0e-6
    dead_time_s: float = 1.0e-7


@dataclass
class Xspress3(SimDetector):
    phantom: Phantom
    stream: str = "xspress3"
    model: XrfModel = field(default_factory=XrfModel)

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"mca": ("<u4", (self.model.channels,)), "icr": ("<f8", ()), "ocr": ("<f8", ())}

    def units(self) -> dict[str, str]:
        return {"mca": "counts", "icr": "counts/s", "ocr": "counts/s"}

    def metadata(self) -> dict[str, Any]:
        m = self.model
        return {"kind": "xspress3", "channels": m.channels, "energy_calibration": m.calibration.to_json(),
                "resolution": asdict(m.resolution), "incident_energy_keV": m.incident_keV,
                "dead_time_s": m.dead_time_s, "solid_angle_fraction": m.solid_angle_fraction,
                "scatter_angle_deg": m.scatter_angle_deg,
                "elements": {e: default_series(e, m.incident_keV) for e in ELEMENTS}}

    @cached_property
    def responses(self) -> np.ndarray:
        """(elements + 1, channels): counts per incident photon for 1 µg/cm² of
        each element, and (last row) for 1 µm of matrix (scatter + continuum)."""
        m = self.model
        edges = m.calibration.edges(m.channels)
        rows = []
        for element in ELEMENTS:
            row = np.zeros(m.channels)
            for line in emission_lines(element, default_series(element, m.incident_keV), m.incident_keV):
                row += line.cross_section_cm2_g * 1e-6 * gaussian_counts(edges, line.energy_keV,
                                                                         float(m.resolution.sigma_keV(line.energy_keV)))
            rows.append(row * m.solid_angle_fraction)
        elastic_sigma = float(m.resolution.sigma_keV(m.incident_keV))
        matrix = m.elastic_per_photon_um * gaussian_counts(edges, m.incident_keV, elastic_sigma)
        compton = compton_keV(m.incident_keV, m.scatter_angle_deg)
        wide = float(np.hypot(m.resolution.sigma_keV(compton), m.compton_sigma_keV))
        matrix = matrix + m.compton_per_photon_um * gaussian_counts(edges, compton, wide)
        centres = 0.5 * (edges[1:] + edges[:-1])
        shape = np.where((centres > 0) & (centres < m.incident_keV),
                         np.exp(-centres / 4.0) * (1 - np.exp(-(np.clip(centres, 0, None) / 1.5) ** 3)), 0.0)
        matrix = matrix + m.continuum_per_photon_um * shape / shape.sum()
        rows.append(matrix)
        return np.array(rows)

    def expected(self, acq: Acquisition) -> np.ndarray:
        """(points, channels) expected counts without dead time or noise."""
        weights = np.stack([self.phantom.areal_density(e, acq.x, acq.y) for e in ELEMENTS]
                           + [self.phantom.thickness(acq.x, acq.y)], axis=-1)
        return (weights * acq.photons[:, None]) @ self.responses

    def acquire(self, acq: Acquisition, rng: np.random.Generator) -> dict[str, np.ndarray]:
        expected = self.expected(acq)
        icr = rng.poisson(expected.sum(axis=1)) / acq.dwell_s
        live = np.exp(-icr * self.model.dead_time_s)
        mca = rng.poisson(expected * live[:, None]).astype(np.uint32)
        return {"mca": mca, "icr": icr, "ocr": icr * live}
