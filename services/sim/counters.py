"""The ``counters`` detector: what a PandABox or a scaler records per point.

Noise model (the tests' Pearson thresholds rest on it):

* ``i0`` (ion chamber) and ``it`` (transmission diode) are photon counts:
  Poisson of ``efficiency x photons`` (``it`` after the sample's absorption
  ``exp(-mu t)``, ``t`` the phantom's thickness);
* ``xeol`` (a photomultiplier counting luminescence of the NaCl phase) is
  Poisson of the photons it receives;
* ``xbic`` (photocurrent of the Si phase's junction, pA) has Gaussian
  amplifier noise of ``xbic_noise`` (relative);
* ``xbiv`` (open-circuit voltage, V) follows the diode law
  ``n V_T ln(1 + I / I_s)`` of the XBIC current, plus 50 µV of noise.

All four scale with the incident flux, which carries top-up jumps, decay and
jitter (see :class:`BeamModel`), so only the normalised signals map the sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from services.sim.detector import Acquisition, SimDetector
from services.sim.phantom import PHASES, Phantom


@dataclass(frozen=True)
class CounterModel:
    i0_efficiency: float = 2.0e-3  # ion chamber: counts per incident photon
    it_efficiency: float = 1.0e-3  # diode behind the sample (through an attenuator)
    mu_per_um: float = 0.06  # effective linear absorption of the sample, 1/µm
    xbic_pA_per_photon: float = 5.0e-8
    xbic_noise: float = 0.002
    xeol_per_photon: float = 2.0e-5
    ideality_vt_V: float = 0.035  # n V_T of the junction
    saturation_pA: float = 1.0


def xbic_efficiency(fractions: np.ndarray) -> np.ndarray:
    """Charge collection of the sample: high in the Si grains, low elsewhere."""
    return 0.2 + 0.8 * fractions[..., [p.name for p in PHASES].index("Si")]


def xeol_yield(fractions: np.ndarray) -> np.ndarray:
    """Luminescence yield: from the NaCl grains, a weak background elsewhere."""
    return 0.05 + fractions[..., [p.name for p in PHASES].index("NaCl")]


@dataclass
class Counters(SimDetector):
    phantom: Phantom
    stream: str = "counters"
    model: CounterModel = field(default_factory=CounterModel)

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {n: ("<f8", ()) for n in ("i0", "it", "xbic", "xeol", "xbiv")}

    def units(self) -> dict[str, str]:
        return {"i0": "counts", "it": "counts", "xbic": "pA", "xeol": "counts", "xbiv": "V"}

    def metadata(self) -> dict[str, Any]:
        return {"kind": "counters", "channels": {"i0": "ion chamber before the sample", "it": "diode after the sample",
                                                 "xbic": "beam-induced current", "xeol": "luminescence PMT",
                                                 "xbiv": "beam-induced voltage"},
                "model": asdict(self.model)}

    def acquire(self, acq: Acquisition, rng: np.random.Generator) -> dict[str, np.ndarray]:
        m = self.model
        n = acq.photons
        fractions = self.phantom.phase_fractions(acq.x, acq.y)
        transmitted = n * np.exp(-m.mu_per_um * self.phantom.thickness(acq.x, acq.y))
        xbic = n * m.xbic_pA_per_photon * xbic_efficiency(fractions)
        xbic = xbic * (1 + rng.normal(0.0, m.xbic_noise, xbic.shape))
        xbiv = m.ideality_vt_V * np.log1p(np.clip(xbic, 0, None) / m.saturation_pA) + rng.normal(0, 5e-5, xbic.shape)
        return {
            "i0": rng.poisson(n * m.i0_efficiency).astype(np.float64),
            "it": rng.poisson(transmitted * m.it_efficiency).astype(np.float64),
            "xbic": xbic,
            "xeol": rng.poisson(n * m.xeol_per_photon * xeol_yield(fractions)).astype(np.float64),
            "xbiv": xbiv,
        }
