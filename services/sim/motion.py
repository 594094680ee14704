"""Where the beam really was, and what the position sensors say about it.

A scan commands nominal positions (the geometry of the scan document). The
stage does not hit them exactly: the fast axis lags behind its command in the
direction of motion (following error, the classic zig-zag of snake scans) and
the whole stage drifts thermally. Every detector images the phantom at these
*true* positions.

Two sensors report positions, each with a known error model:

* ``encoders`` (motor side, absolute): scale error ``(1 + scale_error)``
  about the scan's start, backlash (half the dead band, signed by the
  direction of motion) and a linear drift with time;
* ``interferometer`` (sample side): the true position plus white noise of
  ``noise_um``, and now and then a lost reading (NaN, the laser lost its
  fringe count for one point), as real interferometers do.

The ``position`` processor turns the two into corrected positions; the demo
and the tests measure how much closer to the truth they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from services.scan_document import axis, line_geometry, raster_geometry
from services.sim.detector import Acquisition, SimDetector


@dataclass(frozen=True)
class ScanAxis:
    name: str
    start: float
    stop: float
    points: int
    units: str = "um"

    def to_json(self) -> dict[str, Any]:
        return axis(self.name, self.start, self.stop, self.points, self.units)


@dataclass(frozen=True)
class ScanPattern:
    """A raster (``slow`` given, optionally snake) or a line scan (``slow`` is
    None: the fast axis at ``line_y``), ``dwell_s`` per point."""

    fast: ScanAxis
    slow: ScanAxis | None = None
    snake: bool = False
    dwell_s: float = 0.01
    line_y: float = 0.0

    @property
    def points(self) -> int:
        return self.fast.points * (self.slow.points if self.slow else 1)

    @property
    def map_shape(self) -> tuple[int, ...]:
        return (self.slow.points, self.fast.points) if self.slow else (self.fast.points,)

    def geometry(self) -> dict[str, Any]:
        """The scan document's ``scan.geometry``."""
        if self.slow is None:
            return line_geometry(self.fast.to_json())
        return raster_geometry(self.fast.to_json(), self.slow.to_json(), self.snake)

    def nominal(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Commanded (x, y) and the fast axis' direction of motion (+1 / -1) per index."""
        fast = np.linspace(self.fast.start, self.fast.stop, self.fast.points)
        forward = 1.0 if self.fast.stop >= self.fast.start else -1.0
        direction = np.full(index.shape, forward)
        if self.slow is None:
            return fast[index], np.full(index.shape, self.line_y), direction
        rows, cols = np.divmod(index, self.fast.points)
        if self.snake:
            backwards = rows % 2 == 1
            cols = np.where(backwards, self.fast.points - 1 - cols, cols)
            direction = np.where(backwards, -forward, forward)
        slow = np.linspace(self.slow.start, self.slow.stop, self.slow.points)
        return fast[cols], slow[rows], direction


@dataclass(frozen=True)
class StageModel:
    """How the true sample position departs from the command."""

    lag_um: float = 0.08  # following error of the fast axis, against the direction of motion
    drift_um_per_s: tuple[float, float] = (0.002, 0.003)  # thermal drift of the stage (x, y)
    jitter_um: float = 0.004  # vibration, white


@dataclass(frozen=True)
class EncoderModel:
    scale_error: float = 0.004  # 0.4 %: a mis-set encoder resolution or cosine error
    backlash_um: float = 0.12  # dead band between motor and sample
    drift_um_per_s: float = 0.004  # the encoder reading walks with temperature


@dataclass(frozen=True)
class InterferometerModel:
    noise_um: float = 0.002
    dropout: float = 0.001  # fraction of points with a lost reading (NaN)


@dataclass(frozen=True)
class Trajectory:
    """Per acquisition index, for the whole scan: time, commanded and true
    positions, direction of the fast axis. Computed once per scan (a few
    arrays of the scan's length), so that every detector sees the same beam."""

    t: np.ndarray
    x_nominal: np.ndarray
    y_nominal: np.ndarray
    direction: np.ndarray
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def of(cls, pattern: ScanPattern, stage: StageModel, rng: np.random.Generator) -> "Trajectory":
        index = np.arange(pattern.points)
        t = index * pattern.dwell_s
        xn, yn, direction = pattern.nominal(index)
        jitter = rng.normal(0.0, stage.jitter_um, (2, pattern.points))
        x = xn - stage.lag_um * direction + stage.drift_um_per_s[0] * t + jitter[0]
        y = yn + stage.drift_um_per_s[1] * t + jitter[1]
        return cls(t, xn, yn, direction.astype(np.float64), x, y)


@dataclass
class Encoders(SimDetector):
    """Motor encoders of the two scanned axes (absolute, biased)."""

    stream: str = "encoders"
    axes: tuple[str, str] = ("samx", "samy")
    origin: tuple[float, float] = (0.0, 0.0)  # where the scale error pivots: the scan's start
    model: EncoderModel = field(default_factory=EncoderModel)

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {a: ("<f8", ()) for a in self.axes}

    def metadata(self) -> dict[str, Any]:
        return {"kind": "encoders", "axes": list(self.axes), "units": "um", "error_model": asdict(self.model)}

    def acquire(self, acq: Acquisition, rng: np.random.Generator) -> dict[str, np.ndarray]:
        m = self.model
        x = self.origin[0] + (1 + m.scale_error) * (acq.x - self.origin[0]) \
            + 0.5 * m.backlash_um * acq.direction + m.drift_um_per_s * acq.t
        # the slow axis only ever moves forward: its backlash is a constant offset
        y = self.origin[1] + (1 + m.scale_error) * (acq.y - self.origin[1]) \
            + 0.5 * m.backlash_um + m.drift_um_per_s * acq.t
        return {self.axes[0]: x, self.axes[1]: y}


@dataclass
class Interferometer(SimDetector):
    """Laser interferometers on the sample frame (precise, occasionally blind)."""

    stream: str = "interferometer"
    axes: tuple[str, str] = ("samx", "samy")
    model: InterferometerModel = field(default_factory=InterferometerModel)

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {a: ("<f8", ()) for a in self.axes}

    def metadata(self) -> dict[str, Any]:
        return {"kind": "interferometer", "axes": list(self.axes), "units": "um", "error_model": asdict(self.model)}

    def acquire(self, acq: Acquisition, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = len(acq.index)
        noise = rng.normal(0.0, self.model.noise_um, (2, n))
        lost = rng.random((2, n)) < self.model.dropout
        x = np.where(lost[0], np.nan, acq.x + noise[0])
        y = np.where(lost[1], np.nan, acq.y + noise[1])
        return {self.axes[0]: x, self.axes[1]: y}
