"""Feed the mesh from a Bluesky RunEngine: a document callback.

    from services.ops.bluesky_feed import MeshFeed
    feed = MeshFeed(TangoManagerLink(), analysis={"counters": {
        "processor": "counters", "settings": {"counters": ["det4"]}, "streams": ["primary"]}})
    RE.subscribe(feed)
    RE(grid_scan([det4], motor1, -1, 1, 5, motor2, -2, 2, 7, snake_axes=True))
    feed.close()

How the documents map (docs/bluesky.md has the full table):

* ``start`` is kept; ``StartScan`` waits for the ``primary`` descriptor,
  because only the descriptor says what the data are (dtype, shape, units).
  Scan id ``bluesky-<scan_id>-<uid[:8]>``, number ``scan_id``, command
  ``plan_name(plan_args)``, start time from ``time``. A ``grid_scan``
  (outer product of two motors, ``shape`` and ``extents``) becomes a raster
  with the *second* motor as the fast axis (Bluesky lists the slow one
  first) and ``snake`` from ``snaking``; a one-motor ``scan`` becomes a line;
  anything else a ``points`` geometry with the measured positions in the data.
  Beamtime from the start document's ``beamtime_id``/``beamline_id``/
  ``proposal_id`` (else the feed's defaults), sample from ``sample``,
  acquisition detectors and device snapshot from the descriptor's
  ``configuration``, the whole start document under ``user.bluesky_start``.
* ``event`` / ``event_page`` of the primary stream: the numeric data keys of
  each configured stream go out as one block per event (page), index
  ``seq_num - 1``.
* ``stop``: every stream's scan end, then ``EndScan``; ``AbortScan`` when
  ``exit_status`` is not ``success``.

Not mapped: per-reading timestamps, hints, streams other than ``primary``
(baseline, monitors), string-valued keys, and externally stored data
(Resource/Datum documents: the frames an area detector wrote to a file are
not read back). Such detectors should stream to the mesh themselves.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from services.ops.masters import ScanMasters
from services.registration import ManagerLink, wait_registered
from services.scan_document import (GRID, LINE, POINTS, Scanned, beamtime_part, json_safe, motion_geometry,
                                    sample_part, scan_document, start_time, stream_declaration, wire_dtype)
from services.source import SourceClient

log = logging.getLogger("tangomesh.bluesky")


class MeshFeed:
    """A RunEngine subscriber that runs each Bluesky run as a mesh scan.

    ``analysis``: the scan document's analysis section (pipeline -> processor,
    settings, streams); ``streams``: mesh stream name -> data keys of the
    primary stream (default: one stream ``primary`` with every numeric key);
    ``beamtime``: defaults for what the start document does not say.
    """

    def __init__(self, link: ManagerLink, analysis: dict[str, dict[str, Any]],
                 streams: dict[str, list[str]] | None = None, beamtime: dict[str, Any] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.link = link
        self.analysis = analysis
        self.stream_keys = streams
        self.beamtime = beamtime or {"id": "bluesky", "beamline": "BL",
                                     "paths": {"raw": "raw", "processed": "processed"}}
        wanted = {(p, s) for p, entry in analysis.items() for s in entry.get("streams", list(streams or ["primary"]))}
        self.sources = {(p, s): SourceClient(s, p, link, host, prefix="bluesky") for p, s in sorted(wanted)}
        wait_registered(*(src.registration for src in self.sources.values()))
        self.start: dict[str, Any] | None = None
        self.scan_id: str | None = None
        self.primary: str | None = None  # the primary descriptor's uid
        self.keys: dict[str, dict[str, str]] = {}  # stream -> data key -> dtype
        self.masters: ScanMasters | None = None
        self.sent = 0
        self.scans: list[str] = []  # ids of the scans started, for the caller

    # ------------------------------------------------------------ RunEngine interface
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(doc)

    def _on_start(self, doc: dict[str, Any]) -> None:
        self.start, self.scan_id, self.primary, self.keys = doc, None, None, {}

    def _on_descriptor(self, doc: dict[str, Any]) -> None:
        if self.start is None or doc.get("name") != "primary" or self.scan_id is not None:
            return  # other streams are not mapped (see the module doc)
        self.primary = doc["uid"]
        self.keys = self._stream_keys(doc["data_keys"])
        document = self.document(self.start, doc)
        self.masters = ScanMasters(self.link, self.analysis)
        self.masters.start(document)  # on every master or, raising, on none
        self.scan_id = document["scan"]["id"]
        self.scans.append(self.scan_id)
        log.info("scan %s started on %s", self.scan_id, ", ".join(self.masters.proxies))

    def _on_event(self, doc: dict[str, Any]) -> None:
        if doc.get("descriptor") == self.primary and self.scan_id:
            self._send(doc["seq_num"] - 1, {k: [v] for k, v in doc["data"].items()})

    def _on_event_page(self, doc: dict[str, Any]) -> None:
        if doc.get("descriptor") != self.primary or not self.scan_id:
            return
        seq = doc["seq_num"]
        if list(seq) != list(range(seq[0], seq[0] + len(seq))):
            for k, n in enumerate(seq):  # not consecutive: one block per event
                self._send(n - 1, {key: [values[k]] for key, values in doc["data"].items()})
        else:
            self._send(seq[0] - 1, doc["data"])

    def _on_stop(self, doc: dict[str, Any]) -> None:
        if not self.scan_id:
            return
        try:
            if doc.get("exit_status") == "success":
                points = int(doc.get("num_events", {}).get("primary", 0))
                for source in self.sources.values():
                    source.end(self.scan_id, points)
                refused = self.masters.end(self.scan_id)
                if refused:  # those pipelines' scans would stay open: abort them there, say why
                    log.warning("EndScan %s refused: %s", self.scan_id, refused)
                    self.masters.abort(self.scan_id, only=refused)
            else:
                self.masters.abort(self.scan_id, reason=f"Bluesky run ended {doc.get('exit_status', '?')}"
                                   + (f": {doc['reason']}" if doc.get("reason") else ""))
        finally:
            self.start, self.scan_id, self.primary = None, None, None

    # ------------------------------------------------------------ mapping
    def _stream_keys(self, data_keys: dict[str, Any]) -> dict[str, dict[str, str]]:
        numeric = {k: wire_dtype(v.get("dtype")) or "<f8" for k, v in data_keys.items()
                   if wire_dtype(v.get("dtype")) or v.get("dtype") == "array"}
        chosen = self.stream_keys or {"primary": sorted(numeric)}
        out = {}
        for stream, keys in chosen.items():
            unknown = sorted(set(keys) - set(numeric))
            if unknown:
                raise ValueError(f"stream {stream}: data keys {unknown} are not numeric keys of the primary "
                                 f"stream (numeric keys: {sorted(numeric)})")
            out[stream] = {k: numeric[k] for k in keys}
        return out

    def _send(self, index: int, data: dict[str, list[Any]]) -> None:
        for stream, keys in self.keys.items():
            arrays = {k: np.asarray(data[k], dtype=dt) for k, dt in keys.items()}
            for (pipeline, s), source in self.sources.items():
                if s == stream:
                    source.block(self.scan_id, index, arrays)
        self.sent += len(next(iter(data.values()), []))

    def document(self, start: dict[str, Any], descriptor: dict[str, Any]) -> dict[str, Any]:
        """The StartScan document for a run, from its start and primary descriptor."""
        return bluesky_document(start, descriptor, self.keys, self.analysis, self.beamtime)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def bluesky_document(start: dict[str, Any], descriptor: dict[str, Any], keys: dict[str, dict[str, str]],
                     analysis: dict[str, Any], beamtime: dict[str, Any]) -> dict[str, Any]:
    """The StartScan document of a run: its start and primary descriptor, the
    mesh streams' data keys (stream -> key -> dtype), the analysis section and
    the beamtime defaults. The parts common to every control system (geometry,
    sample, beamtime, JSON values) go through ``services.scan_document``."""
    data_keys = descriptor["data_keys"]
    units = {k: v.get("units", "") or "" for k, v in data_keys.items()}
    uid = start["uid"]
    number = int(start.get("scan_id", 0))
    configuration = json_safe({k: v.get("data", {}) for k, v in descriptor.get("configuration", {}).items()})
    detectors = list(start.get("detectors", []))
    return scan_document(
        beamtime=beamtime_part(beamtime, id=start.get("beamtime_id"), beamline=start.get("beamline_id"),
                               proposal=start.get("proposal_id")),
        scan_id=f"bluesky-{number}-{uid[:8]}", number=number,
        name=f"{start.get('plan_name', 'run')}_{number}",
        command=f"{start.get('plan_name', '?')}({json.dumps(json_safe(start.get('plan_args', {})))})",
        started=start_time(start["time"]), geometry=bluesky_geometry(start, units),
        sample=sample_part(start.get("sample", "unknown")),
        acquisition={"detectors": {d: configuration.get(d, {}) for d in detectors}},
        devices={k: v for k, v in configuration.items() if k not in detectors},
        analysis=analysis,
        streams={s: stream_declaration({k: (dt, tuple(data_keys[k].get("shape", []))) for k, dt in ks.items()}, units)
                 for s, ks in keys.items()},
        user={"bluesky_start": json_safe(start)})


def bluesky_geometry(start: dict[str, Any], units: dict[str, str]) -> dict[str, Any]:
    """A ``grid_scan`` (outer product of two motors) is a grid with the *second*
    motor fast (Bluesky lists the slow one first); a one-motor ``scan`` a line;
    anything else points."""
    motors = list(start.get("motors", []))
    shape = list(start.get("shape", []))
    extents = [list(e) for e in start.get("extents", [])]
    points = int(start.get("num_points", 0))
    if start.get("plan_pattern") == "outer_product" and len(motors) == 2 == len(shape) == len(extents):
        (slow, fast), (n_slow, n_fast), (e_slow, e_fast) = motors, shape, extents
        snaking = list(start.get("snaking", [False, False]))
        return motion_geometry(GRID, int(n_slow) * int(n_fast), [
            Scanned(fast, float(e_fast[0]), float(e_fast[1]), int(n_fast), units.get(fast, "")),
            Scanned(slow, float(e_slow[0]), float(e_slow[1]), int(n_slow), units.get(slow, ""))],
            snake=bool(snaking[1]) if len(snaking) > 1 else False)
    args = start.get("plan_pattern_args", {}).get("args", [])
    if start.get("plan_pattern") == "inner_product" and len(motors) == 1 and len(args) == 3 and points:
        return motion_geometry(LINE, points, [Scanned(motors[0], float(args[1]), float(args[2]), points,
                                                      units.get(motors[0], ""))])
    if not points:
        raise ValueError(f"run {start.get('uid')}: num_points is not in the start document; "
                         "the mesh needs the number of points at scan start")
    return motion_geometry(POINTS, points, moving=({"name": m, "units": units.get(m, "")} for m in motors))
