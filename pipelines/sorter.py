"""Sorter: fan-in of a pipeline's results, in order, exactly once, to every consumer.

One loop thread reads ``results_in`` (workers' results and the master's scan
control), keeps a :class:`ScanOrder` and a :class:`Chunker` per scan, and
delivers to the scan's consumers, found through the topology manager when the
scan starts. Delivery blocks while a consumer is not reading (backpressure up
to the sources); only a consumer that has left the mesh is given up. A chunk
is acknowledged to the master once every consumer has it: until then the
master keeps the events and can send them again.

Recovery (docs/pipeline.md, "When a stage dies"): a scan_start carrying
``resume_from`` is a scan the master re-sends after this sorter restarted;
delivery goes on from that index. A scan whose master leaves the topology
(its lease ran out, or a new master took its place) cannot finish: after
``master_timeout`` seconds it is aborted at every consumer, with a reason.
A consumer that registers while a scan is open (it restarted, or joined
late) is sent the scan's scan_start with ``resume_from`` where delivery
stands and gets the rest: what went to its previous process is not sent
again (the master has let those events go), so at that consumer the scan
ends ``incomplete``, the points before ``resume_from`` counted as missing.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from services import protocol
from pipelines.component import PipelineComponent
from pipelines.reorder import Chunker, ScanOrder
from services import codec, security
from services.dataplane import DATA_MAX_FRAME_BYTES, DropWatch, bind, limit_frames
from services.registration import ManagerLink, ManagerUnavailable
from services.scan import parse_scan

log = logging.getLogger("tangomesh.sorter")

ORPHAN_SECONDS = 5.0  # results may overtake their scan_start by this much
ORPHAN_MAX = 10_000
FINISHED_KEPT = 64
CONSUMER_CHECK_SECONDS = 2.0
MASTER_CHECK_SECONDS = 1.0  # how often an open scan's master is looked for in the topology


@dataclass(frozen=True)
class SorterConfig:
    chunk_points: int = 1000
    chunk_seconds: float = 0.005
    gap_timeout: float = 30.0
    master_timeout: float = 10.0  # an open scan's master missing from the topology this long: the scan is aborted

    def __post_init__(self) -> None:
        if self.chunk_points < 1 or self.chunk_seconds < 0 or self.gap_timeout <= 0 or self.master_timeout <= 0:
            raise ValueError("ChunkPoints >= 1, ChunkSeconds >= 0, GapTimeoutSeconds > 0 and "
                             "MasterTimeoutSeconds > 0 required")


@dataclass
class Consumer:
    name: str
    endpoint: str
    socket: zmq.Socket
    pid: int = 0  # with the endpoint, tells a restarted consumer (same name) from the one the scan started with


@dataclass(frozen=True)
class TopologyView:
    """What the watcher thread last found in the topology, for the loop to act on."""

    taken: float  # monotonic, when the manager answered
    masters: frozenset[str]  # ack endpoints of the pipeline's registered masters
    consumers: dict[str, tuple[str, int]]  # name -> (data_in endpoint, pid) of the pipeline's consumers


@dataclass
class SortRun:
    scan_id: str
    order: ScanOrder
    chunker: Chunker
    consumers: list[Consumer]
    acks: zmq.Socket | None
    start_msg: codec.Message
    acks_endpoint: str = ""  # identifies the scan's master in the topology
    master_seen: float = 0.0  # when the master was last found registered
    started: float = 0.0  # monotonic: topology answers from before this know nothing of the scan's consumers
    sent_to: int = 0  # every consumer of the scan has had every point before this index
    summary: dict[str, Any] = field(default_factory=dict)


class SorterComponent(PipelineComponent):
    kind = protocol.Kind.SORTER

    def __init__(
        self,
        name: str,
        pipeline: str,
        bind_host: str,
        advertised_host: str,
        config: SorterConfig,
        link: ManagerLink,
        thread_factory: Callable[..., threading.Thread] = threading.Thread,
    ) -> None:
        super().__init__(name, pipeline, link, log)
        self.config = config
        self.inlet = self.context.socket(zmq.PULL)
        self.inlet.linger = 0
        limit_frames(self.inlet, DATA_MAX_FRAME_BYTES)
        # workers push results, the master scan control
        self.auth.serve(self.inlet, security.rule(protocol.Kind.WORKER, protocol.Kind.MASTER, pipeline=pipeline),
                        protocol.RESULTS_IN, watch=False)  # the socket's one monitor is its DropWatch
        self.endpoints = {protocol.RESULTS_IN: bind(self.inlet, bind_host, advertised_host)}
        self.drops = DropWatch(self.inlet, f"results_in {self.endpoints[protocol.RESULTS_IN]}", self.counters,
                               lambda endpoint: self.auth.handshake_failed(protocol.RESULTS_IN, endpoint))
        self.runs: dict[str, SortRun] = {}
        self.finished: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.orphans: dict[str, list[tuple[float, codec.Message]]] = {}
        self.sockets: dict[str, zmq.Socket] = {}  # endpoint -> PUSH, reused across scans
        self.current_scan = ""
        self.chunks_out = 0
        self.duplicates = 0
        self.late = 0
        self.gap_points = 0
        self.resumed = 0
        self.masters_lost = 0
        self.consumers_joined = 0
        self._topology_checked = 0.0
        self._view: TopologyView | None = None  # the watcher's latest answer (None: the manager did not answer)
        self.threads = [thread_factory(target=self._run, name="sorter-loop", daemon=True),
                        thread_factory(target=self._watch_topology, name="sorter-topology-watch", daemon=True)]

    def stop(self) -> None:
        super().stop()
        self.drops.close()
        for sock in [self.inlet, *self.sockets.values()]:
            sock.close(0)

    # ------------------------------------------------------------ loop
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inlet, zmq.POLLIN)
        poller.register(self.drops.monitor, zmq.POLLIN)
        while not self._stopping.is_set():
            busy = any(r.chunker.parts for r in self.runs.values())
            ready = dict(poller.poll(1 if busy else 20))
            now = time.monotonic()
            try:
                if self.drops.monitor in ready:
                    self.drops.poll()  # a worker dropped for an oversized result reconnects by itself
                if self.inlet in ready:
                    for msg in self.drain(self.inlet, protocol.RESULTS_IN):
                        self.counters.events_in += 1
                        try:
                            self._accept(msg, now)
                        except ValueError as exc:
                            self.counters.error(f"refused {msg.type} scan={msg.scan!r} index={msg.index} "
                                                f"count={msg.count}: {exc}")
                self._timers(now)
            except Exception as exc:  # a bug must not stop the data path
                log.exception("sorter loop step failed")
                self.counters.error(f"internal error: {exc!r}")

    def _accept(self, msg: codec.Message, now: float) -> None:
        if msg.type == codec.SCAN_START:
            self._start(msg, now)
            return
        run = self.runs.get(msg.scan)
        if run is None:
            if msg.scan in self.finished:
                self.late += max(msg.count, 1) if msg.type == codec.RESULT else 0
                if msg.type != codec.RESULT:
                    raise ValueError(f"scan {msg.scan} is already finished")
                return
            if msg.type != codec.RESULT:
                raise ValueError(f"no scan {msg.scan!r} here")
            if sum(len(v) for v in self.orphans.values()) >= ORPHAN_MAX:
                raise ValueError(f"result for unknown scan {msg.scan!r}")
            self.orphans.setdefault(msg.scan, []).append((now, msg))  # may overtake its scan_start
            return
        if msg.type == codec.RESULT:
            protocol.check_result_meta(msg.meta)
            before = run.order.duplicates
            for ready in run.order.add(msg, now):
                self._chunk(run, ready, now)
            self.duplicates += run.order.duplicates - before
        elif msg.type == codec.SCAN_END:
            points = msg.meta.get(protocol.META_POINTS)
            if type(points) is not int:
                raise ValueError("scan_end without an integer 'points'")
            run.summary["incomplete"] = msg.meta.get("incomplete", 0)
            for ready in run.order.set_end(points, now):
                self._chunk(run, ready, now)
        elif msg.type == codec.SCAN_ABORT:
            self._abort(run, {protocol.META_REASON: "aborted at the master", **msg.meta})
        else:
            raise ValueError(f"{protocol.RESULTS_IN} takes results and scan control, not {msg.type}")

    def _start(self, msg: codec.Message, now: float) -> None:
        meta = parse_scan(msg.meta.get(protocol.META_SCAN, {}))
        if meta.scan_id != msg.scan:
            raise ValueError(f"scan_start for {msg.scan!r} carries the document of {meta.scan_id!r}")
        resume = protocol.check_resume(msg.meta)
        if resume is not None and msg.scan in self.runs:
            return  # re-sent while this sorter has the scan: nothing to resume
        if msg.scan in self.runs or msg.scan in self.finished:
            raise ValueError(f"scan {msg.scan} already started")
        if resume is not None and not 0 <= resume <= meta.points:
            raise ValueError(f"{protocol.META_RESUME} {resume} outside the scan's {meta.points} points")
        acks_endpoint = msg.meta.get(protocol.META_ACKS)
        if not isinstance(acks_endpoint, str) or "://" not in acks_endpoint:
            raise ValueError("scan_start without the master's ack endpoint")
        acks = self._socket(acks_endpoint)
        consumers = self._find_consumers()
        if not consumers:
            self.counters.error(f"scan {msg.scan}: no consumer registered for pipeline {self.pipeline}; "
                                "results are acknowledged but kept nowhere")
        forwarded_meta: dict[str, Any] = {protocol.META_SCAN: meta.raw}
        order = ScanOrder(msg.scan, meta.points, self.config.gap_timeout, now)
        if resume is not None:  # consumers hold [0, resume) already: they go on with the same file and entry
            forwarded_meta[protocol.META_RESUME] = order.next = resume
            self.resumed += 1
            log.warning("scan %s resumed at index %d (this sorter restarted mid-scan)", msg.scan, resume)
        forwarded = codec.Message(codec.SCAN_START, scan=msg.scan, stream=self.pipeline, meta=forwarded_meta)
        run = SortRun(msg.scan, order, Chunker(self.config.chunk_points, self.config.chunk_seconds), consumers,
                      acks, forwarded, acks_endpoint, now, started=time.monotonic(), sent_to=resume or 0)
        if resume is not None:
            run.summary["resumed_from"] = resume
        self.runs[msg.scan] = run
        self.current_scan = msg.scan
        self._deliver(run, forwarded)
        log.info("scan %s: delivering to %s", msg.scan, [c.name for c in consumers])
        for _, orphan in self.orphans.pop(msg.scan, []):
            try:  # each early result on its own: one refused must not drop the others, nor read as a bad scan_start
                self._accept(orphan, now)
            except ValueError as exc:
                self.counters.error(f"refused result [{orphan.index}, {orphan.stop}) of scan {msg.scan!r}, "
                                    f"received before its scan_start: {exc}")

    def _find_consumers(self) -> list[Consumer]:
        try:
            services = self.link.lookup({})
        except ManagerUnavailable as exc:
            self.counters.error(f"cannot look up consumers: {exc}")
            return []
        found = [self._consumer(name, endpoint, pid) for name, (endpoint, pid) in self._consumers_in(services).items()]
        return [c for c in found if c is not None]

    def _consumer(self, name: str, endpoint: str, pid: int) -> Consumer | None:
        """A consumer with its socket; None (counted) if its key cannot be found."""
        try:
            return Consumer(name, endpoint, self._socket(endpoint), pid)
        except security.UnknownPeer as exc:
            self.counters.error(f"consumer {name} left out: {exc}")
            return None

    def _consumers_in(self, services: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
        """name -> (data_in endpoint, pid) of the registered services this sorter delivers to."""
        found = {}
        for s in services:
            endpoint = s.get("endpoints", {}).get(protocol.DATA_IN)
            if s["kind"] in protocol.CONSUMER_KINDS and s.get("pipeline", "") in ("", self.pipeline) and endpoint:
                found[s["name"]] = (endpoint, int(s.get("pid", 0)))
        return found

    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self.sockets.get(endpoint)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.linger = 0
            self.auth.connect(sock, endpoint)
            self.sockets[endpoint] = sock
        return sock

    # ------------------------------------------------------------ output
    def _chunk(self, run: SortRun, msg: codec.Message, now: float) -> None:
        for chunk in run.chunker.add(msg, now):
            self._emit(run, chunk)

    def _flush(self, run: SortRun) -> None:
        if run.chunker.parts:
            self._emit(run, run.chunker.flush())

    def _emit(self, run: SortRun, msg: codec.Message) -> None:
        if not self._deliver(run, msg):
            return  # stopping: unacknowledged, so the master sends it again to whoever sorts next
        self.chunks_out += 1
        if run.acks is not None:
            try:
                codec.send(run.acks, protocol.ack(run.scan_id, [(msg.index, msg.stop)], gap=msg.type == codec.GAP),
                           zmq.NOBLOCK)
            except zmq.Again:  # the master is gone; it re-sends nothing then, and nothing is lost here
                self.counters.error(f"ack for [{msg.index}, {msg.stop}) of {run.scan_id} not taken by the master")

    def _timers(self, now: float) -> None:
        if self.runs and now - self._topology_checked >= MASTER_CHECK_SECONDS:
            self._topology_checked = now
            self._check_masters(now)
            self._check_consumers()
        for run in list(self.runs.values()):
            if run.chunker.due(now):
                self._flush(run)
            gap, ready = run.order.check_gap(now)
            if gap is not None:
                self._flush(run)
                log.warning("scan %s: indices [%d, %d) never came back: gap record sent",
                            run.scan_id, gap.index, gap.stop)
                self.gap_points += gap.count
                gap.stream = self.pipeline  # consumers fed by several pipelines need to know whose gap
                self._emit(run, gap)
                for msg in ready:
                    self._chunk(run, msg, now)
            if run.order.finished:
                self._flush(run)
                summary = {**run.order.summary(), **run.summary}
                self._deliver(run, codec.Message(codec.SCAN_END, scan=run.scan_id, stream=self.pipeline,
                                                 count=0, meta=summary))
                self._close(run)
                log.info("scan %s delivered: %s", run.scan_id, summary)
        for scan, items in list(self.orphans.items()):
            while items and now - items[0][0] > ORPHAN_SECONDS:
                _, msg = items.pop(0)
                self.counters.error(f"refused result [{msg.index}, {msg.stop}) for unknown scan {scan!r}")
            if not items:
                del self.orphans[scan]
        self.counters.queue_depth = sum(len(r.order.pending) for r in self.runs.values())

    def _watch_topology(self) -> None:
        """Look up the pipeline's masters and consumers now and then, while a
        scan is open (a Tango call: never on the loop thread, which only reads
        the latest answer)."""
        while not self._stopping.wait(MASTER_CHECK_SECONDS):
            if not self.runs:
                self._view = None  # an answer from before the next scan's master registered means nothing
                continue
            try:
                services = self.link.lookup({})
            except ManagerUnavailable:
                self._view = None
                continue
            masters = frozenset(s.get("endpoints", {}).get(protocol.ACKS, "") for s in services
                                if s["kind"] == protocol.Kind.MASTER and s.get("pipeline") == self.pipeline)
            self._view = TopologyView(time.monotonic(), masters, self._consumers_in(services))

    def _check_masters(self, now: float) -> None:
        """Abort every open scan whose master has been missing from the
        topology for ``master_timeout`` seconds: the sources' data it held is
        gone, so the scan can never complete, and consumers must not wait for
        it (nor call it complete). A manager that does not answer proves
        nothing: then no scan is aborted."""
        view = self._view
        if view is None:
            return
        for run in list(self.runs.values()):
            if run.acks_endpoint in view.masters:
                run.master_seen = now
            elif now - run.master_seen >= self.config.master_timeout:
                reason = (f"master of pipeline {self.pipeline} ({run.acks_endpoint}) gone from the topology "
                          f"for {self.config.master_timeout:g} s: the scan cannot complete")
                log.error("scan %s aborted: %s", run.scan_id, reason)
                self.masters_lost += 1
                self.counters.error(f"scan {run.scan_id} aborted: {reason}")
                self._abort(run, {protocol.META_REASON: reason})

    def _check_consumers(self) -> None:
        """Give every open scan to the consumers registered since it started
        (a restarted one has the same name and a new endpoint or pid): its
        scan_start with ``resume_from`` where delivery stands, then the rest.
        The socket to a replaced consumer's old endpoint is closed, so what
        was queued for the dead process never reaches the new one."""
        view = self._view
        if view is None:
            return
        for run in list(self.runs.values()):
            if view.taken < run.started:
                continue  # looked up before this scan's consumers were: says nothing about them
            have = {c.name: c for c in run.consumers}
            for name, (endpoint, pid) in view.consumers.items():
                old = have.get(name)
                if old is not None and (old.endpoint, old.pid) == (endpoint, pid):
                    continue
                if old is not None:
                    run.consumers.remove(old)
                    if (stale := self.sockets.pop(old.endpoint, None)) is not None:
                        stale.close(0)  # other open scans still naming it are rejoined in their turn, below
                consumer = self._consumer(name, endpoint, pid)
                if consumer is not None:
                    self._join(run, consumer, restarted=old is not None)

    def _join(self, run: SortRun, consumer: Consumer, restarted: bool) -> None:
        how = "restarted" if restarted else "registered"
        reason = (f"{consumer.name} {how} during the scan: it holds the points from index {run.sent_to} on; "
                  "those before went to its previous process or nowhere")
        start = codec.Message(codec.SCAN_START, scan=run.scan_id, stream=self.pipeline,
                              meta={**run.start_msg.meta, protocol.META_RESUME: run.sent_to,
                                    protocol.META_REASON: reason})
        log.warning("scan %s: %s", run.scan_id, reason)
        run.consumers.append(consumer)
        self.consumers_joined += 1
        if not self._deliver_to(run, consumer, codec.encode(start)):
            run.consumers.remove(consumer)

    def _abort(self, run: SortRun, meta: dict[str, Any]) -> None:
        """Deliver what is ready, then scan_abort (with the summary so far) to every consumer."""
        self._flush(run)
        # consumers (sink, writers) tell a scan's pipelines apart by this message's stream
        self._deliver(run, codec.Message(codec.SCAN_ABORT, scan=run.scan_id, stream=self.pipeline,
                                         meta={**run.order.summary(), **run.summary, **meta}))
        self._close(run, aborted=True)

    def _close(self, run: SortRun, aborted: bool = False) -> None:
        self.runs.pop(run.scan_id, None)
        self.finished[run.scan_id] = {**run.order.summary(), **run.summary, "aborted": aborted}
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    def _deliver(self, run: SortRun, msg: codec.Message) -> bool:
        """Send to every consumer of the scan, waiting while one is slow; a
        consumer that has left the mesh is given up (counted and logged).
        False if the sorter stopped before every consumer had it."""
        frames = codec.encode(msg)
        for consumer in list(run.consumers):
            if not self._deliver_to(run, consumer, frames):
                return False
        if msg.type in (codec.RESULT, codec.GAP):
            run.sent_to = msg.stop
        return True

    def _deliver_to(self, run: SortRun, consumer: Consumer, frames: list) -> bool:
        """One consumer's copy; False only if the sorter is stopping."""
        waited_since = time.monotonic()
        while True:
            if self._stopping.is_set():
                return False
            try:
                codec.send_frames(consumer.socket, frames, zmq.NOBLOCK)
                self.counters.events_out += 1
                return True
            except zmq.Again:
                consumer.socket.poll(100, zmq.POLLOUT)
            if time.monotonic() - waited_since > CONSUMER_CHECK_SECONDS:
                waited_since = time.monotonic()
                if not self._still_registered(consumer):
                    run.consumers.remove(consumer)
                    self.counters.error(f"consumer {consumer.name} left the mesh during scan {run.scan_id}: "
                                        "it no longer receives this scan (it gets the rest if it comes back)")
                    return True

    def _still_registered(self, consumer: Consumer) -> bool:
        try:
            return any(s.get("endpoints", {}).get(protocol.DATA_IN) == consumer.endpoint
                       for s in self.link.lookup({"name": consumer.name}))
        except ManagerUnavailable:
            return True  # cannot tell: keep waiting rather than give up a live consumer

    def status(self) -> str:
        return (f"Scan {self.current_scan or '-'}; {len(self.runs)} open; {self.chunks_out} chunks out, "
                f"{self.duplicates} duplicate and {self.late} late points dropped, {self.gap_points} gap points; "
                f"{self.resumed} scans resumed, {self.masters_lost} aborted for a lost master, "
                f"{self.consumers_joined} consumers joined mid-scan.")
