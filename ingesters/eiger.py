"""EigerIngester's component: a DECTRIS SIMPLON stream (v1 or v2) into the mesh as one named stream.

One loop thread owns the detector socket (PULL, connected to the DCU's PUSH)
and the sources (one bound PUSH per pipeline fed, registered as kind
``source`` of the stream, as the simulator's are): it receives a message,
decodes it (:mod:`ingesters.simplon`), maps it (:mod:`ingesters.series`) and
sends the blocks on. Frames stay compressed as the detector sent them.

Backpressure: while a master holds the stream back, sending blocks and the
loop stops reading the detector; the detector's own send queue (the DCU's
buffer) then fills. Nothing is buffered here beyond one block.

Which scan a series joins is asked once per series, at its start, on a
second thread (a Tango read of each pipeline's master's ``OpenScans``), while
the loop leaves the detector unread; after ``scan_wait`` seconds without an
open scan the series is refused, counted, and its frames discarded as they
come (docs/ingesters.md).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from ingesters import simplon
from ingesters.series import ScanChoice, SeriesMapper, choose_scan
from services import codec, protocol
from services.component import Component
from services.dataplane import DATA_MAX_FRAME_BYTES, limit_frames
from services.registration import ManagerLink
from services.source import SourceClient

log = logging.getLogger("tangomesh.ingester.eiger")

POLL_MS = 50
FIND_PERIOD_S = 0.2  # how often a series start asks the masters again while no scan is open
DETECTOR_HWM = 4  # messages queued here from the detector; the rest waits in the detector's buffer

#: pipeline -> that pipeline's master's open scans (``PipelineMaster.OpenScans``); raises if unreachable
OpenScans = Callable[[str], list[dict[str, Any]]]


@dataclass(frozen=True)
class EigerConfig:
    endpoint: str = ""  # the detector's stream, e.g. tcp://dcu:9999 (v1) or tcp://dcu:31001 (v2)
    stream: str = "eiger"
    pipelines: tuple[str, ...] = ()  # default: the device's Pipeline
    block_frames: int = 16  # most frames in one block; fewer when the detector has sent nothing more
    scan_wait: float = 10.0  # a series waits this long for a scan that takes its stream, then is refused

    def __post_init__(self) -> None:
        if "://" not in self.endpoint:
            raise ValueError(f"DetectorEndpoint must be a ZeroMQ address such as tcp://dcu:9999, "
                             f"not {self.endpoint!r}")
        if not self.stream or "/" in self.stream or len(self.stream) > 64:
            raise ValueError(f"Stream must be a name without '/', not {self.stream!r}")
        if not self.pipelines:
            raise ValueError("no pipeline to feed: set Pipelines (or Pipeline)")
        if not 1 <= self.block_frames <= 10_000:
            raise ValueError(f"BlockFrames must be 1..10000 (got {self.block_frames})")
        if self.scan_wait <= 0:
            raise ValueError(f"ScanWaitSeconds must be positive (got {self.scan_wait})")


class EigerComponent(Component):
    kind = protocol.Kind.INGESTER
    thread_prefix = "eiger"
    logger = log  # a subclass for another protocol logs under its own name

    def __init__(self, name: str, config: EigerConfig, link: ManagerLink, host: str, open_scans: OpenScans,
                 thread_factory: Callable[..., threading.Thread] = threading.Thread) -> None:
        super().__init__(name, config.pipelines[0], self.logger)
        self.config = config
        self.link = link
        self.host = host
        self.open_scans = open_scans
        self.thread_factory = thread_factory
        self.mapper = SeriesMapper(config.stream, config.block_frames)
        self.sources: dict[str, SourceClient] = {}
        self.detector: zmq.Socket | None = None
        self.series = -1
        self.series_seen = 0
        self.refused_series = 0
        self.restarts = 0
        self.blocked_seconds = 0.0
        self.used_scans: list[str] = []  # scans earlier series joined, newest last (a few kept)
        self.targets: tuple[str, ...] = ()
        self._finding: concurrent.futures.Future | None = None
        self._finding_header: simplon.SeriesStart | None = None
        self._requests: list[tuple[simplon.SeriesStart, concurrent.futures.Future]] = []
        self._wake = threading.Event()
        self.capabilities = {"stream": config.stream, "detector": config.endpoint, "protocol": "simplon"}
        self.threads: list[threading.Thread] = []

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        for pipeline in self.config.pipelines:
            self.sources[pipeline] = SourceClient(self.config.stream, pipeline, self.link, self.host,
                                                  prefix="ingester", thread_factory=self.thread_factory)
        self.endpoints = {f"{protocol.SOURCE_OUT}:{p}": s.endpoint for p, s in self.sources.items()}
        self.detector = self._open_detector()
        self.threads = [self.thread_factory(target=self._run, name=f"{self.thread_prefix}-loop", daemon=True),
                        self.thread_factory(target=self._find_loop, name=f"{self.thread_prefix}-scan-finder",
                                            daemon=True)]
        for t in self.threads:
            t.start()
        self.logger.info("reading %s as stream %s for %s", self.config.endpoint, self.config.stream,
                 ", ".join(self.config.pipelines))

    def _open_detector(self) -> zmq.Socket:
        """The socket the detector's stream is read from (a subclass reading another protocol may differ)."""
        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.rcvhwm = DETECTOR_HWM
        sock.linger = 0
        limit_frames(sock, DATA_MAX_FRAME_BYTES)
        sock.connect(self.config.endpoint)
        return sock

    def _decode(self, parts: list[Any]) -> list[simplon.Event]:
        """One received message's series events; a ``ValueError`` refuses it (counted)."""
        return simplon.decode(parts)

    def stop(self) -> None:
        super().stop()
        self._wake.set()
        for t in self.threads:
            t.join(2)
        for s in self.sources.values():
            s.close()
        if self.detector is not None:
            self.detector.close(0)

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        assert self.detector is not None
        backlog: list[simplon.Event] = []  # events of one message still to handle (tickit batches them)
        while not self._stopping.is_set():
            if self._finding is not None:
                if not self._finding.done():
                    self._stopping.wait(0.02)  # the detector stays unread: its buffer holds the frames
                    continue
                self._found(self._finding.result())
            if backlog:
                self._handle_safely(backlog.pop(0))
                continue
            try:
                if not self.detector.poll(POLL_MS):
                    self._send(self.mapper.flush())
                    continue
                parts = self.detector.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if self._stopping.is_set():
                    return
                self.counters.error(f"detector socket: {exc}")
                continue
            self.counters.events_in += 1
            try:
                backlog = self._decode(parts)
            except ValueError as exc:  # counted, the next message is read
                self.counters.error(f"{self.config.stream}: {exc}")
                continue
            if not backlog:  # a message that is part of one still to complete
                continue
            self._handle_safely(backlog.pop(0))
            try:
                if not backlog and not self.detector.poll(0):  # nothing more waiting: what is pending goes now
                    self._send(self.mapper.flush())
            except zmq.ZMQError:
                pass

    def _handle_safely(self, event: simplon.Event) -> None:
        try:
            self._handle(event)
        except ValueError as exc:  # a refused frame or end: counted, the stream goes on
            self.counters.error(f"{self.config.stream}: {exc}")
        except Exception as exc:  # a bug must not stop the stream
            self.logger.exception("ingester loop step failed")
            self.counters.error(f"internal error: {exc!r}")

    def _handle(self, event: simplon.Event) -> None:
        if isinstance(event, simplon.SeriesStart):
            self.series_seen += 1
            if self.mapper.open is not None:
                self.restarts += 1
                closing = self.mapper.restart(event)
                self._send(closing)
                self.counters.error(f"{self.config.stream}: series {event.series} started while series "
                                    f"{self.series} was open (detector restarted?): that one ended there, "
                                    "its missing frames declared")
            self.series = event.series if event.series is not None else -1
            self._finding_header = event
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._requests.append((event, future))
            self._finding = future
            self._wake.set()
        elif isinstance(event, simplon.Frame):
            self._send(self.mapper.frame(event))
        else:
            self._send(self.mapper.end(event))
            if self.mapper.open is None:
                self.targets = ()

    def _found(self, choice: ScanChoice | None) -> None:
        header, self._finding, self._finding_header = self._finding_header, None, None
        assert header is not None
        if choice is None:
            self.refused_series += 1
            self.mapper.refuse(header.series)
            self.counters.error(f"{self.config.stream}: no open scan takes stream {self.config.stream} on "
                                f"{', '.join(self.config.pipelines)} within {self.config.scan_wait:g} s: "
                                f"series {header.series} refused, its frames discarded")
            return
        self.used_scans = [*self.used_scans[-63:], choice.scan]
        self.targets = choice.pipelines
        self.logger.info("series %s joins scan %s (%d points, first index %d) on %s", header.series, choice.scan,
                 choice.points, choice.first_index, ", ".join(choice.pipelines))
        self._send(self.mapper.bind(header, choice))

    def _send(self, messages: list[codec.Message]) -> None:
        """To each pipeline the series feeds; blocks while a master holds the
        stream back (retrying, so that stop is not held up)."""
        for msg in messages:
            frames = codec.encode(msg)
            for pipeline in self.targets:
                sock = self.sources[pipeline].socket
                t0 = None
                while True:
                    try:
                        codec.send_frames(sock, frames, zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        if self._stopping.is_set():
                            return
                        t0 = t0 or time.monotonic()
                        sock.poll(100, zmq.POLLOUT)
                if t0 is not None:
                    self.blocked_seconds += time.monotonic() - t0
            self.counters.events_out += 1

    # ------------------------------------------------------------ which scan (finder thread)
    def _find_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while self._requests:
                header, future = self._requests.pop(0)
                try:
                    future.set_result(self._find(header))
                except Exception as exc:  # never leave the loop waiting on an answer that does not come
                    self.logger.exception("looking up the scan of series %s failed", header.series)
                    self.counters.error(f"scan lookup failed: {exc!r}")
                    future.set_result(None)

    def _find(self, header: simplon.SeriesStart) -> ScanChoice | None:
        deadline = time.monotonic() + self.config.scan_wait
        problem = ""
        while not self._stopping.is_set():
            scans: dict[str, list[dict[str, Any]]] = {}
            for pipeline in self.config.pipelines:
                try:
                    scans[pipeline] = self.open_scans(pipeline)
                except Exception as exc:  # master not registered or not answering: ask again
                    problem = f"{pipeline}: {exc}"
            try:
                choice = choose_scan(self.config.stream, scans, self.used_scans)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a master answering nonsense
                problem, choice = f"malformed OpenScans: {exc!r}", None
            if choice is not None:
                return choice
            if time.monotonic() >= deadline:
                if problem:
                    self.logger.warning("series %s: last problem asking the masters: %s", header.series, problem)
                return None
            self._stopping.wait(FIND_PERIOD_S)
        return None

    # ------------------------------------------------------------ views
    @property
    def current_scan(self) -> str:
        return self.mapper.scan

    def status(self) -> str:
        state = (f"series {self.series} -> scan {self.mapper.scan}" if self.mapper.open else
                 f"looking for the scan of series {self.series}" if self._finding is not None else
                 "waiting for a series")
        return (f"{self.config.endpoint} as stream {self.config.stream}: {state}; {self.mapper.frames} frames sent, "
                f"{self.mapper.gap_points} missing, {self.refused_series} series refused, "
                f"{self.mapper.drained} frames discarded.")
