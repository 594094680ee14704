"""The simulated beamline's scans: which detectors, which pipelines, what metadata.

``Simulation`` ties a scan pattern, the phantom, the beam and stage models
and a set of detectors together. It writes the StartScan document a control
system would send (beamtime, scan, sample, acquisition with every detector's
settings, a device snapshot, analysis settings per pipeline, stream
declarations) and produces any stream's arrays for any range of points,
deterministically from its seed: it is the ``ScanData`` the scan driver
(``services/ops/driver.py``) sends.

Catalogue (``tangomesh scan --sim NAME``):

=========  =====================================================  ==================
name       detectors                                              pipelines
=========  =====================================================  ==================
counters   counters, encoders, interferometer                     counters, position
xrf        + xspress3                                             + xrf
xrd        + eiger                                                + xrd
dpc        + dpc                                                  + dpc
full       all of them                                            all of them
=========  =====================================================  ==================

The modality pipelines take the ``counters`` stream too, for I0 normalisation
(a PandABox feeding several consumers): the simulator sends it to each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from services.sim.counters import Counters
from services.sim.detector import Acquisition, BeamModel, SimDetector, block_rng
from services.sim.dpc import Dpc, shift_px_per_rad_per_um
from services.sim.motion import Encoders, Interferometer, ScanAxis, ScanPattern, StageModel, Trajectory
from services.sim.phantom import ELEMENTS, PHASES, Phantom, make_phantom
from services.sim.xrd import Eiger, XrdModel
from services.sim.xrf import Xspress3
from services.placement import blocks, place
from services.scan import parse_scan
from services.scan_document import pipeline_analysis, scan_document, start_time

SIM_NAMES = ("counters", "xrf", "xrd", "dpc", "full")
MODALITIES = ("xrf", "xrd", "dpc")  # pipelines beyond counters and position
GENERATION_POINTS = 16  # points generated together (random streams are keyed by these blocks)
MARGIN_UM = 2.0  # the scanned field stays this far inside the phantom


@dataclass(frozen=True)
class PipelinePlan:
    """What one pipeline does with the simulated scan."""

    name: str
    processor: str
    settings: dict[str, Any]
    streams: tuple[str, ...]

    def analysis(self) -> dict[str, Any]:
        return pipeline_analysis(self.processor, self.settings, self.streams)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"60x40"`` -> (60, 40) (fast x slow points), ``"500"`` -> (500,) for a line."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} is not NX or NXxNY") from None
    if not 1 <= len(shape) <= 2 or min(shape) < 1 or (len(shape) == 2 and min(shape) < 2):
        raise ValueError(f"shape {text!r}: a line needs N >= 1 points, a raster NXxNY with both >= 2")
    return shape


@dataclass
class Simulation:
    name: str
    pattern: ScanPattern
    seed: int = 0
    phantom: Phantom = field(default_factory=make_phantom)
    beam: BeamModel = field(default_factory=BeamModel)
    stage: StageModel = field(default_factory=StageModel)
    detectors: dict[str, SimDetector] = field(default_factory=dict)
    pipelines: dict[str, PipelinePlan] = field(default_factory=dict)
    _cache: dict[str, tuple[int, dict[str, np.ndarray]]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------ the truth
    @cached_property
    def trajectory(self) -> Trajectory:
        return Trajectory.of(self.pattern, self.stage, block_rng(self.seed, "stage", 0))

    @cached_property
    def photons(self) -> np.ndarray:
        return self.beam.photons(self.trajectory.t, self.pattern.dwell_s, block_rng(self.seed, "beam", 0))

    def acquisition(self, start: int, stop: int) -> Acquisition:
        tr, s = self.trajectory, slice(start, stop)
        return Acquisition(np.arange(start, stop), tr.t[s], tr.x[s], tr.y[s], tr.direction[s], self.photons[s],
                           self.pattern.dwell_s)

    def truth(self) -> dict[str, np.ndarray]:
        """The phantom at every point's true position, and those positions
        (``x_um``, ``y_um``), in map shape."""
        tr = self.trajectory
        meta = parse_scan(self.document("truth", 0))
        parts = blocks(meta, 0, meta.points)
        out = {}
        values_at_points = {**self.phantom.truth(tr.x, tr.y), "x_um": tr.x, "y_um": tr.y}
        for name, values in values_at_points.items():
            grid = np.empty(meta.map_shape)
            place(grid, parts, values)
            out[name] = grid
        return out

    # ------------------------------------------------------------ data
    def arrays(self, stream: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """``stream``'s arrays for points [start, stop): the same bytes however
        the range is cut, because generation runs in fixed aligned blocks."""
        detector = self.detectors[stream]
        parts: list[dict[str, np.ndarray]] = []
        first = start - start % GENERATION_POINTS
        for block in range(first, stop, GENERATION_POINTS):
            cached = self._cache.get(stream)
            if cached is None or cached[0] != block:
                end = min(block + GENERATION_POINTS, self.pattern.points)
                cached = (block, detector.acquire(self.acquisition(block, end), block_rng(self.seed, stream, block)))
                self._cache[stream] = cached
            lo, hi = max(start, block) - block, min(stop, block + GENERATION_POINTS) - block
            parts.append({n: a[lo:hi] for n, a in cached[1].items()})
        if len(parts) == 1:
            return parts[0]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def truth_on_grid(self) -> dict[str, np.ndarray]:
        """The phantom at the nominal grid nodes: what a regridded map should show."""
        grid_x = np.linspace(self.pattern.fast.start, self.pattern.fast.stop, self.pattern.fast.points)
        if self.pattern.slow is None:
            return self.phantom.truth(grid_x, np.full_like(grid_x, self.pattern.line_y))
        grid_y = np.linspace(self.pattern.slow.start, self.pattern.slow.stop, self.pattern.slow.points)
        gx, gy = np.meshgrid(grid_x, grid_y)
        return self.phantom.truth(gx, gy)

    def streams_of(self, pipeline: str) -> tuple[str, ...]:
        return self.pipelines[pipeline].streams

    @property
    def points(self) -> int:
        return self.pattern.points

    # ------------------------------------------------------------ metadata
    def document(self, scan_id: str, number: int, command: str | None = None,
                 pipelines: list[str] | None = None) -> dict[str, Any]:
        """The StartScan document; ``pipelines`` limits the analysis section
        (every master gets the same document: it takes its own entry)."""
        chosen = pipelines or list(self.pipelines)
        streams = sorted({s for p in chosen for s in self.pipelines[p].streams})
        p = self.pattern
        return scan_document(
            beamtime={"id": "sim", "beamline": "SIM-NANO", "proposal": "simulated",
                      "paths": {"raw": "raw/sim", "processed": "processed"}},
            scan_id=scan_id, number=number, name=f"{self.name}_{number:05d}",
            command=command or f"tangomesh scan --sim {self.name}", started=start_time(),
            geometry=p.geometry(),
            sample={"name": f"phantom-{self.seed}",
                    "description": f"tangomesh phantom, seed {self.seed}, {self.phantom.size_um:g} um field: "
                                   f"elements {', '.join(ELEMENTS)}; phases {', '.join(ph.name for ph in PHASES)}",
                    "seed": self.seed},
            acquisition={"dwell_s": p.dwell_s, "rate_hz": 1.0 / p.dwell_s, "energy_keV": 15.0, "mode": "step",
                         "trigger": "simulated", "detectors": {s: self.detectors[s].metadata() for s in streams}},
            devices={
                "samx": {"position": p.fast.start, "units": "um"},
                "samy": {"position": p.slow.start if p.slow else p.line_y, "units": "um"},
                "dcm_energy": {"position": 15.0, "units": "keV"},
                "ring_current": {"value": 100.0, "units": "mA", "mode": f"top-up every {self.beam.topup_s:g} s"},
                "flux": {"value": self.beam.photons_per_s, "units": "ph/s"},
            },
            analysis={name: self.pipelines[name].analysis() for name in chosen},
            streams={s: self.detectors[s].stream_spec() for s in streams},
            user={"simulated": True, "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def make_simulation(name: str, shape: tuple[int, ...] = (60, 40), snake: bool = False, dwell_s: float = 0.01,
                    seed: int = 0, xrd_pixels: int = 256) -> Simulation:
    """One of the catalogue's scans over the phantom's field of view."""
    if name not in SIM_NAMES:
        raise ValueError(f"unknown simulation {name!r} (known: {', '.join(SIM_NAMES)})")
    if not dwell_s > 0:
        raise ValueError("dwell must be positive")
    phantom = make_phantom(seed)
    lo, hi = MARGIN_UM, phantom.size_um - MARGIN_UM
    fast = ScanAxis("samx", lo, hi, shape[0])
    slow = ScanAxis("samy", lo, hi, shape[1]) if len(shape) == 2 else None
    pattern = ScanPattern(fast, slow, snake and slow is not None, dwell_s, line_y=phantom.size_um / 2)
    detectors: dict[str, SimDetector] = {
        "counters": Counters(phantom),
        "encoders": Encoders(origin=(fast.start, slow.start if slow else pattern.line_y)),
        "interferometer": Interferometer(),
    }
    pipelines = {
        "counters": PipelinePlan("counters", "counters", {
            "counters": ["it", "xbic", "xeol", "xbiv"], "normalise_by": "i0", "transmission": "it", "sum": False,
            "not_normalised": ["xbiv"]}, ("counters",)),
        "position": PipelinePlan("position", "position", {"axes": {
            axis: {"encoder": f"encoders/{axis}", "interferometer": f"interferometer/{axis}"}
            for axis in ("samx", "samy")}}, ("encoders", "interferometer")),
    }
    wanted = MODALITIES if name == "full" else (name,)
    if "xrf" in wanted:
        xrf = Xspress3(phantom)
        detectors["xspress3"] = xrf
        pipelines["xrf"] = PipelinePlan("xrf", "xrf", {
            "detector": "xspress3", "elements": xrf.metadata()["elements"],
            "energy_calibration": xrf.model.calibration.to_json(),
            "resolution": {"noise_fwhm_keV": xrf.model.resolution.noise_fwhm_keV, "fano": xrf.model.resolution.fano},
            "incident_energy_keV": xrf.model.incident_keV, "normalise_by": "counters/i0"},
            ("xspress3", "counters"))
    if "xrd" in wanted:
        eiger = Eiger(phantom, model=XrdModel(pixels=xrd_pixels))
        detectors["eiger"] = eiger
        pipelines["xrd"] = PipelinePlan("xrd", "xrd", {
            "detector": "eiger", "geometry": eiger.geometry, "npt_radial": 1000, "unit": "2th_deg",
            "phases": [ph.to_json() for ph in PHASES], "normalise_by": "counters/i0"}, ("eiger", "counters"))
    if "dpc" in wanted:
        dpc = Dpc(phantom)
        detectors["dpc"] = dpc
        pipelines["dpc"] = PipelinePlan("dpc", "dpc", {
            "detector": "dpc", "method": "com", "pixel_size_m": dpc.model.pixel_m,
            "distance_m": dpc.model.distance_m, "wavelength_m": dpc.metadata()["wavelength_m"],
            "shift_px_per_rad_per_um": shift_px_per_rad_per_um(dpc.model), "normalise_by": "counters/i0"},
            ("dpc", "counters"))
    return Simulation(name, pattern, seed, phantom, detectors=detectors, pipelines=pipelines)
