"""The checking consumer: what a scan delivered, as the end of the pipeline saw it.

A :class:`Probe` is a consumer registered like any other (kind ``recorder``),
so the sorter delivers to it losslessly, as to a sink or a writer. It keeps a
:class:`Tally` per scan: was each index delivered exactly once, in order,
when, as a gap or a failure. :func:`summarise` turns a tally into the
JSON-able summary that ``tangomesh scan``, the demo, the tests and the
benchmarks report. The scan driver (``services/ops/driver.py``) runs one
probe per pipeline.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from services import codec, protocol, security
from services.component import Counters
from services.dataplane import DATA_MAX_FRAME_BYTES, bind, limit_frames
from services.registration import ManagerLink, RegistrationClient

log = logging.getLogger("tangomesh.probe")


@dataclass
class Tally:
    """What one scan delivered, as the probe saw it."""

    points: int
    counts: np.ndarray = field(init=False)
    arrival: np.ndarray = field(init=False)
    out_of_order: int = 0
    last_stop: int = 0
    gap_points: int = 0
    failed_points: int = 0
    incomplete_points: int = 0
    messages: int = 0
    chunks: list[tuple[int, dict[str, np.ndarray]]] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # index -> why it failed (kept with keep=True)
    started: bool = False
    end: dict[str, Any] | None = None
    aborted: bool = False
    joined_at: int | None = None  # the probe came into the scan late (restarted): the first index it was given

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.points, np.uint16)
        self.arrival = np.full(self.points, np.nan)

    @property
    def points_seen(self) -> int:
        """Indices delivered at least once, as results or in gap records: the progress so far."""
        return int((self.counts > 0).sum())

    def arrays(self) -> dict[str, np.ndarray]:
        """Delivered results joined in index order (chunks kept only with keep=True)."""
        names = self.chunks[0][1].keys() if self.chunks else ()
        return {n: np.concatenate([c[n] for _, c in self.chunks if n in c]) for n in names}

    def delivered_indices(self) -> np.ndarray:
        with_values = [np.arange(i, i + len(next(iter(c.values())))) for i, c in self.chunks if c]
        return np.concatenate(with_values) if with_values else np.zeros(0, np.int64)


class Probe:
    """A consumer (kind ``recorder``) that tallies every delivery per scan."""

    def __init__(self, pipeline: str, link: ManagerLink, host: str = "127.0.0.1", keep: bool = False,
                 name: str | None = None) -> None:
        name = name or f"sim/{pipeline}-probe/{os.getpid()}"
        self.counters = Counters(log)  # refused peers and messages
        self.auth = security.Auth(link, self.counters, name)
        self.socket = zmq.Context.instance().socket(zmq.PULL)
        self.socket.linger = 0
        limit_frames(self.socket, DATA_MAX_FRAME_BYTES)  # a data inlet like any consumer's
        self.auth.serve(self.socket, security.consumer_rule(pipeline), "the probe's data_in")
        self.endpoint = bind(self.socket, host, host)
        self.keep = keep
        self.tallies: dict[str, Tally] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._thread.start()
        self.registration = RegistrationClient(link, {
            "name": name, "kind": "recorder", "pipeline": pipeline,
            "host": host, "pid": os.getpid(), "endpoints": {protocol.DATA_IN: self.endpoint},
            **self.auth.registration_fields()})
        self.registration.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(50):
                continue
            try:
                frames = codec.recv_frames(self.socket)
                msg = codec.decode(frames)
                if self.auth.on:
                    security.check_consumer_sender(self.auth.sender(frames[0]), msg)
            except codec.CodecError as exc:
                self.errors.append(str(exc))
                continue
            except ValueError as exc:  # not from the pipeline's sorter: counted, not tallied
                self.counters.error(f"probe refused {msg.type} of scan {msg.scan!r}: {exc}")
                continue
            now = time.monotonic()
            if msg.type == codec.SCAN_START:
                if msg.scan in self.tallies and msg.meta.get(protocol.META_RESUME) is not None:
                    continue  # the sorter restarted: the scan goes on, re-deliveries show as counts of 2
                doc = msg.meta.get(protocol.META_SCAN, {})
                geometry = doc.get("scan", {}).get("geometry", {})
                points = math.prod(a["points"] for a in geometry.get("axes", [])) if geometry.get("type") != "points" \
                    else geometry["points"]
                self.tallies[msg.scan] = Tally(points, started=True, joined_at=msg.meta.get(protocol.META_RESUME))
                continue
            tally = self.tallies.get(msg.scan)
            if tally is None:
                self.errors.append(f"{msg.type} for scan {msg.scan!r} before its scan_start")
                continue
            tally.messages += 1
            if msg.type in (codec.RESULT, codec.GAP):
                if msg.index < tally.last_stop:
                    tally.out_of_order += 1
                tally.last_stop = max(tally.last_stop, msg.stop)
                tally.counts[msg.index:msg.stop] += 1
                tally.arrival[msg.index:msg.stop] = now
                if msg.type == codec.GAP:
                    tally.gap_points += msg.count
                else:
                    tally.failed_points += len(msg.meta.get(protocol.META_ERRORS, {}))
                    tally.incomplete_points += sum(
                        b - a for ranges in msg.meta.get(protocol.META_INCOMPLETE, {}).values() for a, b in ranges)
                    if self.keep:
                        tally.errors.update((int(i), why) for i, why in msg.meta.get(protocol.META_ERRORS, {}).items())
                        tally.chunks.append((msg.index, {n: a.copy() for n, a in msg.arrays.items()}))  # off the frames
            elif msg.type == codec.SCAN_END:
                tally.end = dict(msg.meta)
            elif msg.type == codec.SCAN_ABORT:
                tally.aborted = True
                tally.end = dict(msg.meta)

    def ended(self, scan: str) -> Tally | None:
        """The scan's tally once its end (or abort) has arrived, else None."""
        tally = self.tallies.get(scan)
        return tally if tally is not None and tally.end is not None else None

    def points_seen(self, scan: str) -> int:
        tally = self.tallies.get(scan)
        return tally.points_seen if tally is not None else 0

    def close(self, deregister: bool = True) -> None:
        """Stop; ``deregister=False`` leaves as a crash would, saying nothing to the manager."""
        self.registration.stop(deregister=deregister)
        self._stop.set()
        self._thread.join(2)
        self.socket.close(0)


def summarise(tally: Tally, sent: int, wall: float, sent_at: np.ndarray | None, blocked: float) -> dict[str, Any]:
    """One pipeline's scan in numbers: points planned, sent, delivered, lost,
    out of order; rate; the sources' time held back; latency percentiles from
    each point's send time (``sent_at``) to its arrival."""
    delivered = tally.points_seen - tally.gap_points
    summary = {
        "points_planned": tally.points,
        "points_sent": sent,
        "points_delivered": delivered,
        "missing": int((tally.counts == 0).sum()) + tally.gap_points,
        "gaps": tally.gap_points,
        "duplicates": int(np.clip(tally.counts.astype(np.int64) - 1, 0, None).sum()),
        "out_of_order": tally.out_of_order,
        "failed_points": tally.failed_points,
        "incomplete_points": tally.incomplete_points,
        "messages": tally.messages,
        "wall_s": round(wall, 3),
        "events_per_s": round(delivered / wall, 1) if wall > 0 else 0.0,
        "sources_blocked_s": round(blocked, 3),
        "aborted": tally.aborted,
    }
    if sent_at is not None:
        latency = (tally.arrival - sent_at)[np.isfinite(tally.arrival - sent_at)] * 1e3
        if latency.size:
            summary["latency_ms"] = {q: round(float(np.percentile(latency, p)), 2)
                                     for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
    return summary
