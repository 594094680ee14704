"""PipelineMaster: scan control, event formation, burst queue, credit fan-out.

One loop thread owns every socket and all scan state; Tango commands hand it
work through :meth:`MasterComponent.call` and wait for the answer, so there are
no locks on the data path and no Tango calls in it. See services/protocol.py
for who talks to whom.

A second thread watches the sorter's registration: when a restarted sorter
registers (a new ``results_in``), the loop re-sends it every active scan,
with where delivery stands (``resume_from``), and dispatches every
unacknowledged unit again (docs/pipeline.md, "When a stage dies").
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq

from pipelines import processors
from services import protocol
from pipelines.component import PipelineComponent
from pipelines.dispatch import Affinity, Dispatcher
from pipelines.formation import EventFormer
from services import codec, security
from services.dataplane import (CONTROL_MAX_FRAME_BYTES, DATA_MAX_FRAME_BYTES, DropWatch, bind, limit_frames,
                                stream_frame_cap)
from services.recording import RecordingError, ScanRecording
from services.registration import ManagerLink
from services.scan import ScanError, ScanMeta, parse_scan

log = logging.getLogger("tangomesh.master")

SOURCE_HWM = 16  # messages buffered per source connection: the rest waits at the source
LOOP_POLL_MS = 10
FINISHED_KEPT = 64
SORTER_CHECK_SECONDS = 1.0  # how often the sorter's registration is looked at (a restart moves its endpoint)


@dataclass(frozen=True)
class MasterConfig:
    max_queue_bytes: int = 256 * 2**20
    max_unit_points: int = 1000
    max_unit_bytes: int = 8 * 2**20
    incomplete_timeout: float = 5.0
    worker_timeout: float = 2.0
    affinity: Affinity = Affinity()
    preload: tuple[str, ...] = ()  # processors whose settings checks are made ready at start-up; "*": all
    sorter_timeout: float = 30.0  # no sorter registered this long while scans run: they are aborted
    record_directory: str = ""  # every scan's source streams recorded under it (services/recording.py); "": off

    def __post_init__(self) -> None:
        for prop, value in (("MaxQueueBytes", self.max_queue_bytes), ("MaxUnitPoints", self.max_unit_points),
                            ("MaxUnitBytes", self.max_unit_bytes), ("IncompleteTimeoutSeconds", self.incomplete_timeout),
                            ("WorkerTimeoutSeconds", self.worker_timeout),
                            ("SorterTimeoutSeconds", self.sorter_timeout)):
            if value <= 0:
                raise ValueError(f"{prop} must be positive (got {value})")


@dataclass
class ScanPlan:
    """What StartScan resolved outside the loop (validation, lookups)."""

    meta: ScanMeta
    streams: list[str]
    sources: dict[str, str]  # endpoint -> stream
    sorter: str  # results_in endpoint
    affinity: Affinity
    frame_caps: dict[str, int] = field(default_factory=dict)  # endpoint -> ZMQ_MAXMSGSIZE, from its descriptor


@dataclass
class ScanRun:
    plan: ScanPlan
    former: EventFormer
    started: float
    pending: codec.Message | None = None  # cut but waiting for credit
    end_sent: bool = False
    aborted: bool = False
    acked_points: int = 0
    gap_points: int = 0
    acked: list[list[int]] = field(default_factory=list)  # merged ranges the sorter acknowledged
    points: int | None = None  # known once the end is sent
    started_wall: float = field(default_factory=time.time)
    recording: ScanRecording | None = None

    @property
    def scan_id(self) -> str:
        return self.plan.meta.scan_id

    def summary(self) -> dict[str, Any]:
        out = self.former.summary()
        out.update(acked=self.acked_points, gaps=self.gap_points, ended=self.end_sent, aborted=self.aborted)
        if self.points is not None:
            out["points"] = self.points
        return out


@dataclass
class SourceLink:
    """The master's connection to one source: its frames capped by the
    source's stream descriptor, its drops by ZeroMQ counted and repaired."""

    socket: zmq.Socket
    stream: str
    endpoint: str = ""
    drops: DropWatch | None = None

    def close(self) -> None:
        if self.drops:
            self.drops.close()
        self.socket.close(0)


class MasterComponent(PipelineComponent):
    kind = protocol.Kind.MASTER

    def __init__(
        self,
        name: str,
        pipeline: str,
        bind_host: str,
        advertised_host: str,
        config: MasterConfig,
        link: ManagerLink,
        thread_factory: Callable[..., threading.Thread] = threading.Thread,
    ) -> None:
        super().__init__(name, pipeline, link, log)
        self.config = config
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.linger = 0
        limit_frames(self.router, CONTROL_MAX_FRAME_BYTES)  # workers send credit only
        self.auth.serve(self.router, security.rule(protocol.Kind.WORKER, pipeline=pipeline), "the work socket")
        self.acks = self.context.socket(zmq.PULL)
        self.acks.linger = 0
        limit_frames(self.acks, CONTROL_MAX_FRAME_BYTES)
        self.auth.serve(self.acks, security.rule(protocol.Kind.SORTER, pipeline=pipeline), "the ack socket")
        self.endpoints = {
            protocol.WORK: bind(self.router, bind_host, advertised_host),
            protocol.ACKS: bind(self.acks, bind_host, advertised_host),
        }
        self.capabilities = {"max_queue_bytes": config.max_queue_bytes}
        self.dispatcher = Dispatcher(config.worker_timeout)
        self.sources: dict[str, SourceLink] = {}
        self.sorters: dict[str, zmq.Socket] = {}
        self.runs: dict[str, ScanRun] = {}  # active, in start order
        self.finished: collections.OrderedDict[str, ScanRun] = collections.OrderedDict()
        self.current_scan = ""
        self.sources_held = False
        self.held_seconds = 0.0
        self.events_per_second = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self._dispatched_points = 0
        self._calls: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self.sorter_restarts = 0
        self.threads = [thread_factory(target=self._run, name="master-loop", daemon=True),
                        thread_factory(target=self._watch_sorter, name="master-sorter-watch", daemon=True)]

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Prepare the ``preload`` processors first (pyFAI for xrd takes
        seconds): their settings checks run in StartScan, whose client waits 3 s."""
        for name, why in processors.preload(self.config.preload).items():
            self.counters.error(f"processor {name} cannot be loaded: {why}")
        super().start()

    def stop(self) -> None:
        super().stop()
        for sock in [self.router, self.acks, *self.sorters.values()]:
            sock.close(0)
        for link in self.sources.values():
            link.close()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the loop thread and return its result (or raise its exception)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        return future.result(timeout)

    # ------------------------------------------------------------ scan control (Tango threads)
    def plan_scan(self, document: str) -> ScanPlan:
        """Validate a StartScan document and find the scan's sources and sorter.
        ValueError (ScanError) for bad input, ManagerUnavailable if the topology
        manager does not answer."""
        meta = parse_scan(document)
        processor, settings = meta.analysis_for(self.pipeline)
        if processor not in processors.available():
            raise ScanError(f"processor {processor!r} of pipeline {self.pipeline} is not installed "
                            f"(available: {', '.join(processors.available())})")
        self.check_settings(meta, processor, settings)
        entry = meta.raw["analysis"][self.pipeline]
        affinity = Affinity.from_json(entry["affinity"]) if "affinity" in entry else self.config.affinity
        services = self.link.lookup({"pipeline": self.pipeline})
        sources: dict[str, str] = {}
        caps: dict[str, int] = {}
        for s in services:
            stream = s.get("capabilities", {}).get("stream")
            endpoint = s.get("endpoints", {}).get(protocol.SOURCE_OUT)
            if s["kind"] == protocol.Kind.SOURCE and isinstance(stream, str) and endpoint:
                sources[endpoint] = stream
                try:
                    caps[endpoint] = stream_frame_cap(s.get("capabilities", {}))
                except ValueError as exc:
                    raise ScanError(f"source {s['name']} of stream {stream}: {exc}") from None
        wanted = entry.get("streams")
        streams = list(wanted) if wanted else sorted(set(sources.values()))
        lacking = sorted(set(streams) - set(sources.values()))
        if not streams or lacking:
            raise ScanError(f"scan {meta.scan_id}: no registered source for stream(s) {lacking or 'any'} "
                            f"of pipeline {self.pipeline}")
        sources = {e: s for e, s in sources.items() if s in streams}
        sorters = [s["endpoints"].get(protocol.RESULTS_IN) for s in services if s["kind"] == protocol.Kind.SORTER]
        sorters = [e for e in sorters if e]
        if len(sorters) != 1:
            raise ScanError(f"pipeline {self.pipeline} needs exactly one registered sorter, found {len(sorters)}")
        return ScanPlan(meta, streams, sources, sorters[0], affinity, {e: caps[e] for e in sources})

    def check_settings(self, meta: ScanMeta, processor: str, settings: dict[str, Any]) -> None:
        """The processor's own check of the scan's settings, before anything
        is sent: bad settings refuse the scan here, with the processor's
        message, instead of failing every point in the workers."""
        try:
            processors.load(processor).check_settings(meta, settings)
        except ValueError as exc:
            raise ScanError(f"scan {meta.scan_id}: {processor} settings refused: {exc}") from None
        except Exception as exc:  # a broken plugin: refuse the scan, keep the master up
            raise ScanError(f"scan {meta.scan_id}: {processor} settings could not be checked: "
                            f"{type(exc).__name__}: {exc}") from None

    def start_scan(self, plan: ScanPlan) -> None:
        self.call(lambda: self._start(plan))

    def end_scan(self, scan_id: str) -> None:
        self.call(lambda: self._end(scan_id))

    def abort_scan(self, scan_id: str, reason: str = "") -> None:
        """Abort everywhere; ``reason`` (the control system's words) goes with scan_abort to the consumers."""
        self.call(lambda: self._abort(scan_id, reason))

    # ------------------------------------------------------------ scan control (loop thread)
    def _start(self, plan: ScanPlan) -> None:
        scan_id = plan.meta.scan_id
        if scan_id in self.runs or scan_id in self.finished:
            raise ScanError(f"scan {scan_id} was already started on this master; scan ids must be unique")
        now = time.monotonic()
        for run in self.runs.values():
            if run.former.end_requested_at is None:
                log.warning("scan %s started while %s had no EndScan: ending %s", scan_id, run.scan_id, run.scan_id)
                run.former.request_end(now)
        self._connect_sources(plan.sources, plan.frame_caps)
        self._sorter_socket(plan.sorter)
        run = ScanRun(plan, EventFormer(plan.meta, plan.streams, self.config.incomplete_timeout, now), now)
        if self.config.record_directory:
            try:
                run.recording = ScanRecording(Path(self.config.record_directory), scan_id, self.pipeline,
                                              plan.meta.raw, now)
            except RecordingError as exc:
                self.counters.error(f"scan {scan_id} is not recorded: {exc}")
        self.runs[scan_id] = run
        self.current_scan = scan_id
        start = self._scan_start_message(run)
        self._to_sorter(run, codec.Message(codec.SCAN_START, scan=scan_id, meta={
            **start.meta, protocol.META_ACKS: self.endpoints[protocol.ACKS]}))
        for identity in list(self.dispatcher.workers):
            self._to_worker(identity, start)
        log.info("scan %s started: %d points, streams %s, %d workers", scan_id, plan.meta.points,
                 plan.streams, len(self.dispatcher.workers))

    def _end(self, scan_id: str) -> None:
        run = self.runs.get(scan_id)
        if run is None:
            if scan_id in self.finished:
                return  # already complete: EndScan after the last point is normal
            raise ScanError(f"no scan {scan_id!r} on this master (current: {self.current_scan or 'none'})")
        run.former.request_end()

    def _abort(self, scan_id: str, reason: str = "", consumers: tuple[str, ...] = ()) -> None:
        """Abort everywhere: the sorter (which tells the consumers), the
        workers, and, when there is no sorter to do it, the ``consumers``'
        ``data_in`` endpoints directly."""
        run = self.runs.pop(scan_id, None)
        if run is None:
            if scan_id in self.finished:
                return
            raise ScanError(f"no scan {scan_id!r} on this master (current: {self.current_scan or 'none'})")
        run.aborted = True
        dropped = self.dispatcher.drop_scan(scan_id)
        abort = codec.Message(codec.SCAN_ABORT, scan=scan_id, meta={protocol.META_REASON: reason} if reason else {})
        self._to_sorter(run, abort)
        for identity in list(self.dispatcher.workers):
            self._to_worker(identity, abort)
        for endpoint in consumers:
            self._to_consumer(endpoint, codec.Message(codec.SCAN_ABORT, scan=scan_id, stream=self.pipeline,
                                                      meta=abort.meta))
        self._finish(run)
        log.warning("scan %s aborted (%d units in flight abandoned)%s", scan_id, dropped,
                    f": {reason}" if reason else "")

    def _to_consumer(self, endpoint: str, msg: codec.Message) -> None:
        """One message straight to a consumer (only when its sorter is gone)."""
        sock = self.context.socket(zmq.PUSH)
        sock.linger = 2000
        sock.sndtimeo = 2000
        try:
            self.auth.connect(sock, endpoint)
            codec.send(sock, msg)
        except (zmq.ZMQError, security.UnknownPeer) as exc:
            self.counters.error(f"{msg.type} of scan {msg.scan} not delivered to {endpoint}: {exc}")
        finally:
            sock.close()

    def _sorter_socket(self, endpoint: str) -> zmq.Socket:
        sorter = self.sorters.get(endpoint)
        if sorter is None:
            sorter = self.context.socket(zmq.PUSH)
            sorter.linger = 0
            sorter.sndtimeo = 2000
            self.auth.connect(sorter, endpoint)
            self.sorters[endpoint] = sorter
        return sorter

    # ------------------------------------------------------------ a restarted sorter
    def _watch_sorter(self) -> None:
        """Look up the pipeline's sorter now and then (a Tango call: never on
        the loop thread); a new endpoint while scans are active goes to the
        loop as :meth:`_sorter_moved`."""
        missing_since: float | None = None
        while not self._stopping.wait(SORTER_CHECK_SECONDS):
            if not self.runs:
                missing_since = None
                continue
            try:
                found = [s.get("endpoints", {}).get(protocol.RESULTS_IN)
                         for s in self.link.lookup({"kind": protocol.Kind.SORTER, "pipeline": self.pipeline})]
                found = [e for e in found if e]
                moved = len(found) == 1 and any(r.plan.sorter != found[0] for r in list(self.runs.values()))
                now = time.monotonic()
                missing_since = (missing_since or now) if not found else None
                gone = missing_since is not None and now - missing_since >= self.config.sorter_timeout
                consumers = tuple(sorted(self._consumer_endpoints())) if gone else ()
            except Exception as exc:  # the manager is away: look again later, scans go on meanwhile
                log.debug("sorter lookup failed: %s", exc)
                continue
            if moved:
                self._calls.put((lambda endpoint=found[0]: self._sorter_moved(endpoint),
                                 concurrent.futures.Future()))
            elif gone:
                self._calls.put((lambda c=consumers: self._sorter_gone(c), concurrent.futures.Future()))
                missing_since = None

    def _consumer_endpoints(self) -> set[str]:
        """``data_in`` of every consumer of this pipeline (a Tango lookup: watcher thread only)."""
        return {s["endpoints"][protocol.DATA_IN] for s in self.link.lookup({})
                if s["kind"] in protocol.CONSUMER_KINDS and s.get("pipeline", "") in ("", self.pipeline)
                and s.get("endpoints", {}).get(protocol.DATA_IN)}

    def _sorter_gone(self, consumers: tuple[str, ...]) -> None:
        """No sorter has been registered for SorterTimeoutSeconds: the results
        of the active scans cannot reach anyone, so they are aborted
        everywhere, the consumers told directly, rather than left waiting."""
        reason = (f"no sorter registered for pipeline {self.pipeline} for {self.config.sorter_timeout:g} s: "
                  "results cannot be delivered")
        for scan_id in list(self.runs):
            self._abort(scan_id, reason, consumers)

    def _sorter_moved(self, endpoint: str) -> None:
        """A new sorter took the pipeline's registration (the old one died or
        restarted): whatever the old one held unacknowledged is gone. Every
        active scan is started there again with ``resume_from`` (the first
        index not acknowledged), its end if already sent, the workers are told
        where results now go, and every unacknowledged unit is dispatched
        again. Nothing acknowledged is sent twice."""
        moved = [r for r in self.runs.values() if r.plan.sorter != endpoint]
        if not moved:
            return
        self.sorter_restarts += 1
        for run in moved:
            run.plan.sorter = endpoint
        self._sorter_socket(endpoint)
        for old in [e for e in self.sorters if e != endpoint and all(r.plan.sorter != e for r in self.runs.values())]:
            self.sorters.pop(old).close(0)
        for run in moved:
            resume = protocol.acked_prefix(map(tuple, run.acked))
            start = self._scan_start_message(run)
            self._to_sorter(run, codec.Message(codec.SCAN_START, scan=run.scan_id, meta={
                **start.meta, protocol.META_ACKS: self.endpoints[protocol.ACKS],
                protocol.META_RESUME: resume, protocol.META_ACKED: run.acked}))
            if run.end_sent:
                self._to_sorter(run, self._scan_end_message(run))
            for identity in list(self.dispatcher.workers):
                self._to_worker(identity, start)
            again = self.dispatcher.requeue_scan(run.scan_id)
            log.warning("scan %s: sorter now at %s; resumed from index %d, %d units dispatched again",
                        run.scan_id, endpoint, resume, again)

    def _connect_sources(self, wanted: dict[str, str], caps: dict[str, int] | None = None) -> None:
        """Connect to each wanted source (endpoint -> stream), its frames capped
        at ``caps[endpoint]`` (from its stream descriptor; else the data cap)."""
        for endpoint in [e for e in self.sources if e not in wanted]:
            if not any(e == endpoint for r in self.runs.values() for e in r.plan.sources):
                self.sources.pop(endpoint).close()
        for endpoint, stream in wanted.items():
            cap = (caps or {}).get(endpoint, DATA_MAX_FRAME_BYTES)
            link = self.sources.get(endpoint)
            if link is not None and link.socket.maxmsgsize != cap:  # the source re-registered, described anew
                self.sources.pop(endpoint).close()
            if endpoint not in self.sources:
                self.sources[endpoint] = self._source_link(endpoint, stream, cap)

    def _source_link(self, endpoint: str, stream: str, cap: int) -> SourceLink:
        sock = self.context.socket(zmq.PULL)
        sock.rcvhwm = SOURCE_HWM
        sock.linger = 0
        limit_frames(sock, cap)
        drops = DropWatch(sock, f"the {stream} source", self.counters)
        try:
            self.auth.connect(sock, endpoint)
        except security.UnknownPeer:
            drops.close()
            raise
        return SourceLink(sock, stream, endpoint, drops)

    def _repair_source(self, link: SourceLink) -> None:
        """A source ZeroMQ dropped (a frame over its cap) is never reconnected
        by libzmq (a protocol error ends a connecting session): connect anew,
        so that its next blocks arrive; the dropped block is simply missing."""
        if self.sources.get(link.endpoint) is not link:
            return
        cap = link.socket.maxmsgsize
        link.close()
        self.sources[link.endpoint] = self._source_link(link.endpoint, link.stream, cap)

    def _scan_start_message(self, run: ScanRun) -> codec.Message:
        """The scan_start workers get: the document, and the sorter their results go to."""
        return codec.Message(codec.SCAN_START, scan=run.scan_id, meta={protocol.META_SCAN: run.plan.meta.raw,
                                                                        protocol.META_SORTER: run.plan.sorter})

    def _scan_end_message(self, run: ScanRun) -> codec.Message:
        return codec.Message(codec.SCAN_END, scan=run.scan_id, meta={
            protocol.META_POINTS: run.points, "incomplete": run.former.incomplete_points})

    def _finish(self, run: ScanRun) -> None:
        self.runs.pop(run.scan_id, None)
        if run.recording is not None:
            recorded = run.recording.bytes
            run.recording.close()
            log.info("scan %s recorded in %s (%.1f MiB)", run.scan_id, run.recording.directory, recorded / 2**20)
        self.dispatcher.end_scan(run.scan_id)
        self.finished[run.scan_id] = run
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        poller_key: tuple | None = None
        poller = zmq.Poller()
        last_tick = 0.0
        while not self._stopping.is_set():
            self._serve_calls()
            readable = self._readable_sources()
            monitors = {link.drops.monitor: link for link in self.sources.values() if link.drops}
            key = tuple(id(s) for s in (*readable, *monitors))
            if key != poller_key:
                poller = zmq.Poller()
                for sock in (self.router, self.acks, *readable, *monitors):  # monitors: also while sources are held
                    poller.register(sock, zmq.POLLIN)
                poller_key = key
            try:
                ready = dict(poller.poll(LOOP_POLL_MS))
            except zmq.ZMQError as exc:
                if self._stopping.is_set():
                    return
                raise exc
            now = time.monotonic()
            try:
                if self.router in ready:
                    self._drain_workers(now)
                if self.acks in ready:
                    self._drain_acks()
                for link in list(self.sources.values()):
                    if link.socket in ready:
                        self._drain_source(link, now)
                for monitor, link in monitors.items():
                    if monitor in ready and link.drops and link.drops.poll():
                        self._repair_source(link)
                if now - last_tick >= 0.05:
                    self._tick(now, now - last_tick if last_tick else 0.0)
                    last_tick = now
                self._dispatch(now)
            except Exception as exc:  # a bug must not stop the data path: count, log, go on
                log.exception("master loop step failed")
                self.counters.error(f"internal error: {exc!r}")

    def _serve_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    @property
    def queue_bytes(self) -> int:
        return sum(r.former.nbytes for r in list(self.runs.values())) + self.dispatcher.in_flight_bytes

    def _readable_sources(self) -> list[zmq.Socket]:
        """All sources while the burst queue has room. When it is full, none,
        unless nothing else can ever free it: no unit in flight (whose ack
        would) and no formed event waiting (whose dispatch would). Then the
        queue is full of streams waiting for a lagging one, and only the
        lagging streams are read, a block at a time. So the queue stays below
        MaxQueueBytes plus one block per stream. What is not read waits at the
        source: its high-water mark fills, then its send blocks."""
        links = list(self.sources.values())
        if self.queue_bytes < self.config.max_queue_bytes:
            self.sources_held = False
            return [link.socket for link in links]
        needed: set[str] = set()
        if not self.dispatcher.in_flight:
            needed = {s for r in self.runs.values() if r.pending is None and r.former.frontier == r.former.taken
                      for s in r.former.lagging()}
        readable = [link.socket for link in links if link.stream in needed]
        self.sources_held = len(readable) < len(links)
        return readable

    def _drain_source(self, link: SourceLink, now: float) -> None:
        def held() -> bool:
            return self.queue_bytes >= self.config.max_queue_bytes and link.socket not in self._readable_sources()

        if held():
            return
        for frames, msg in self.drain_frames(link.socket, f"the {link.stream} source", limit=64):
            self.counters.events_in += 1  # at most 64, then the other sockets
            try:
                run = self._accept_source(link, msg, now)
            except ValueError as exc:
                self.counters.error(f"refused {msg.type} scan={msg.scan!r} stream={msg.stream!r} "
                                    f"index={msg.index} count={msg.count}: {exc}")
            else:
                if run.recording is not None:
                    self._record(run, msg.stream, frames, now)
            if held():
                return

    def _record(self, run: ScanRun, stream: str, frames: list[Any], now: float) -> None:
        """Keep an accepted message as it came; a failing recording ends, the scan goes on."""
        assert run.recording is not None
        try:
            run.recording.write(stream, frames, now)
        except RecordingError as exc:
            self.counters.error(f"scan {run.scan_id}: recording stopped: {exc}")
            run.recording.close()
            run.recording = None

    def _accept_source(self, link: SourceLink, msg: codec.Message, now: float) -> ScanRun:
        if msg.stream != link.stream:
            raise ValueError(f"source registered for stream {link.stream!r} sent stream {msg.stream!r}")
        run = self.runs.get(msg.scan)
        if run is None:
            raise ValueError(f"no active scan {msg.scan!r} (current: {self.current_scan or 'none'})")
        if msg.type == codec.DATA:
            run.former.add_block(msg, now)
        elif msg.type == codec.SCAN_END:
            run.former.stream_end(msg.stream, msg.count)
        elif msg.type == codec.GAP:
            if msg.arrays:
                raise ValueError("a source's gap carries no arrays")
            run.former.declare_missing(msg.stream, msg.index, msg.stop, now)
            log.warning("scan %s: source of %s declares indices [%d, %d) missing%s", msg.scan, msg.stream,
                        msg.index, msg.stop, f": {msg.meta[protocol.META_REASON]}"
                        if isinstance(msg.meta.get(protocol.META_REASON), str) else "")
        else:
            raise ValueError(f"sources send data, gap and scan_end, not {msg.type}")
        return run

    def _drain_workers(self, now: float) -> None:
        for identity, msg in self.drain_routed(self.router, "the work socket"):
            try:
                worker, role, units, open_units = protocol.check_credit(msg)
            except ValueError as exc:
                self.counters.error(str(exc))
                continue
            if self.dispatcher.seen(identity, worker, role, units, now, open_units):
                log.info("worker %s joined (role %r)", worker, role)
                for run in self.runs.values():
                    self._to_worker(identity, self._scan_start_message(run))

    def _drain_acks(self) -> None:
        for msg in self.drain(self.acks, "the ack socket"):
            try:
                if msg.type != codec.ACK:
                    raise ValueError(f"the ack socket takes ack messages, not {msg.type}")
                ranges = protocol.ack_ranges(msg)
            except ValueError as exc:
                self.counters.error(f"refused ack for scan {msg.scan!r}: {exc}")
                continue
            run = self.runs.get(msg.scan)
            if run is None:
                if msg.scan not in self.finished:
                    self.counters.error(f"refused ack for unknown scan {msg.scan!r}")
                continue
            self.dispatcher.ack(msg.scan, ranges)
            before = sum(b - a for a, b in run.acked)
            run.acked = protocol.merge_ranges([*map(tuple, run.acked), *ranges])
            points = sum(b - a for a, b in run.acked) - before  # an ack repeated across a sorter restart counts once
            run.acked_points += points
            if msg.meta.get("gap"):
                run.gap_points += points

    def _tick(self, now: float, elapsed: float) -> None:
        for w in self.dispatcher.expire(now):
            log.warning("worker %s silent for %.1f s: its %d units go to other workers",
                        w.name, self.config.worker_timeout, len(w.in_flight))
        for run in self.runs.values():
            for warning in run.former.check_timeouts(now):
                log.warning(warning)
        if self.sources_held:
            self.held_seconds += elapsed
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 1.0:
            self.events_per_second = (self._dispatched_points - mark_n) / (now - mark_t)
            self._rate_mark = (now, self._dispatched_points)
        for run in list(self.runs.values()):
            if run.end_sent and self.dispatcher.outstanding(run.scan_id) == 0 and run.pending is None:
                self._finish(run)
                log.info("scan %s done: %s", run.scan_id, run.summary())
        self.counters.queue_depth = len(self.dispatcher.in_flight)

    # ------------------------------------------------------------ fan-out
    def _dispatch(self, now: float) -> None:
        d = self.dispatcher
        while (entry := d.next_retry()) is not None:
            run = self.runs.get(entry.unit.scan)
            if run is None:
                d.pop_retry()
                continue
            targets = d.choose(entry.unit, run.plan.affinity)
            if targets is None or not self._send_unit(entry.unit, targets, run, now):
                return
            d.pop_retry()
        for run in list(self.runs.values()):
            while True:
                if run.pending is None:
                    if not any(w.credit > 0 for w in d.workers.values()):
                        return
                    run.pending = run.former.take_unit(
                        self.config.max_unit_points, self.config.max_unit_bytes, run.plan.affinity.group)
                    if run.pending is None:
                        break
                targets = d.choose(run.pending, run.plan.affinity)
                if targets is None or not self._send_unit(run.pending, targets, run, now):
                    return  # head of line waits for credit (order and affinity)
                self._dispatched_points += run.pending.count
                run.pending = None
            if not run.end_sent and run.former.is_complete(now):
                run.end_sent = True
                run.points = run.former.taken
                end = self._scan_end_message(run)
                self._to_sorter(run, end)
                for identity in list(d.workers):
                    self._to_worker(identity, end)
                log.info("scan %s: all %d events dispatched", run.scan_id, run.points)

    def _send_unit(self, unit: codec.Message, targets: list[bytes], run: ScanRun, now: float) -> bool:
        """Send to the worker that owns the unit, then the copies; False if the owner is gone."""
        owner, copies = targets[0], targets[1:]
        if not self._to_worker(owner, unit):
            return False
        copy = codec.Message(unit.type, unit.scan, unit.stream, unit.index, unit.count, unit.arrays,
                             {**unit.meta, "copy": True})
        sent = [owner, *(c for c in copies if self._to_worker(c, copy))]
        self.dispatcher.sent(unit, sent, run.plan.affinity, now)
        self.counters.events_out += 1
        return True

    def _to_worker(self, identity: bytes, msg: codec.Message) -> bool:
        """False (and the worker forgotten, its units queued again) if the
        ROUTER can no longer reach it."""
        try:
            codec.send(self.router, msg, zmq.NOBLOCK, prefix=[identity])
            return True
        except zmq.ZMQError as exc:
            w = self.dispatcher.remove(identity)
            if w is not None:
                log.warning("worker %s unreachable (%s): its %d units go to other workers",
                            w.name, exc.strerror, len(w.in_flight))
            return False

    def _to_sorter(self, run: ScanRun, msg: codec.Message) -> None:
        try:
            codec.send(self.sorters[run.plan.sorter], msg)
        except zmq.Again:
            self.counters.error(f"sorter {run.plan.sorter} did not take {msg.type} of scan {run.scan_id} within 2 s")

    # ------------------------------------------------------------ views
    def progress(self) -> float:
        run = self.runs.get(self.current_scan) or self.finished.get(self.current_scan)
        if run is None:
            return 0.0
        if run.scan_id in self.finished and not run.aborted:
            return 1.0
        total = run.points if run.points is not None else run.plan.meta.points
        return min(1.0, run.acked_points / total) if total else 0.0

    def open_scans(self) -> list[dict[str, Any]]:
        """The scans still taking data, oldest first: id, planned points, the
        streams joined, when started (epoch s), whether EndScan came, and
        each stream's ``first_index`` where the document declares one. An
        ingester asks this once per detector series to know which scan the
        series belongs to (docs/ingesters.md)."""
        out = []
        for run in list(self.runs.values()):
            declared = run.plan.meta.raw.get("streams", {})
            out.append({"scan": run.scan_id, "points": run.plan.meta.points, "streams": list(run.plan.streams),
                        "started": run.started_wall, "ending": run.former.end_requested_at is not None,
                        "first_index": {s: declared[s]["first_index"] for s in run.plan.streams
                                        if "first_index" in declared.get(s, {})}})
        return out

    def scan_summary(self) -> dict[str, Any]:
        run = self.runs.get(self.current_scan) or self.finished.get(self.current_scan)
        return run.summary() if run else {}

    def status(self) -> str:
        workers = len(self.dispatcher.workers)
        held = " Sources held back: burst queue full." if self.sources_held else ""
        if self.sorter_restarts:
            held += f" Sorter restarted {self.sorter_restarts} time(s): scans resumed there."
        return (f"Scan {self.current_scan or '-'}: {self.progress():.0%} acknowledged; {workers} worker(s); "
                f"queue {self.queue_bytes / 2**20:.1f} of {self.config.max_queue_bytes / 2**20:.0f} MiB.{held}")
