"""What every simulated detector is, and the beam they all share.

A simulated detector is one data-plane stream. It declares its arrays (the
scan document's ``streams`` entry), its settings (``acquisition.detectors``)
and turns an :class:`Acquisition` (a block of consecutive points: where the
beam really was, and how many photons it brought) into arrays with a leading
point axis. Its random numbers come from a generator the caller seeds per
(scan seed, stream, block start), so any block can be regenerated alone and
the same seed gives the same bytes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.scan_document import stream_declaration


@dataclass(frozen=True)
class Acquisition:
    """A block of consecutive points as the sample saw them."""

    index: np.ndarray  # acquisition indices
    t: np.ndarray  # seconds since the scan started
    x: np.ndarray  # true beam position on the sample, µm
    y: np.ndarray
    direction: np.ndarray  # +1 / -1: the fast axis' direction of motion
    photons: np.ndarray  # incident photons during the point (the I0 truth)
    dwell_s: float  # exposure per point


class SimDetector:
    """Base of the simulated detectors; subclasses are dataclasses with a ``stream`` field."""

    stream: str

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """array name -> (dtype, per-point shape)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """Settings as a control system would record them for the scan."""
        raise NotImplementedError

    def acquire(self, acq: Acquisition, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def units(self) -> dict[str, str]:
        """array name -> units, where they mean something."""
        return {}

    def stream_spec(self) -> dict[str, Any]:
        """This stream's entry in the scan document's ``streams``."""
        return stream_declaration(self.arrays(), self.units())


def block_rng(seed: int, stream: str, start: int) -> np.random.Generator:
    """The generator for one block: independent of the order blocks are made in."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), start])


@dataclass(frozen=True)
class BeamModel:
    """Incident flux at the sample: a storage ring in top-up mode behind a
    monochromator. The ring current decays with ``lifetime_s`` and is topped
    up every ``topup_s`` (a jump back to the nominal current); the optics add
    a slow oscillation (a vibrating mirror) and point-to-point jitter. The I0
    counter sees all of it; normalised signals must not."""

    photons_per_s: float = 2.0e10
    lifetime_s: float = 3600.0
    topup_s: float = 12.0
    oscillation: float = 0.01  # relative amplitude
    oscillation_hz: float = 0.3
    jitter: float = 0.005  # relative, per point

    def photons(self, t: np.ndarray, dwell_s: float, rng: np.random.Generator) -> np.ndarray:
        since_topup = np.mod(t, self.topup_s)
        ring = np.exp(-since_topup / self.lifetime_s)
        optics = 1 + self.oscillation * np.sin(2 * np.pi * self.oscillation_hz * t)
        jitter = 1 + rng.normal(0.0, self.jitter, t.shape)
        return self.photons_per_s * dwell_s * ring * optics * jitter
