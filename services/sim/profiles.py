"""Plumbing profiles: cheap, deterministic streams that exercise the mesh, not the science.

The pipeline tests and benchmarks need data whose every result can be
recomputed (``counters``: :func:`expected_counters`) or whose only job is to
be bulky (``counterset``, ``spectra``, ``frames``: fixed noise, generated
once). A :class:`Profile` says which streams exist and what one pipeline
does with them; a :class:`ProfileScan` is one scan of it, with the methods
the scan driver (``services/ops/driver.py``, ``ScanData``) sends from. The
simulated beamline with real physics is ``services/sim/sims.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from services.compression import BSLZ4, CompressedFrames

from services.scan_document import (axis, line_geometry, pipeline_analysis, raster_geometry, scan_document,
                                    stream_declaration)

StreamArrays = dict[str, dict[str, tuple[str, tuple[int, ...]]]]  # stream -> array -> (dtype, per-point shape)
Values = Callable[[str, np.ndarray], dict[str, np.ndarray]]  # (stream, indices) -> arrays
STEP_UM = 0.05  # nominal step of the default geometries


@dataclass(frozen=True)
class Profile:
    """Streams of a simulated beamline and what one pipeline does with them."""

    streams: StreamArrays
    processor: str
    settings: dict[str, Any]
    values: Values


def counter_values(stream: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Deterministic counter readings, so that tests can recompute every result."""
    i = idx.astype(np.float64)
    i0 = 1.0e5 + (idx % 97)
    if stream == "pandabox":
        return {"samx_enc": (idx % 100) * 0.05, "samy_enc": (idx // 100) * 0.05, "t": i * 1e-3}
    if stream == "scaler":
        return {"i0": i0, "i1": 0.5 * i0 + (idx % 13)}
    if stream == "diode":
        return {"diode": 0.25 * i0 + (idx % 7)}
    raise KeyError(stream)


def noise_values(streams: StreamArrays) -> Values:
    """Fixed pseudo-random content for bulky arrays: generated once per block length, reused for every block."""
    cache: dict[tuple[str, str, int], np.ndarray] = {}

    def values(stream: str, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, (dtype, shape) in streams[stream].items():
            key = (stream, name, len(idx))
            if key not in cache:
                rng = np.random.default_rng(len(idx))
                cache[key] = rng.integers(0, 50, size=(len(idx), *shape)).astype(dtype)
            out[name] = cache[key]
        if "t" in streams[stream]:
            out["t"] = idx * 1e-3
        return out

    return values


COUNTER_SET = {"counters": {n: ("<f8", ()) for n in
                             ("i0", "i1", "it", "diode", "samx_enc", "samy_enc", "samz_enc", "energy", "t")}}
COUNTER_STREAMS = {
    "pandabox": {"samx_enc": ("<f8", ()), "samy_enc": ("<f8", ()), "t": ("<f8", ())},
    "scaler": {"i0": ("<f8", ()), "i1": ("<f8", ())},
    "diode": {"diode": ("<f8", ())},
}
SPECTRUM_STREAMS = {"xspress3": {"mca": ("<u4", (4096,))}, "scaler": {"i0": ("<f8", ()), "t": ("<f8", ())}}
FRAME_STREAMS = {"eiger": {"image": ("<u2", (1024, 2048))}, "scaler": {"i0": ("<f8", ()), "t": ("<f8", ())}}

def compressed_frames(shape: tuple[int, int] = (1024, 2048), codec: str = BSLZ4) -> Profile:
    """The ``frames`` profile with the EIGER's frames compressed as the detector
    sends them (services/compression.py): they travel so up to the worker.
    The plain frames are ``noise_values`` of the same streams."""
    streams = {**FRAME_STREAMS, "eiger": {"image": ("<u2", shape)}}
    plain = noise_values(streams)
    packed: dict[int, CompressedFrames] = {}  # the detector compresses, not the source: once per block length

    def values(stream: str, idx: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = plain(stream, idx)
        if stream == "eiger":
            if len(idx) not in packed:
                packed[len(idx)] = CompressedFrames.compress(out["image"], codec)
            out["image"] = packed[len(idx)]
        return out

    return Profile(streams, "passthrough", {"arrays": ["scaler/i0"]}, values)


#: xrd settings for FRAME_STREAMS' 1024 x 2048 frames: a 75 µm-pixel detector 10 cm from
#: the sample, the beam at the middle of one long edge, 15 keV (pyFAI's config, plain JSON).
XRD_SETTINGS = {"detector": "eiger", "npt_radial": 1000, "unit": "2th_deg", "geometry": {
    "poni_version": 2.1, "detector": "Detector", "dist": 0.1, "poni1": 0.0, "poni2": 0.0768, "rot1": 0.0,
    "rot2": 0.0, "rot3": 0.0, "wavelength": 0.8266e-10,
    "detector_config": {"pixel1": 75e-6, "pixel2": 75e-6, "max_shape": [1024, 2048], "orientation": 3}}}

PROFILES: dict[str, Profile] = {
    "counters": Profile(COUNTER_STREAMS, "counters",
                        {"counters": ["i1", "diode"], "normalise_by": "i0"}, counter_values),
    "counterset": Profile(COUNTER_SET, "passthrough", {"arrays": ["counters/t"]}, noise_values(COUNTER_SET)),
    "spectra": Profile(SPECTRUM_STREAMS, "passthrough", {"arrays": ["scaler/i0"]}, noise_values(SPECTRUM_STREAMS)),
    "frames": Profile(FRAME_STREAMS, "passthrough", {"arrays": ["scaler/i0"]}, noise_values(FRAME_STREAMS)),
    "frames-bslz4": compressed_frames(),
    # the same frames integrated by pyFAI, plain and as the detector sends them: what compression costs and saves
    "frames-xrd": Profile(FRAME_STREAMS, "xrd", XRD_SETTINGS, noise_values(FRAME_STREAMS)),
    "frames-xrd-bslz4": dataclasses.replace(compressed_frames(), processor="xrd", settings=XRD_SETTINGS),
}

BEAMTIME = {"id": "sim", "beamline": "SIM", "paths": {"raw": "/tmp/sim/raw", "processed": "processed"}}


def expected_counters(idx: np.ndarray) -> dict[str, np.ndarray]:
    """What the ``counters`` processor must deliver for the ``counters`` profile."""
    v = {**counter_values("scaler", idx), **counter_values("diode", idx)}
    total = v["i1"] + v["diode"]
    return {"i0": v["i0"], "i1": v["i1"], "diode": v["diode"], "sum": total,
            "i1_norm": v["i1"] / v["i0"], "diode_norm": v["diode"] / v["i0"], "sum_norm": total / v["i0"]}


def default_geometry(points: int) -> dict[str, Any]:
    """A raster when ``points`` factors nicely (100 x 100 for 10,000), a line otherwise."""
    cols = next((c for c in range(int(math.isqrt(points)), 0, -1) if points % c == 0), 1)
    rows = points // cols
    if cols > 1 and rows > 1:
        return raster_geometry(axis("samx", 0.0, STEP_UM * (rows - 1), rows, "um"),
                               axis("samy", 0.0, STEP_UM * (cols - 1), cols, "um"))
    return line_geometry(axis("samx", 0.0, STEP_UM * max(points - 1, 1), points, "um"))


@dataclass(frozen=True)
class ProfileScan:
    """One scan of a profile through one pipeline: what the scan driver sends.

    ``streams`` limits the profile's streams; ``analysis`` overrides entries
    of the pipeline's analysis section (e.g. ``{"settings": {...}}``);
    ``geometry`` replaces the default one (its points must be ``points``).
    """

    profile: Profile
    pipeline: str
    points: int
    geometry: dict[str, Any] | None = None
    analysis: dict[str, Any] | None = None
    streams: tuple[str, ...] | list[str] | None = None

    @property
    def pipelines(self) -> tuple[str, ...]:
        return (self.pipeline,)

    def streams_of(self, pipeline: str) -> tuple[str, ...]:
        if pipeline != self.pipeline:
            raise KeyError(pipeline)
        return tuple(self.streams or self.profile.streams)

    def document(self, scan_id: str, number: int, command: str | None = None,
                 pipelines: list[str] | None = None) -> dict[str, Any]:
        """A complete, valid scan document (``pipelines``: this scan's one pipeline at most)."""
        if pipelines is not None and list(pipelines) != [self.pipeline]:
            raise ValueError(f"a profile scan feeds pipeline {self.pipeline} only, not {pipelines}")
        chosen = list(self.streams_of(self.pipeline))
        geometry = copy.deepcopy(self.geometry) if self.geometry is not None else default_geometry(self.points)
        entry = {**pipeline_analysis(self.profile.processor, self.profile.settings, chosen), **(self.analysis or {})}
        return scan_document(
            beamtime=copy.deepcopy(BEAMTIME), scan_id=scan_id, number=number,
            command=command or f"tangomesh scan --sim ({self.points} points)", geometry=geometry,
            sample={"name": "simulated"}, acquisition={"detectors": {s: {} for s in chosen}}, devices={},
            analysis={self.pipeline: entry}, streams={s: stream_declaration(self.profile.streams[s]) for s in chosen})

    def arrays(self, stream: str, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.profile.values(stream, np.arange(start, stop))
