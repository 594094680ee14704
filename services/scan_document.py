"""Building scan documents: the one place that knows how a StartScan document is laid out.

Every producer of scans builds its document here: the simulated beamline,
the plumbing profiles of the tests and benchmarks, the Bluesky adapter, and
later the Sardana recorder and the ingesters. Each brings its own parts
(which beamtime, which geometry, what its detectors record); this module
puts them together in the schema's order and validates the result with
:func:`services.scan.parse_scan`, so that a producer's mistake fails where it
is made rather than in every master it is sent to. ``services/scan.py`` is
the other half: it validates and reads documents.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

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
