"""Scan documents and small drivers that several test modules share.

``minimal``/``raster``/``axis`` build hand-written documents (what an
integrator would send); ``profile_document`` one from a plumbing profile, as
the scan driver would; ``run_pipeline`` runs a processor over a simulated scan
without any service, in units, the results placed in map shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.processors import Batch
from services.placement import cells
from services.scan import ScanMeta, parse_scan
from services.sim.profiles import PROFILES, ProfileScan


def axis(name: str, points: int, start: float = 0.0, stop: float = 1.0, units: str = "um") -> dict:
    return {"name": name, "units": units, "start": start, "stop": stop, "points": points}


def minimal(geometry: dict) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "beamtime": {"id": "11012345", "beamline": "P06",
                     "paths": {"raw": "/data/raw", "processed": "processed/scan_1"}},
        "scan": {"id": "scan-1", "number": 1, "command": "ascan samx 0 1 10 0.1", "geometry": geometry},
        "sample": {"name": "foil"},
        "acquisition": {"detectors": {}},
        "devices": {},
        "analysis": {"counters": {"processor": "counters"}},
    }


def raster(n_fast: int, n_slow: int, snake: bool = False) -> ScanMeta:
    return parse_scan(minimal({"type": "raster", "axes": [axis("samx", n_fast), axis("samy", n_slow)],
                               "snake": snake}))


def profile_document(scan_id: str, number: int, points: int, pipeline: str, profile: str = "counters",
                     geometry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The document the scan driver sends for a plumbing profile's scan."""
    return ProfileScan(PROFILES[profile], pipeline, points, geometry=geometry).document(scan_id, number)


def run_pipeline(sim, pipeline: str, processor, unit: int = 100) -> dict[str, np.ndarray]:
    """Every point through ``processor`` in units of ``unit`` events, results in map shape
    (plus their per-point shape)."""
    meta = parse_scan(sim.document("sim-unit", 1))
    processor.start_scan(meta, sim.pipelines[pipeline].settings)
    chunks = []
    for start in range(0, meta.points, unit):
        stop = min(meta.points, start + unit)
        arrays = {f"{s}/{n}": a for s in sim.streams_of(pipeline) for n, a in sim.arrays(s, start, stop).items()}
        chunks.append(processor.process(Batch(meta, start, stop - start, arrays)))
    where = cells(meta, np.arange(meta.points))
    out = {}
    for name in chunks[0]:
        values = np.concatenate([c[name] for c in chunks]).astype(np.float64)
        grid = np.empty((meta.points, *values.shape[1:]))
        grid[where] = values
        out[name] = grid.reshape(*meta.map_shape, *values.shape[1:])
    return out
