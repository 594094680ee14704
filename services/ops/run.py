"""Play the control system: run a simulated scan through the live mesh.

:class:`ScanRunner` registers one source per (pipeline, stream) the scan
needs (a detector feeding several pipelines, as the counters do, sends to
each) and a probe per pipeline, calls ``StartScan`` with the whole document on
every pipeline's master, sends every point of every stream in acquisition
order at the requested rate, ends each stream and calls ``EndScan``. It
returns when every pipeline's sorter has delivered the scan's end, with what
each probe saw (points, losses, order, latency).

Nothing on the data path touches Tango: the masters are called twice per scan.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from services.sim.sims import Simulation
from services.registration import ManagerLink, master_proxy, wait_registered
from services.ops.simulate import Probe, Tally, summarise
from services.source import SourceClient

Progress = Callable[[int, dict[str, int]], None]  # (points sent, points delivered per pipeline)


@dataclass
class ScanOutcome:
    scan: str
    points: int
    wall_s: float
    per_pipeline: dict[str, dict[str, Any]] = field(default_factory=dict)  # simulate.summarise per pipeline
    sent_bytes: int = 0
    blocked_s: float = 0.0  # time the sources waited for the mesh (backpressure)

    @property
    def lossless(self) -> bool:
        return all(s["missing"] == 0 and s["duplicates"] == 0 and s["out_of_order"] == 0 and not s["aborted"]
                   for s in self.per_pipeline.values())

    def to_json(self) -> dict[str, Any]:
        return {"scan": self.scan, "points": self.points, "wall_s": round(self.wall_s, 3),
                "sent_MiB": round(self.sent_bytes / 2**20, 2), "sources_blocked_s": round(self.blocked_s, 3),
                "lossless": self.lossless,
                "pipelines": self.per_pipeline}


class ScanRunner:
    def __init__(self, sim: Simulation, link: ManagerLink, host: str = "127.0.0.1",
                 pipelines: list[str] | None = None) -> None:
        self.sim = sim
        self.link = link
        self.pipelines = pipelines or list(sim.pipelines)
        unknown = sorted(set(self.pipelines) - set(sim.pipelines))
        if unknown:
            raise ValueError(f"simulation {sim.name} has no pipelines {unknown} (it has {sorted(sim.pipelines)})")
        self.sources: dict[tuple[str, str], SourceClient] = {}
        self.probes: dict[str, Probe] = {}
        try:
            for pipeline in self.pipelines:
                for stream in sim.streams_of(pipeline):
                    self.sources[pipeline, stream] = SourceClient(stream, pipeline, link, host)
                self.probes[pipeline] = Probe(pipeline, link, host)
            wait_registered(*(p.registration for p in self.probes.values()),
                            *(s.registration for s in self.sources.values()))
        except BaseException:
            self.close()
            raise

    def masters(self) -> dict[str, Any]:
        return {pipeline: master_proxy(self.link, pipeline) for pipeline in self.pipelines}

    def run(self, scan_id: str, number: int, rate: float = 0.0, block: int = 1, timeout: float = 300.0,
            progress: Progress | None = None, command: str | None = None) -> ScanOutcome:
        """One whole scan; ``rate`` in points per second (0: as fast as the mesh takes them)."""
        if block < 1 or rate < 0:
            raise ValueError("block must be >= 1 and rate >= 0")
        sim, points = self.sim, self.sim.pattern.points
        masters = self.masters()
        document = json.dumps(sim.document(scan_id, number, command, self.pipelines))
        streams = sorted({s for (_, s) in self.sources})
        sent_at = np.full(points, np.nan)
        sent_bytes = 0
        blocked0 = sum(s.blocked_seconds for s in self.sources.values())
        t0 = time.monotonic()
        started = []
        try:
            for pipeline, master in masters.items():
                master.StartScan(document)
                started.append(pipeline)
            last_report = 0.0
            for start in range(0, points, block):
                stop = min(points, start + block)
                if rate > 0:
                    delay = t0 + stop / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                for stream in streams:
                    arrays = sim.arrays(stream, start, stop)
                    for pipeline in self.pipelines:
                        source = self.sources.get((pipeline, stream))
                        if source is not None:
                            source.block(scan_id, start, arrays)
                            sent_bytes += sum(a.nbytes for a in arrays.values())
                sent_at[start:stop] = time.monotonic()
                if progress and time.monotonic() - last_report > 0.1:
                    last_report = time.monotonic()
                    progress(stop, self.delivered(scan_id))
            for source in self.sources.values():
                source.end(scan_id, points)
            for master in masters.values():
                master.EndScan(scan_id)
        except BaseException:
            for pipeline in started:
                try:
                    masters[pipeline].AbortScan(scan_id)
                except Exception:  # the scan is failing already; report the first error
                    pass
            raise
        tallies = self._wait(scan_id, points, t0 + timeout, progress)
        wall = time.monotonic() - t0
        outcome = ScanOutcome(scan_id, points, wall, sent_bytes=sent_bytes)
        for pipeline, tally in tallies.items():
            outcome.per_pipeline[pipeline] = summarise(tally, points, wall, sent_at, 0.0)
            outcome.per_pipeline[pipeline].pop("sources_blocked_s", None)
        outcome.blocked_s = sum(s.blocked_seconds for s in self.sources.values()) - blocked0
        return outcome

    def delivered(self, scan_id: str) -> dict[str, int]:
        out = {}
        for pipeline, probe in self.probes.items():
            tally = probe.tallies.get(scan_id)
            out[pipeline] = int((tally.counts > 0).sum()) if tally is not None else 0
        return out

    def _wait(self, scan_id: str, points: int, deadline: float, progress: Progress | None) -> dict[str, Tally]:
        tallies: dict[str, Tally] = {}
        while len(tallies) < len(self.probes):
            for pipeline, probe in self.probes.items():
                tally = probe.tallies.get(scan_id)
                if tally is not None and tally.end is not None:
                    tallies[pipeline] = tally
            if progress:
                progress(points, self.delivered(scan_id))
            if time.monotonic() > deadline:
                waiting = sorted(set(self.probes) - set(tallies))
                raise TimeoutError(f"scan {scan_id}: pipelines {waiting} did not end in time "
                                   f"(delivered so far: {self.delivered(scan_id)})")
            time.sleep(0.05)
        return tallies

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        for probe in self.probes.values():
            probe.close()
