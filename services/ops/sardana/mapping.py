"""Sardana's view of a scan -> the mesh's scan document and blocks (Tango-free, Sardana-free).

The recorder (``recorders/tangomesh_recorder.py``) reads what Sardana knows at
``_startRecordList`` into a :class:`SardanaScan` (plain data, see
:func:`services.ops.sardana.feed.describe`); this module turns it into the
StartScan document with the kit's builder (``services/scan_document.py``, the
same geometry, sample and beamtime rules as the Bluesky adapter) and each
record into the arrays of one point of the ``sardana`` stream. docs/sardana.md
has the field-by-field table.

The scientist's choices come from the MacroServer environment (``senv``):

``TangoMeshAnalysis`` (required)
    pipeline -> ``{"processor", "settings", "streams"?, "affinity"?}``: the
    scan document's ``analysis`` section; its keys are the pipelines the scan
    runs on.
``TangoMeshBeamtime``
    ``{"id", "beamline", "proposal"?, "paths": {"raw", "processed"}}``.
``TangoMeshManager``, ``TangoMeshHost``, ``TangoMeshStream``
    the topology manager's device, the address the stream is served on, the
    stream's name (default ``sardana``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import numpy as np

from services.registration import DEFAULT_TOPOLOGY_DEVICE
from services.scan_document import (Scanned, beamtime_part, json_safe, motion_geometry, sample_part, scan_document,
                                    start_time, stream_declaration)

ENV_ANALYSIS = "TangoMeshAnalysis"
ENV_BEAMTIME = "TangoMeshBeamtime"
ENV_MANAGER = "TangoMeshManager"
ENV_HOST = "TangoMeshHost"
ENV_STREAM = "TangoMeshStream"
ENV_NAMES = (ENV_ANALYSIS, ENV_BEAMTIME, ENV_MANAGER, ENV_HOST, ENV_STREAM)

DEFAULT_STREAM = "sardana"
DEFAULT_BEAMTIME = {"id": "sardana", "beamline": "BL", "paths": {"raw": "raw", "processed": "processed"}}
_STREAM_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class SardanaMappingError(ValueError):
    """What the scientist set (or Sardana described) cannot become a mesh scan; the message says what to change."""


@dataclass(frozen=True)
class MeshSettings:
    """The ``TangoMesh*`` environment, checked."""

    analysis: dict[str, Any]
    beamtime: dict[str, Any]
    manager: str = DEFAULT_TOPOLOGY_DEVICE
    host: str = "127.0.0.1"
    stream: str = DEFAULT_STREAM

    @property
    def pipelines(self) -> list[str]:
        return sorted(self.analysis)

    @classmethod
    def from_env(cls, env: Mapping[str, Any]) -> "MeshSettings":
        """From the environment variables present in ``env`` (name -> value)."""
        analysis = env.get(ENV_ANALYSIS)
        if not isinstance(analysis, Mapping) or not analysis:
            raise SardanaMappingError(
                f"{ENV_ANALYSIS} is not set: senv {ENV_ANALYSIS} \"{{'<pipeline>': {{'processor': 'counters', "
                f"'settings': {{'counters': ['ct01']}}}}}}\" names the pipelines of the scan and their settings")
        for pipeline, entry in analysis.items():
            if not isinstance(entry, Mapping) or not isinstance(entry.get("processor"), str):
                raise SardanaMappingError(f"{ENV_ANALYSIS}[{pipeline!r}] must be a dict with a 'processor'")
        beamtime = env.get(ENV_BEAMTIME, DEFAULT_BEAMTIME)
        if not isinstance(beamtime, Mapping):
            raise SardanaMappingError(f"{ENV_BEAMTIME} must be a dict (id, beamline, paths)")
        strings = {}
        for name, default in ((ENV_MANAGER, DEFAULT_TOPOLOGY_DEVICE), (ENV_HOST, "127.0.0.1"),
                              (ENV_STREAM, DEFAULT_STREAM)):
            value = env.get(name, default)
            if not isinstance(value, str) or not value:
                raise SardanaMappingError(f"{name} must be a non-empty string, not {value!r}")
            strings[name] = value
        if not _STREAM_NAME.match(strings[ENV_STREAM]):
            raise SardanaMappingError(f"{ENV_STREAM} {strings[ENV_STREAM]!r}: lower-case letters, digits, _ and -")
        return cls(json_safe(dict(analysis)), json_safe(dict(beamtime)), strings[ENV_MANAGER], strings[ENV_HOST],
                   strings[ENV_STREAM])


@dataclass(frozen=True)
class Column:
    """One column of Sardana's data description that becomes an array of the stream."""

    key: str  # the record's key (a motor's name, a channel's full name, 'timestamp')
    name: str  # the array's name on the stream (the column's label)
    dtype: str  # wire dtype
    shape: tuple[int, ...] = ()
    units: str = ""

    def fill(self) -> np.ndarray:
        """What a point without a value holds (docs/sink.md: NaN for floats, 0 otherwise)."""
        return np.full(self.shape, np.nan if np.dtype(self.dtype).kind == "f" else 0, dtype=self.dtype)


@dataclass
class SardanaScan:
    """What Sardana knows of a scan at its start, as plain data."""

    serial: int  # Sardana's ScanID (the data description's serialno)
    command: str  # the macro command line (the title)
    macro: str  # the macro's name (ascan, mesh, ...)
    macro_id: str  # the macro's uuid
    started: float  # epoch seconds
    pattern: str  # services.scan_document GRID / LINE / POINTS
    points: int
    scanned: list[Scanned] = field(default_factory=list)  # [fast, slow] for a grid
    snake: bool = False
    moving: list[str] = field(default_factory=list)  # every motor that moves
    columns: list[Column] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # record key -> why it is not on the stream
    measurement_group: str = ""
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> full name, units, dtype, shape
    integration_time: float | None = None
    snapshot: dict[str, Any] = field(default_factory=dict)  # label -> value read before the scan
    snapshot_sources: dict[str, str] = field(default_factory=dict)
    sample: Any = None  # SampleInfo
    extra: dict[str, Any] = field(default_factory=dict)  # kept whole under user.sardana


def scan_id(scan: SardanaScan, beamtime: Mapping[str, Any]) -> str:
    """``sardana-<beamtime>-<serial>-<start, UTC>``: Sardana's serial number, made
    unique by the start time (a MacroServer's ScanID can start again)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(beamtime.get("id", "sardana")))[:64]
    when = datetime.fromtimestamp(scan.started, timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"sardana-{safe}-{scan.serial:05d}-{when}"


def document(scan: SardanaScan, settings: MeshSettings) -> dict[str, Any]:
    """The StartScan document (validated: ScanError, a ValueError, names what is wrong)."""
    beamtime = beamtime_part(settings.beamtime)
    try:
        geometry = motion_geometry(scan.pattern, scan.points, scan.scanned, scan.snake,
                                   ({"name": m} for m in scan.moving))
    except ValueError as exc:
        raise SardanaMappingError(f"{scan.command}: {exc}") from None
    acquisition: dict[str, Any] = {"detectors": json_safe(scan.channels), "measurement_group": scan.measurement_group}
    if scan.integration_time is not None and scan.integration_time > 0:
        acquisition["dwell_s"] = float(scan.integration_time)
    elif scan.integration_time is not None:
        acquisition["monitor_counts"] = -float(scan.integration_time)  # Sardana: a negative time counts a monitor
    analysis = {p: {**entry, "settings": entry.get("settings", {})} for p, entry in settings.analysis.items()}
    stream = stream_declaration({c.name: (c.dtype, c.shape) for c in scan.columns},
                                {c.name: c.units for c in scan.columns})
    return scan_document(
        beamtime=beamtime, scan_id=scan_id(scan, beamtime), number=int(scan.serial),
        name=f"{scan.macro}_{scan.serial}", command=scan.command, started=start_time(scan.started),
        geometry=geometry, sample=sample_part(scan.sample), acquisition=acquisition,
        devices=json_safe(scan.snapshot), analysis=analysis, streams={settings.stream: stream},
        user={"sardana": json_safe({"serialno": scan.serial, "macro": scan.macro, "macro_id": scan.macro_id,
                                    "snapshot_sources": scan.snapshot_sources, "not_streamed": scan.skipped,
                                    **scan.extra})})


def point_arrays(columns: list[Column], data: Mapping[str, Any],
                 problem: Callable[[str], None] = lambda why: None) -> dict[str, np.ndarray]:
    """One record as a block of one point: each column's value with a leading
    point axis. A value that is missing, None or of the wrong shape becomes the
    column's fill value and is reported to ``problem``."""
    out = {}
    for column in columns:
        value = data.get(column.key)
        try:
            if value is None:
                raise ValueError("no value")
            array = np.asarray(value, dtype=column.dtype)
            if array.shape != column.shape:
                raise ValueError(f"shape {array.shape}, described as {column.shape}")
        except (TypeError, ValueError) as exc:
            problem(f"{column.name}: {exc}")
            array = column.fill()
        out[column.name] = array.reshape((1, *column.shape))
    return out


def end_reason(status: str, command: str, sent: int, points: int) -> str:
    """Why a scan that did not end normally is aborted, for the sink and the files."""
    how = {"Stop": "stopped", "Abort": "aborted", "Exception": "failed with an exception"}.get(status, status.lower())
    return f"Sardana macro '{command}' {how} after {sent} of {points} points"


def finite(value: Any) -> Any:
    """A snapshot value as JSON can hold it (NaN and infinities become None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
