"""Simulated sources and a checking consumer, to drive scans through a live mesh.

A :class:`SourceClient` is what a detector looks like to the mesh: a bound PUSH
socket registered with the topology manager as a ``source`` of one stream. A
:class:`Probe` is a consumer registered like any other; it tallies what the
sorter delivers (each index exactly once? in order? gaps?) and when. Together
with :func:`run_scan` they are ``tangomesh scan --sim``, the end-to-end tests
and the pipeline benchmarks: real processes, real sockets, no shortcuts.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from services import codec, protocol
from services.dataplane import bind
from services.registration import ManagerLink, RegistrationClient, master_proxy, wait_registered
from services.source import SourceClient


# --------------------------------------------------------------------------- profiles

@dataclass(frozen=True)
class Profile:
    """Streams of a simulated beamline and what one pipeline does with them."""

    streams: dict[str, dict[str, tuple[str, tuple[int, ...]]]]  # stream -> array -> (dtype, per-point shape)
    processor: str
    settings: dict[str, Any]
    values: Callable[[str, np.ndarray], dict[str, np.ndarray]]


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


def _noise_values(streams: dict[str, dict[str, tuple[str, tuple[int, ...]]]]):
    """Fixed pseudo-random content for bulky arrays: generated once, sliced per block."""
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

PROFILES: dict[str, Profile] = {
    "counters": Profile(COUNTER_STREAMS, "counters",
                        {"counters": ["i1", "diode"], "normalise_by": "i0"}, counter_values),
    "counterset": Profile(COUNTER_SET, "passthrough", {"arrays": ["counters/t"]}, _noise_values(COUNTER_SET)),
    "spectra": Profile(SPECTRUM_STREAMS, "passthrough", {"arrays": ["scaler/i0"]}, _noise_values(SPECTRUM_STREAMS)),
    "frames": Profile(FRAME_STREAMS, "passthrough", {"arrays": ["scaler/i0"]}, _noise_values(FRAME_STREAMS)),
}


def expected_counters(idx: np.ndarray) -> dict[str, np.ndarray]:
    """What the ``counters`` processor must deliver for the ``counters`` profile."""
    v = {**counter_values("scaler", idx), **counter_values("diode", idx)}
    total = v["i1"] + v["diode"]
    return {"i0": v["i0"], "i1": v["i1"], "diode": v["diode"], "sum": total,
            "i1_norm": v["i1"] / v["i0"], "diode_norm": v["diode"] / v["i0"], "sum_norm": total / v["i0"]}


def scan_document(scan_id: str, number: int, points: int, pipeline: str, profile: Profile,
                  streams: list[str] | None = None, analysis: dict[str, Any] | None = None,
                  geometry: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete, valid scan document: ``geometry`` if given, else a raster
    when ``points`` factors nicely (100 x 100 for 10,000), a line otherwise."""
    cols = next((c for c in range(int(math.isqrt(points)), 0, -1) if points % c == 0), 1)
    rows = points // cols
    if geometry is not None:
        geometry = copy.deepcopy(geometry)
    elif cols > 1 and rows > 1:
        geometry = {"type": "raster", "snake": False, "axes": [
            {"name": "samx", "units": "um", "start": 0.0, "stop": 0.05 * (rows - 1), "points": rows},
            {"name": "samy", "units": "um", "start": 0.0, "stop": 0.05 * (cols - 1), "points": cols}]}
    else:
        geometry = {"type": "line", "axes": [
            {"name": "samx", "units": "um", "start": 0.0, "stop": 0.05 * max(points - 1, 1), "points": points}]}
    chosen = streams or list(profile.streams)
    entry = {"processor": profile.processor, "settings": profile.settings, "streams": chosen, **(analysis or {})}
    return {
        "schema_version": 1,
        "beamtime": {"id": "sim", "beamline": "SIM", "paths": {"raw": "/tmp/sim/raw", "processed": "processed"}},
        "scan": {"id": scan_id, "number": number, "command": f"tangomesh scan --sim ({points} points)",
                 "geometry": geometry},
        "sample": {"name": "simulated"},
        "acquisition": {"detectors": {s: {} for s in chosen}},
        "devices": {},
        "analysis": {pipeline: entry},
        "streams": {s: {"arrays": {n: {"dtype": dt, "shape": list(shape)} for n, (dt, shape) in profile.streams[s].items()}}
                    for s in chosen},
    }


# --------------------------------------------------------------------------- parts

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

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.points, np.uint16)
        self.arrival = np.full(self.points, np.nan)

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
        self.socket = zmq.Context.instance().socket(zmq.PULL)
        self.socket.linger = 0
        self.endpoint = bind(self.socket, host, host)
        self.keep = keep
        self.tallies: dict[str, Tally] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._thread.start()
        self.registration = RegistrationClient(link, {
            "name": name or f"sim/{pipeline}-probe/{os.getpid()}", "kind": "recorder", "pipeline": pipeline,
            "host": host, "pid": os.getpid(), "endpoints": {protocol.DATA_IN: self.endpoint}})
        self.registration.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(50):
                continue
            try:
                msg = codec.recv(self.socket)
            except codec.CodecError as exc:
                self.errors.append(str(exc))
                continue
            now = time.monotonic()
            if msg.type == codec.SCAN_START:
                doc = msg.meta.get(protocol.META_SCAN, {})
                geometry = doc.get("scan", {}).get("geometry", {})
                points = math.prod(a["points"] for a in geometry.get("axes", [])) if geometry.get("type") != "points" \
                    else geometry["points"]
                self.tallies[msg.scan] = Tally(points, started=True)
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
                        tally.chunks.append((msg.index, {n: np.array(a) for n, a in msg.arrays.items()}))
            elif msg.type == codec.SCAN_END:
                tally.end = dict(msg.meta)
            elif msg.type == codec.SCAN_ABORT:
                tally.aborted = True
                tally.end = {}

    def wait_end(self, scan: str, timeout: float) -> Tally:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tally = self.tallies.get(scan)
            if tally is not None and tally.end is not None:
                return tally
            time.sleep(0.02)
        raise TimeoutError(f"scan {scan} did not end within {timeout:g} s "
                           f"(delivered so far: {int((self.tallies[scan].counts > 0).sum()) if scan in self.tallies else 0})")

    def close(self) -> None:
        self.registration.stop(deregister=True)
        self._stop.set()
        self._thread.join(2)
        self.socket.close(0)


# --------------------------------------------------------------------------- a whole scan

@dataclass
class ScanDriver:
    """Sends a profile's streams for one scan, paced, block by block.

    ``block`` is the points per message, one size for all streams or one per
    stream (detectors rarely agree on block sizes; the master joins them).
    Blocks go out in index order across streams, as fast as the mesh takes
    them or at ``rate`` points per second.
    """

    profile: Profile
    sources: dict[str, SourceClient]
    block: int | dict[str, int] = 100
    rate: float = 0.0
    skip: dict[str, set[int]] = field(default_factory=dict)  # stream -> block starts never sent
    sent_at: np.ndarray | None = None

    def _plan(self, points: int) -> list[tuple[int, int, str]]:
        sizes = self.block if isinstance(self.block, dict) else {s: self.block for s in self.sources}
        blocks = [(start, min(points, start + sizes[stream]), stream)
                  for stream in self.sources for start in range(0, points, sizes[stream])
                  if start not in self.skip.get(stream, ())]
        # a block leaves once its last point is acquired: order by stop, as a detector would
        return sorted(blocks, key=lambda b: (b[1], b[0]))

    def send(self, scan: str, points: int) -> int:
        """Send every block of every stream, then each stream's scan_end; the points sent."""
        self.sent_at = np.full(points, np.nan)
        t0 = time.monotonic()
        for start, stop, stream in self._plan(points):
            if self.rate > 0:
                delay = t0 + stop / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.sources[stream].block(scan, start, self.profile.values(stream, np.arange(start, stop)))
            self.sent_at[start:stop] = time.monotonic()
        for source in self.sources.values():
            source.end(scan, points)
        return points


def summarise(tally: Tally, sent: int, wall: float, sent_at: np.ndarray | None, blocked: float) -> dict[str, Any]:
    delivered = int((tally.counts > 0).sum()) - tally.gap_points
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


class SimBeamline:
    """A profile's sources and a probe, registered for one pipeline, able to
    run scans through that pipeline's master (found in the topology)."""

    def __init__(self, pipeline: str, profile: str | Profile, link: ManagerLink, host: str = "127.0.0.1",
                 keep: bool = False, streams: list[str] | None = None) -> None:
        self.pipeline = pipeline
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.link = link
        self.sources = {s: SourceClient(s, pipeline, link, host) for s in (streams or self.profile.streams)}
        self.probe = Probe(pipeline, link, host, keep)
        wait_registered(self.probe.registration, *(src.registration for src in self.sources.values()))

    def master(self) -> Any:
        return master_proxy(self.link, self.pipeline)

    def scan(self, points: int, rate: float = 0.0, block: int | dict[str, int] = 100, scan_id: str | None = None,
             skip: dict[str, set[int]] | None = None, analysis: dict[str, Any] | None = None,
             timeout: float = 120.0, during: Callable[[], None] | None = None,
             before: Callable[[str], None] | None = None,
             geometry: dict[str, Any] | None = None) -> tuple[dict[str, Any], Tally]:
        """StartScan, send every block, EndScan, wait for the probe to see the
        scan's end; the JSON-able summary and the probe's tally. ``before(scan_id)``
        runs after StartScan on this thread (it may use the sources' sockets);
        ``during`` runs in another thread while the points are sent;
        ``geometry`` replaces the default one (its points must be ``points``)."""
        scan_id = scan_id or f"sim-{self.pipeline}-{time.time_ns() // 1000}"
        doc = scan_document(scan_id, int(time.time()) % 1_000_000, points, self.pipeline, self.profile,
                            list(self.sources), analysis, geometry)
        master = self.master()
        driver = ScanDriver(self.profile, self.sources, block, rate, skip or {})
        blocked0 = sum(s.blocked_seconds for s in self.sources.values())

        t0 = time.monotonic()
        master.StartScan(json.dumps(doc))
        if before:
            before(scan_id)
        helper = threading.Thread(target=during, daemon=True) if during else None
        if helper:
            helper.start()
        sent = driver.send(scan_id, points)
        master.EndScan(scan_id)
        tally = self.probe.wait_end(scan_id, timeout)
        wall = time.monotonic() - t0
        if helper:
            helper.join(timeout)
        blocked = sum(s.blocked_seconds for s in self.sources.values()) - blocked0
        summary = {"scan": scan_id, "pipeline": self.pipeline,
                   **summarise(tally, sent, wall, driver.sent_at, blocked)}
        return summary, tally

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        self.probe.close()
