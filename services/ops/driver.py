"""Play the control system: run one scan through the live mesh, from any source of data.

:class:`ScanDriver` is the one scan driver. It registers one source per
(pipeline, stream) (a detector feeding several pipelines, as the counters do,
sends to each) and a :class:`~services.ops.probe.Probe` per pipeline; per
scan it calls ``StartScan`` with the whole document on every pipeline's
master, sends every stream's blocks in acquisition order, ends each stream,
calls ``EndScan`` and waits until every probe has seen the scan's end. If
anything fails on the way, every master it started gets ``AbortScan``.

A pipeline whose master dies or hangs mid-scan is given up, alone: a
:class:`~services.ops.masters.MasterWatch` notices, its sources are no longer
fed (a send to a held-back source waits in short steps, asking the watch in
between, never for good), the scan goes on through the other pipelines, and
the outcome names the lost pipeline and why. With a ``deadline``, nothing
the driver does outlasts it.

What it sends is pluggable (:class:`ScanData`): the simulated beamline
(``services/sim/sims.py`` ``Simulation``), the plumbing profiles of the tests
and benchmarks (``services/sim/profiles.py`` ``ProfileScan``), later replayed
recordings. ``tangomesh scan --sim``, the demo, the pipeline tests and the
benchmarks all run their scans through it.

Nothing on the data path touches Tango: the masters are called twice per scan.
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from services.ops.probe import Probe, Tally, summarise
from services.ops.masters import MasterWatch, ScanMasters
from services.registration import ManagerLink, wait_registered
from services.source import SendTimeout, SourceClient, stream_descriptor

#: Called while a scan runs: (points sent, points delivered per pipeline).
Progress = Callable[[int, dict[str, int]], None]
PROGRESS_PERIOD_S = 0.1
#: Most points per message a driver made :meth:`ScanDriver.for_data` declares for its sources, by default.
DEFAULT_MAX_BLOCK = 1000
#: A send to a held-back source waits this long at a time before asking whether its master is still there.
SEND_STEP_S = 0.25
#: How long AbortScan to a lost pipeline's master is waited for: it is not answering anyway.
LOST_ABORT_WAIT_S = 1.0


class ScanData(Protocol):
    """What one scan sends, whatever produces it."""

    @property
    def points(self) -> int:
        """Acquisition indices of the scan: every stream sends [0, points)."""

    @property
    def pipelines(self) -> Collection[str]:
        """The pipelines this scan can feed."""

    def streams_of(self, pipeline: str) -> Sequence[str]:
        """The streams ``pipeline`` takes."""

    def document(self, scan_id: str, number: int, command: str | None = None,
                 pipelines: list[str] | None = None) -> dict[str, Any]:
        """The StartScan document, with analysis settings for ``pipelines`` (default: all)."""

    def arrays(self, stream: str, start: int, stop: int) -> dict[str, np.ndarray] | None:
        """``stream``'s arrays for points [start, stop), leading axis ``stop - start``;
        None: these points never come (sent as a gap, as a detector's missed frames)."""


@dataclass
class ScanOutcome:
    """One scan as every probe saw it."""

    scan: str
    points: int
    wall_s: float
    per_pipeline: dict[str, dict[str, Any]] = field(default_factory=dict)  # probe.summarise per pipeline
    tallies: dict[str, Tally] = field(default_factory=dict)
    sent_bytes: int = 0
    blocked_s: float = 0.0  # time the sources waited for the mesh (backpressure), all pipelines
    failed: dict[str, str] = field(default_factory=dict)  # pipelines given up mid-scan, and why

    @property
    def lossless(self) -> bool:
        return not self.failed and all(s["missing"] == 0 and s["duplicates"] == 0 and s["out_of_order"] == 0 and not s["aborted"]
                   for s in self.per_pipeline.values())

    def to_json(self) -> dict[str, Any]:
        return {"scan": self.scan, "points": self.points, "wall_s": round(self.wall_s, 3),
                "sent_MiB": round(self.sent_bytes / 2**20, 2), "sources_blocked_s": round(self.blocked_s, 3),
                "lossless": self.lossless, "failed": self.failed,
                "pipelines": self.per_pipeline}


Block = tuple[int, int, str]  # (start, stop, stream)


def acquisition_order(points: int, sizes: Mapping[str, int], skip: Mapping[str, Collection[int]]) -> Iterator[Block]:
    """Every stream's blocks merged as detectors send them: a block leaves
    once its last point is acquired, so by stop (then start); the blocks
    starting at an index in ``skip[stream]`` are never sent (gaps on purpose)."""

    def blocks(stream: str) -> Iterator[Block]:
        size, skipped = sizes[stream], skip.get(stream, ())
        return ((start, min(points, start + size), stream) for start in range(0, points, size) if start not in skipped)

    return heapq.merge(*(blocks(s) for s in sizes), key=lambda b: (b[1], b[0]))


class ScanDriver:
    """Sources and probes for a set of pipelines, and the scans run through them.

    ``streams`` maps each pipeline to the streams it takes; use
    :meth:`for_data` to take them from the data. ``keep`` makes the probes
    keep every delivered chunk (:meth:`Tally.arrays`), for tests.
    """

    def __init__(self, link: ManagerLink, streams: Mapping[str, Iterable[str]], host: str = "127.0.0.1",
                 keep: bool = False, descriptors: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.link = link
        self.pipelines = list(streams)
        self.sources: dict[tuple[str, str], SourceClient] = {}
        self.probes: dict[str, Probe] = {}
        try:
            for pipeline, names in streams.items():
                for stream in names:
                    self.sources[pipeline, stream] = SourceClient(stream, pipeline, link, host,
                                                                  descriptor=(descriptors or {}).get(stream))
                self.probes[pipeline] = Probe(pipeline, link, host, keep)
            wait_registered(*(p.registration for p in self.probes.values()),
                            *(s.registration for s in self.sources.values()))
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_data(cls, data: ScanData, link: ManagerLink, pipelines: Iterable[str] | None = None,
                 host: str = "127.0.0.1", keep: bool = False, max_block: int = DEFAULT_MAX_BLOCK) -> ScanDriver:
        """A driver for ``pipelines`` (default: all of the data's), with the
        streams the data sends each, every source describing its stream so
        that the masters cap its frames to fit: from the data's first point and
        blocks up to ``max_block`` or, for data that knows its blocks (a
        recording), from its first block and its largest."""
        chosen = list(pipelines or data.pipelines)
        unknown = sorted(set(chosen) - set(data.pipelines))
        if unknown:
            raise ValueError(f"the scan has no pipelines {unknown} (it has {sorted(data.pipelines)})")
        streams = {p: data.streams_of(p) for p in chosen}
        wanted = {s for p in chosen for s in streams[p]}
        recorded = getattr(data, "blocks", None)
        if recorded is None:
            descriptors = {s: stream_descriptor(data.arrays(s, 0, 1), max_block) for s in wanted}
        else:
            first: dict[str, tuple[int, int]] = {}
            largest: dict[str, int] = {}
            for start, stop, stream in recorded():
                if data.arrays(stream, start, stop) is None:
                    continue  # a recorded gap: no arrays to describe
                first.setdefault(stream, (start, stop))
                largest[stream] = max(largest.get(stream, 0), stop - start)
            descriptors = {s: stream_descriptor(data.arrays(s, *first[s]), largest[s]) for s in wanted if s in first}
        return cls(link, streams, host, keep, descriptors)

    def delivered(self, scan_id: str) -> dict[str, int]:
        """Points each pipeline's probe has seen so far."""
        return {pipeline: probe.points_seen(scan_id) for pipeline, probe in self.probes.items()}

    def run(self, data: ScanData, scan_id: str, number: int, *, command: str | None = None, rate: float = 0.0,
            block: int | Mapping[str, int] = 1, skip: Mapping[str, Collection[int]] | None = None,
            timeout: float = 300.0, progress: Progress | None = None,
            before: Callable[[str], None] | None = None, during: Callable[[], None] | None = None,
            deadline: float | None = None, recorded_pace: bool = False) -> ScanOutcome:
        """One whole scan, and what every pipeline delivered.

        ``rate`` in points per second (0: as fast as the mesh takes them);
        ``block`` the points per message, one size or one per stream
        (detectors rarely agree; the master joins them); ``skip``: stream ->
        block starts never sent; ``timeout``: seconds to wait for the scan's
        end once everything is sent. ``before(scan_id)`` runs after
        ``StartScan``, on this thread (it may use the sources' sockets);
        ``during()`` runs on another thread while the blocks are sent;
        ``deadline`` (``time.monotonic()``): the latest the scan may end,
        sending included (TimeoutError past it). Data that knows its own
        blocks (a recording, :class:`~services.ops.replay.Replay`) is sent in
        those, ``block`` and ``skip`` unused; with ``recorded_pace`` at the
        times they were recorded.
        """
        targets = self._targets(data)
        points = data.points
        recorded = getattr(data, "blocks", None)
        if recorded is not None:
            plan: Iterable[Block] = recorded()
            due: Iterable[float] | None = data.times() if recorded_pace else None  # type: ignore[attr-defined]
        else:
            sizes = dict(block) if isinstance(block, Mapping) else {stream: block for stream in targets}
            if set(sizes) != set(targets) or min(sizes.values()) < 1:
                raise ValueError(f"need a block size >= 1 for each of the streams {sorted(targets)} (got {block!r})")
            for stream, pairs in targets.items():
                limit = min((src.descriptor["max_block"] for _, src in pairs if src.descriptor), default=None)
                if limit is not None and sizes[stream] > limit:
                    raise ValueError(f"stream {stream}: blocks of {sizes[stream]} points, more than the {limit} "
                                     "its sources registered")
            plan, due = acquisition_order(points, sizes, skip or {}), None
        if rate < 0:
            raise ValueError("rate >= 0 points per second (0: as fast as the mesh takes them)")
        masters = ScanMasters(self.link, self.pipelines, deadline)
        document = data.document(scan_id, number, command, self.pipelines)
        blocked0 = {p: self._blocked(p) for p in self.pipelines}
        helper: threading.Thread | None = None
        watch: MasterWatch | None = None
        t0 = time.monotonic()
        try:
            masters.start(document)
            watch = masters.watch(scan_id)
            if before:
                before(scan_id)
            helper = threading.Thread(target=during, name="during-scan", daemon=True) if during else None
            if helper:
                helper.start()
            sent_at, sent_bytes = self._send(data, scan_id, plan, due, targets, rate, progress, watch, deadline)
            for (pipeline, _), source in self.sources.items():
                self._push(pipeline, lambda step, source=source: source.end(scan_id, points, step), watch, deadline)
            for pipeline, why in masters.end(scan_id, watch).items():
                watch.lose(pipeline, f"EndScan: {why}")  # no-op for a pipeline lost meanwhile
            end_by = time.monotonic() + timeout if deadline is None else min(deadline, time.monotonic() + timeout)
            tallies = self._wait(scan_id, points, end_by, progress, watch)
        except BaseException:
            if watch:
                watch.stop()
            masters.abort(scan_id)
            raise
        watch.stop()
        if watch.lost:  # a hung master may take it when it wakes; a restarted one never knew the scan (logged)
            masters.abort(scan_id, only=watch.lost, wait_s=LOST_ABORT_WAIT_S)
        wall = time.monotonic() - t0
        if helper:
            helper.join(timeout)
        outcome = ScanOutcome(scan_id, points, wall, tallies=tallies, sent_bytes=sent_bytes, failed=dict(watch.lost))
        for pipeline in self.pipelines:
            tally = tallies.get(pipeline) or self.probes[pipeline].tallies.get(scan_id) or Tally(points)
            blocked = self._blocked(pipeline) - blocked0[pipeline]
            summary = summarise(tally, points, wall, sent_at, blocked)
            if pipeline in watch.lost:
                summary["error"] = watch.lost[pipeline]
            outcome.per_pipeline[pipeline] = summary
            outcome.blocked_s += blocked
        return outcome

    def _push(self, pipeline: str, send: Callable[[float], None], watch: MasterWatch,
              deadline: float | None) -> bool:
        """``send(step)`` until it goes through (True), the pipeline is lost
        (False: nothing more goes to it) or the deadline passes (TimeoutError)."""
        while not watch.is_lost(pipeline):
            try:
                send(SEND_STEP_S)
                return True
            except SendTimeout:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"pipeline {pipeline}: its master held its sources back "
                                       "past the scan's timeout") from None
        return False

    def _send(self, data: ScanData, scan_id: str, blocks: Iterable[Block], due: Iterable[float] | None,
              targets: Mapping[str, list[tuple[str, SourceClient]]], rate: float, progress: Progress | None,
              watch: MasterWatch, deadline: float | None) -> tuple[np.ndarray, int]:
        """Every block to every source of its stream (of a pipeline not lost),
        paced at ``rate`` or at ``due`` (seconds from the start, one per
        block); when each point was sent (for the latency), and the bytes sent."""
        sent_at = np.full(data.points, np.nan)
        sent_bytes = 0
        t0 = last_report = time.monotonic()
        times = iter(due) if due is not None else None
        for start, stop, stream in blocks:
            at = next(times) if times is not None else (stop / rate if rate > 0 else None)
            if at is not None:
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"scan {scan_id}: sent {start} of {data.points} points within the timeout")
            arrays = data.arrays(stream, start, stop)
            for pipeline, source in targets[stream]:
                if arrays is None:
                    self._push(pipeline, lambda step, source=source: source.gap(scan_id, start, stop, "recorded gap",
                                                                                 step), watch, deadline)
                elif self._push(pipeline, lambda step, source=source: source.block(scan_id, start, arrays, step),
                                watch, deadline):
                    sent_bytes += sum(a.nbytes for a in arrays.values())
            if arrays is not None:
                sent_at[start:stop] = time.monotonic()
            if progress and time.monotonic() - last_report > PROGRESS_PERIOD_S:
                last_report = time.monotonic()
                progress(stop, self.delivered(scan_id))
        return sent_at, sent_bytes

    def _targets(self, data: ScanData) -> dict[str, list[tuple[str, SourceClient]]]:
        """stream -> the (pipeline, source) pairs (one per pipeline taking it) its blocks go to."""
        targets: dict[str, list[tuple[str, SourceClient]]] = {}
        for pipeline in self.pipelines:
            wanted = set(data.streams_of(pipeline))
            registered = {s for (p, s) in self.sources if p == pipeline}
            if wanted != registered:
                raise ValueError(f"pipeline {pipeline}: the scan sends streams {sorted(wanted)}, "
                                 f"the driver has sources for {sorted(registered)}")
            for stream in data.streams_of(pipeline):
                targets.setdefault(stream, []).append((pipeline, self.sources[pipeline, stream]))
        return targets

    def _blocked(self, pipeline: str) -> float:
        return sum(s.blocked_seconds for (p, _), s in self.sources.items() if p == pipeline)

    def _wait(self, scan_id: str, points: int, deadline: float, progress: Progress | None,
              watch: MasterWatch) -> dict[str, Tally]:
        """Every probe's tally at the scan's end, but of the pipelines lost (on the way or while waiting)."""
        tallies: dict[str, Tally] = {}
        while True:
            for pipeline, probe in self.probes.items():
                tally = probe.ended(scan_id)
                if tally is not None:
                    tallies[pipeline] = tally
            if progress:
                progress(points, self.delivered(scan_id))
            waiting = sorted(set(self.probes) - set(tallies) - set(watch.lost))
            if not waiting:
                return tallies
            if time.monotonic() > deadline:
                raise TimeoutError(f"scan {scan_id}: pipelines {waiting} did not end in time "
                                   f"(delivered so far: {self.delivered(scan_id)})")
            time.sleep(0.02)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        for probe in self.probes.values():
            probe.close()
