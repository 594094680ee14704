"""DESY FIO ascii files for counter-type products, the format beamline scripts read.

One file per scan and pipeline, ``<stem>.fio``::

    !
    ! Comments
    !
    %c
    <scan command>
    user <user> Acquisition started at <date>
    scan <id> sample <name> pipeline <name> processor <name>
    status <complete|incomplete|aborted|abandoned> points=.. received=.. failed=.. gaps=.. missing=.. duplicates=.. [reason ..]
    !
    ! Parameter
    !
    %p
    <name> = <value>
    !
    ! Data
    !
    %d
     Col 1 <fast motor> DOUBLE
     ...
    <one row per acquisition index, in acquisition order>

Columns: the nominal motor positions of the point (fast axis first, as
measured, so a snake scan's rows show the motors running back), then every
scalar result of the pipeline in the order the processor delivers them.
Values are written with 17 significant digits, so they read back exactly;
points without a value (failed, gap) are ``nan``. Parameters are the scan's
scalar metadata (scan, acquisition, sample, device snapshot), nested names
joined with ``/``. Rows are appended as the sorted results arrive. The
``status`` comment is written as a blank placeholder of fixed width first and
filled in place when the scan ends (services.ledger.PointLedger.end_status):
the one line that tells a whole scan from a part of one.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TextIO

import numpy as np

from services import protocol
from services.ledger import blank_failed, fill_value
from services.placement import cells
from services.scan import axis_values
from writers.component import ScanFile, ScanRun
from writers.layout import FileClaim, owner_info

SUFFIX = ".fio"
log = logging.getLogger("tangomesh.writer.fio")
FLUSH_SECONDS = 2.0


def blank(count: int) -> np.ndarray:
    """A column of ``count`` points without a value (services.ledger.fill_value)."""
    return np.full(count, fill_value(np.float64))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of nested metadata as ``a/b/c -> value``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}".replace(" ", "_").replace("=", "_")
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, str) and "\n" not in value and "\r" not in value:
            out[name] = value
    return out


STATUS_WIDTH = 240  # characters of the status comment, filled in at the end


class FioFile(ScanFile):
    def __init__(self, run: ScanRun) -> None:
        super().__init__(run)
        self.claim = FileClaim(run.stem.with_name(run.stem.name + SUFFIX), owner_info(run.owner))
        try:
            self.out: TextIO = open(self.claim.part, "w", encoding="utf-8", newline="\n")
        except BaseException:
            self.claim.release()
            raise
        meta = run.meta
        self.motor_names = list(meta.axis_names)
        positions = axis_values(meta)
        if meta.geometry_type == "points" and any(p is None for p in positions):
            self.motor_names = [n for n, p in zip(meta.axis_names, positions) if p is not None]
            positions = tuple(p for p in positions if p is not None)
        self._positions = positions
        self.columns: list[str] = []  # results, fixed by the first chunk
        self.ignored: set[str] = set()
        self.next_index = 0
        self._flushed = time.monotonic()
        self._header_written = False
        self._write_comments_and_parameters()

    def _write_comments_and_parameters(self) -> None:
        raw, meta = self.run.meta.raw, self.run.meta
        started = raw["scan"].get("start_time", self.run.start_time)
        user = raw.get("user", {}).get("name") or raw["beamtime"]["id"]  # FIO names who acquired
        processor, _ = self.run.processor
        lines = ["!", "! Comments", "!", "%c", " ".join(raw["scan"]["command"].split()),
                 f"user {user} Acquisition started at {started}",
                 f"scan {meta.scan_id} sample {raw['sample']['name']} pipeline {self.run.pipeline} "
                 f"processor {processor}"]
        self.out.write("\n".join(lines) + "\n")
        self._status_at = self.out.tell()
        lines = [" " * STATUS_WIDTH, "!", "! Parameter", "!", "%p"]
        params = {"scan_number": meta.number, "points": meta.points, "beamtime": raw["beamtime"]["id"],
                  "beamline": raw["beamtime"]["beamline"]}
        params.update(flatten({k: v for k, v in raw["acquisition"].items() if k != "detectors"}, "acquisition/"))
        params.update(flatten(raw["sample"], "sample/"))
        params.update(flatten(raw["devices"]))
        lines += [f"{name} = {_format_value(value)}" for name, value in params.items()]
        self.out.write("\n".join(lines) + "\n")

    def _write_data_header(self) -> None:
        lines = ["!", "! Data", "!", "%d"]
        lines += [f" Col {k} {name} DOUBLE" for k, name in enumerate([*self.motor_names, *self.columns], 1)]
        self.out.write("\n".join(lines) + "\n")
        self._header_written = True

    def _rows(self, index: int, stop: int, values: list[np.ndarray]) -> None:
        indices = np.arange(index, stop)
        motors: list[np.ndarray] = []
        if self.motor_names:
            meta = self.run.meta
            if meta.geometry_type == "raster":  # (rows, cols): fast axis values by column
                rows, cols = np.unravel_index(cells(meta, indices), meta.map_shape)
                motors = [self._positions[0][cols], self._positions[1][rows]]
            else:
                motors = [p[indices] for p in self._positions]
        table = np.column_stack([*motors, *values]) if motors or values else np.empty((stop - index, 0))
        buf = io.StringIO()
        np.savetxt(buf, table, fmt="%.17g", delimiter=" ")
        self.out.write(buf.getvalue())

    def _catch_up(self, index: int) -> None:
        """Rows of nan for points skipped (never expected from a sorter: it
        declares gaps), so that every index keeps its row."""
        if index > self.next_index:
            self._rows(self.next_index, index, [blank(index - self.next_index)] * len(self.columns))
            self.next_index = index

    def write(self, index: int, stop: int, arrays: dict[str, np.ndarray], failed: np.ndarray) -> None:
        scalars = {name: arr for name, arr in arrays.items() if arr.ndim == 1}
        if not self._header_written:
            self.columns = list(scalars)
            self._write_data_header()
        for name in set(arrays) - set(self.columns) - self.ignored:
            self.ignored.add(name)
            log.info("scan %s: result %r is not a scalar column of this file (%s per point, or new after "
                     "the first chunk): not written to FIO", self.run.meta.scan_id, name, arrays[name].shape[1:])
        self._catch_up(index)
        start = max(index, self.next_index)  # points already written (a duplicate) are not written twice
        if start >= stop:
            return
        count = stop - start
        columns = []
        for name in self.columns:
            arr = scalars.get(name)
            column = blank(count) if arr is None else np.asarray(arr[start - index:], dtype=np.float64)
            columns.append(blank_failed(column, failed[failed >= start] - start))
        self._rows(start, stop, columns)
        self.next_index = stop

    def gap(self, index: int, stop: int) -> None:
        if not self._header_written:
            return  # rows follow once the columns are known (finish writes them at the latest)
        self._catch_up(index)
        if stop > self.next_index:
            self._rows(self.next_index, stop, [blank(stop - self.next_index)] * len(self.columns))
            self.next_index = stop

    def tick(self, now: float) -> None:
        if now - self._flushed >= FLUSH_SECONDS:
            self.out.flush()
            self._flushed = now

    def finish(self) -> list[tuple[Path, str]]:
        if not self._header_written:
            self._write_data_header()
        last = self.run.ledger.last_index + 1
        end = self.run.meta.points if self.run.status == "complete" else max(last, self.next_index)
        self._catch_up(end)  # a complete scan has a row for every point
        self.out.seek(self._status_at)
        self.out.write(self.status_line())
        self.out.close()
        return [(self.claim.final, self.claim.publish())]

    def status_line(self) -> str:
        """The status comment, exactly STATUS_WIDTH characters (it overwrites
        the placeholder): status, counts and, for an abort, the reason, cut
        to fit."""
        counts = self.run.ledger.describe()
        line = f"status {self.run.status} " + " ".join(
            f"{k}={counts[k]}" for k in ("points", "received", "failed", "gaps", "missing", "duplicates"))
        reason = self.run.summary.get(protocol.META_REASON)
        if reason:
            line += f" reason {' '.join(str(reason).split())}"
        return line[:STATUS_WIDTH].ljust(STATUS_WIDTH)

    def abandon(self) -> None:
        try:
            self.out.close()
        finally:
            self.claim.release()


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


@dataclass
class FioData:
    comments: list[str]
    parameters: dict[str, str]
    columns: list[str]
    data: np.ndarray  # rows x columns, float64


def read_fio(path: Path | str) -> FioData:
    """Parse a FIO file (the sections above; ``!`` lines are comments)."""
    comments: list[str] = []
    parameters: dict[str, str] = {}
    columns: list[str] = []
    rows: list[list[float]] = []
    section = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.rstrip("\n")
            if text.startswith("!"):
                continue
            if text in ("%c", "%p", "%d"):
                section = text
                continue
            if section == "%c":
                comments.append(text)
            elif section == "%p":
                name, sep, value = text.partition(" = ")
                if sep:
                    parameters[name.strip()] = value.strip()
            elif section == "%d":
                fields = text.split()
                if fields[:1] == ["Col"] and len(columns) < int(fields[1]):
                    columns.append(fields[2])
                elif fields:
                    rows.append([float(v) for v in fields])
    data = np.array(rows, dtype=np.float64).reshape(len(rows), len(columns))
    return FioData(comments, parameters, columns, data)
