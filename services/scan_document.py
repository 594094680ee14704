"""Building scan documents: the one place that knows how a StartScan document is laid out.

Every producer of scans builds its document here: the simulated beamline,
the plumbing profiles of the tests and benchmarks, the Bluesky adapter, the
Sardana recorder, and later the ingesters. Each brings its own parts
(which beamtime, which geometry, what its detectors record); this module
puts them together in the schema's order and validates the result with
:func:`services.scan.parse_scan`, so that a producer's mistake fails where it
is made rather than in every master it is sent to. ``services/scan.py`` is
the other half: it validates and reads documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from services.scan import parse_scan

SCHEMA_VERSION = 1

#: array name -> (dtype string, per-point shape): what a stream sends per point.
ArraySpecs = Mapping[str, tuple[str, tuple[int, ...]]]


def axis(name: str, start: float, stop: float, points: int, units: str = "") -> dict[str, Any]:
    """One scanned axis with nominal positions ``linspace(start, stop, points)``."""
    return {"name": name, "units": units, "start": start, "stop": stop, "points": points}


def raster_geometry(fast: dict[str, Any], slow: dict[str, Any], snake: bool = False) -> dict[str, Any]:
    """A 2-D map, fast axis first (the map's columns), the slow one second (its rows)."""
    return {"type": "raster", "snake": snake, "axes": [fast, slow]}


def line_geometry(scanned: dict[str, Any]) -> dict[str, Any]:
    """A 1-D scan of one axis."""
    return {"type": "line", "axes": [scanned]}


def points_geometry(count: int, axes: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """A time series or any list of spots; ``axes`` name the motors that move (positions come with the data)."""
    return {"type": "points", "points": count, "axes": list(axes)}


def stream_declaration(arrays: ArraySpecs, units: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A stream's declaration (``streams.<name>``): dtype and shape per array, units where known."""
    units = units or {}
    return {"arrays": {name: {"dtype": dtype, "shape": list(shape), **({"units": units[name]} if units.get(name) else {})}
                       for name, (dtype, shape) in arrays.items()}}


def pipeline_analysis(processor: str, settings: Mapping[str, Any], streams: Iterable[str]) -> dict[str, Any]:
    """One pipeline's ``analysis`` entry: which processor, its settings, the streams it takes."""
    return {"processor": processor, "settings": settings, "streams": list(streams)}


def start_time(seconds: float | None = None) -> str:
    """ISO 8601 in UTC to the millisecond, of ``seconds`` since the epoch (default: now)."""
    when = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return when.isoformat(timespec="milliseconds")


def scan_document(*, beamtime: Mapping[str, Any], scan_id: str, number: int, command: str,
                  geometry: Mapping[str, Any], sample: Mapping[str, Any], acquisition: Mapping[str, Any],
                  devices: Mapping[str, Any], analysis: Mapping[str, Any], streams: Mapping[str, Any] | None = None,
                  name: str | None = None, started: str | None = None,
                  user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A complete scan document from its parts, validated (``ScanError`` names what is wrong).

    ``name`` and ``started`` (``scan.start_time``, see :func:`start_time`) are
    left out when not given, as are ``streams`` and ``user``. The parts are
    used as given, not copied: build them fresh for each document.
    """
    scan: dict[str, Any] = {"id": scan_id, "number": number}
    if name is not None:
        scan["name"] = name
    scan["command"] = command
    if started is not None:
        scan["start_time"] = started
    scan["geometry"] = geometry
    document: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "beamtime": beamtime, "scan": scan,
                                "sample": sample, "acquisition": acquisition, "devices": devices,
                                "analysis": analysis}
    if streams is not None:
        document["streams"] = streams
    if user is not None:
        document["user"] = user
    parse_scan(document, allow_absolute=True)  # whether absolute paths are trusted is each deployment's choice
    return document


# ---------------------------------------------------------------- what control systems share
# The Bluesky adapter and the Sardana recorder map their own vocabularies onto
# the document with these: one rule for the geometry of a scan's motion, for
# the sample, the beamtime, dtypes and values that are not plain JSON.

#: Control-system dtype names (Bluesky's data-key dtypes, Sardana's column dtypes) -> wire dtype.
_DTYPE_WORDS = {"number": "<f8", "integer": "<i8", "boolean": "|b1", "bool": "|b1", "float": "<f8", "int": "<i8"}


def wire_dtype(kind: str | None) -> str | None:
    """The canonical numeric dtype for a control system's dtype name (``number``,
    ``float64``, ``int32``, ``bool``...), or None for what is not numeric (strings, objects)."""
    if not kind:
        return None
    if kind in _DTYPE_WORDS:
        return _DTYPE_WORDS[kind]
    try:
        dtype = np.dtype(kind)
    except (TypeError, ValueError):
        return None
    return dtype.str if dtype.kind in "biuf" else None


def json_safe(value: Any) -> Any:
    """Plain JSON of what control systems hold: tuples, numpy scalars and arrays, datetimes (as text)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def sample_part(value: Any) -> dict[str, Any]:
    """The ``sample`` section: a mapping with a ``name`` is kept (made plain JSON),
    anything else becomes ``{"name": str(value)}`` (``"unknown"`` when empty)."""
    if isinstance(value, Mapping) and value.get("name"):
        return {**json_safe(dict(value)), "name": str(value["name"])}
    if isinstance(value, Mapping) or value is None or value == "":
        return {"name": "unknown"}
    return {"name": str(value)}


def beamtime_part(defaults: Mapping[str, Any], **given: Any) -> dict[str, Any]:
    """The ``beamtime`` section: ``defaults`` (the adapter's configuration)
    overridden by what the control system says for this scan (``id``,
    ``beamline``, ``proposal``; empty values are ignored), as strings."""
    out = json_safe(dict(defaults))
    for key, value in given.items():
        if value not in (None, ""):
            out[key] = str(value)
    return out


@dataclass(frozen=True)
class Scanned:
    """One motor's nominal trajectory as the control system planned it."""

    name: str
    start: float
    stop: float
    points: int  # positions, not intervals (Sardana's nr_interv + 1)
    units: str = ""

    def axis(self) -> dict[str, Any]:
        return axis(self.name, float(self.start), float(self.stop), int(self.points), self.units)


GRID, LINE, POINTS = "grid", "line", "points"


def motion_geometry(pattern: str, points: int, scanned: Sequence[Scanned] = (), snake: bool = False,
                    moving: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The geometry of a scan from what its control system planned.

    ``grid``: two motors, ``scanned`` as ``[fast, slow]`` (the caller puts the
    fast one first: Sardana's ``mesh`` lists it first, Bluesky's
    ``grid_scan`` last), ``snake`` when odd rows run backwards: a raster.
    ``line``: one motor, evenly spaced: a line. Anything else (several motors
    in step, lists of positions, time scans): ``points`` with the names of the
    ``moving`` motors (``{"name", "units"}``); the measured positions come with the data.
    ValueError when the parts do not fit (a grid whose size is not ``points``)."""
    if points < 1:
        raise ValueError("the number of points is not known at scan start; the mesh needs it")
    if pattern == GRID:
        if len(scanned) != 2:
            raise ValueError(f"a grid scan needs two scanned motors, got {len(scanned)}")
        fast, slow = scanned
        if fast.points * slow.points != points:
            raise ValueError(f"grid {fast.name} x {slow.name}: {fast.points} x {slow.points} positions "
                             f"are not the scan's {points} points")
        return raster_geometry(fast.axis(), slow.axis(), snake=bool(snake))
    if pattern == LINE:
        if len(scanned) != 1 or scanned[0].points != points:
            raise ValueError(f"a line scan needs one scanned motor with the scan's {points} points")
        return line_geometry(scanned[0].axis())
    return points_geometry(points, ({"name": str(m["name"]), "units": str(m.get("units", "") or "")}
                                    for m in moving))
