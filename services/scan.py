"""Scan metadata: the document the control system sends with ``StartScan``.

It is validated once, against ``schemas/scan.json`` plus the checks below that a
schema cannot express, and then read through :class:`ScanMeta` so that every
stage (master, workers, sorter, sink, writers) interprets geometry the same
way. Nothing here needs Tango. Where an acquisition index lands in the map
is services.placement's one rule; docs/scan-metadata.md is the reference for
integrators.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Mapping

import numpy as np

from services.schema import SchemaError, load_json, validate

SCHEMA = "scan"
#: Acquisition indices travel as integers below 2**53 (see services.codec.MAX_INDEX).
MAX_POINTS = 2**53


class ScanError(ValueError):
    """Scan metadata that cannot be used, or a question it cannot answer; the
    message names the scan or the offending path."""


def _fail(where: str, why: str) -> ScanError:
    # Same shape as services.schema messages, so that callers see one format.
    return ScanError(f"invalid {SCHEMA}: at {where}: {why}")


@dataclass(frozen=True, eq=False)
class ScanMeta:
    """A validated scan document (``raw``, stored whole with every product) and
    the few derived facts every stage needs. Build it with :func:`parse_scan`.
    ``raw`` is never changed after validation, so the facts stages read per
    data message (shape, points) are computed once."""

    raw: dict[str, Any]

    @property
    def scan_id(self) -> str:
        return self.raw["scan"]["id"]

    @property
    def number(self) -> int:
        return self.raw["scan"]["number"]

    @property
    def geometry(self) -> dict[str, Any]:
        return self.raw["scan"]["geometry"]

    @cached_property
    def geometry_type(self) -> str:
        """``"raster"``, ``"line"`` or ``"points"``."""
        return self.geometry["type"]

    @property
    def pipelines(self) -> tuple[str, ...]:
        """Pipelines with analysis settings, in document order."""
        return tuple(self.raw["analysis"])

    @cached_property
    def snake(self) -> bool:
        """True only for a raster whose odd rows run the fast axis backwards."""
        return self.geometry_type == "raster" and bool(self.geometry.get("snake", False))

    @cached_property
    def map_shape(self) -> tuple[int, ...]:
        """(rows, cols) = (slow points, fast points) for a raster, (n,) otherwise."""
        g = self.geometry
        if g["type"] == "raster":
            fast, slow = g["axes"]
            return (slow["points"], fast["points"])
        if g["type"] == "line":
            return (g["axes"][0]["points"],)
        return (g["points"],)

    @cached_property
    def points(self) -> int:
        """Total number of acquisition indices the scan is expected to produce."""
        return math.prod(self.map_shape)

    @property
    def axis_names(self) -> tuple[str, ...]:
        """Motor names in document order: (fast, slow) for a raster."""
        return tuple(a["name"] for a in self.geometry.get("axes", ()))

    @property
    def axis_units(self) -> tuple[str, ...]:
        """Units matching :attr:`axis_names`."""
        return tuple(a["units"] for a in self.geometry.get("axes", ()))

    def analysis_for(self, pipeline: str) -> tuple[str, dict[str, Any]]:
        """(processor, settings) for ``pipeline``; a master started for a
        pipeline the scan does not mention must refuse the scan, loudly."""
        try:
            entry = self.raw["analysis"][pipeline]
        except KeyError:
            raise ScanError(
                f"scan {self.scan_id} has no analysis settings for pipeline {pipeline}"
            ) from None
        return entry["processor"], entry.get("settings", {})

    def to_json(self) -> str:
        """The document as JSON text, for storing it whole with a product."""
        return json.dumps(self.raw, ensure_ascii=False)


def parse_scan(document: str | bytes | Mapping[str, Any], *, allow_absolute: bool = False) -> ScanMeta:
    """Validate scan metadata (JSON text or an already decoded dict) and wrap it.

    ``beamtime.paths.processed`` must not contain ``..``; it must be relative
    (to the facility's beamtime root, joined by the writers) unless
    ``allow_absolute`` is true, which a deployment sets when its control system
    sends absolute paths that the writers are configured to trust.
    A dict is deep-copied, so later changes by the caller cannot alter the scan.
    """
    try:
        if isinstance(document, (str, bytes, bytearray)):
            doc = load_json(SCHEMA, document)
        else:
            doc = copy.deepcopy(dict(document)) if isinstance(document, Mapping) else document
        validate(SCHEMA, doc)
    except SchemaError as exc:
        raise ScanError(str(exc)) from exc
    _check_semantics(doc, allow_absolute)
    return ScanMeta(doc)


def _check_semantics(doc: dict[str, Any], allow_absolute: bool) -> None:
    """What the schema cannot say; each failure names its path."""
    processed = doc["beamtime"]["paths"]["processed"]
    if allow_absolute and PurePosixPath(processed).is_absolute():
        if ".." in PurePosixPath(processed).parts:
            raise _fail("beamtime/paths/processed", f"path {processed!r} contains '..'")
    else:
        try:
            safe_relative(processed)
        except ScanError as exc:
            raise _fail("beamtime/paths/processed", str(exc)) from None

    scan = doc["scan"]
    if "start_time" in scan:
        try:
            datetime.fromisoformat(scan["start_time"].replace(",", "."))
        except ValueError as exc:
            raise _fail("scan/start_time", f"not a valid ISO 8601 date-time: {exc}") from None

    geometry = scan["geometry"]
    axes = geometry.get("axes", [])  # their count per geometry type is the schema's check
    names = [a["name"] for a in axes]
    if len(set(names)) != len(names):
        raise _fail("scan/geometry/axes", f"axis names repeat: {names}")
    for k, axis in enumerate(axes):
        for key in ("start", "stop"):
            if key in axis and not math.isfinite(axis[key]):
                raise _fail(f"scan/geometry/axes/{k}/{key}", f"{axis[key]} is not finite")
        if "positions" in axis:
            positions = np.asarray(axis["positions"], dtype=np.float64)
            if positions.shape != (geometry["points"],):
                raise _fail(f"scan/geometry/axes/{k}/positions",
                            f"{positions.size} positions for {geometry['points']} points")
            if not np.isfinite(positions).all():
                raise _fail(f"scan/geometry/axes/{k}/positions", "positions must be finite")
    meta = ScanMeta(doc)
    if meta.points > MAX_POINTS:
        raise _fail("scan/geometry", f"{meta.points} points exceed {MAX_POINTS}")

    for stream, spec in doc.get("streams", {}).items():
        for name, array in spec.get("arrays", {}).items():
            try:
                dtype = np.dtype(array["dtype"])
            except TypeError as exc:
                raise _fail(f"streams/{stream}/arrays/{name}/dtype", f"not a dtype: {exc}") from None
            if dtype.kind not in "biufc" or dtype.fields is not None:
                raise _fail(f"streams/{stream}/arrays/{name}/dtype", f"{dtype} is not numeric")


def safe_relative(path: str) -> str:
    """Normalise a relative POSIX path that cannot leave the directory it is
    joined to: no absolute path, no ``..``, no NUL, not empty. Writers join the
    result with their beamtime root, so a scan document cannot make them write
    elsewhere."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ScanError(f"path {path!r} is empty or not a string")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ScanError(f"path {path!r} is absolute; a relative path is required")
    if ".." in pure.parts:
        raise ScanError(f"path {path!r} contains '..'")
    text = str(pure)
    if text == ".":
        raise ScanError(f"path {path!r} names no directory")
    return text


def axis_values(meta: ScanMeta) -> tuple[np.ndarray | None, ...]:
    """Nominal motor positions per axis, in :attr:`ScanMeta.axis_names` order:
    ``(fast, slow)`` for a raster (lengths cols, rows), ``(values,)`` for a line,
    one entry per axis for points (``None`` where the document gives no
    positions: take the measured ones from the data). For viewer scales and
    NXdata axes; they are set points, not encoder readings."""
    values: list[np.ndarray | None] = []
    for axis in meta.geometry.get("axes", ()):
        if "points" in axis:
            values.append(np.linspace(axis["start"], axis["stop"], axis["points"]))
        elif "positions" in axis:
            values.append(np.asarray(axis["positions"], dtype=np.float64))
        else:
            values.append(None)
    return tuple(values)
