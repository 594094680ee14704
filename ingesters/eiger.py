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
come (docs/ingesters.md). The sources, the scan lookup and the sending are
:class:`ingesters.base.IngesterComponent`'s, shared with the PcapIngester.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from ingesters import simplon
from ingesters.base import OpenScans, IngesterComponent
from ingesters.series import ScanChoice, SeriesMapper
from services.dataplane import DATA_MAX_FRAME_BYTES, limit_frames
from services.registration import ManagerLink

log = logging.getLogger("tangomesh.ingester.eiger")

POLL_MS = 50
DETECTOR_HWM = 4  # messages queued here from the detector; the rest waits in the detector's buffer



@dataclass(frozen=True)
class EigerConfig:
    endpoint: str = ""  # the detector's stream, e.g. tcp://dcu:9999 (v1) or tcp://dcu:31001 (v2)
    stream: str = "eiger"
    pipelines: tuple[str, ...] = ()  # default: the device's Pipeline
    block_frames: int = 16  # most frames in one block; fewer when the detector has sent nothing more
    scan_wait: float = 10.0  # a series waits this long for a scan that takes its stream, then is refused

    def __post_init__(self) -> None:
        check_series_stream(self, "DetectorEndpoint", "tcp://dcu:9999")


def check_series_stream(config: Any, endpoint_property: str, example: str) -> None:
    """The properties every series-stream ingester has (endpoint, stream, pipelines,
    block size, scan wait), checked; ValueError naming the property otherwise."""
    if "://" not in config.endpoint:
        raise ValueError(f"{endpoint_property} must be a ZeroMQ address such as {example}, not {config.endpoint!r}")
    if not config.stream or "/" in config.stream or len(config.stream) > 64:
        raise ValueError(f"Stream must be a name without '/', not {config.stream!r}")
    if not config.pipelines:
        raise ValueError("no pipeline to feed: set Pipelines (or Pipeline)")
    if not 1 <= config.block_frames <= 10_000:
        raise ValueError(f"BlockFrames must be 1..10000 (got {config.block_frames})")
    if config.scan_wait <= 0:
        raise ValueError(f"ScanWaitSeconds must be positive (got {config.scan_wait})")


class EigerComponent(IngesterComponent):
    thread_prefix = "eiger"
    logger = log  # a subclass for another protocol logs under its own name

    def __init__(self, name: str, config: EigerConfig, link: ManagerLink, host: str, open_scans: OpenScans,
                 thread_factory: Callable[..., threading.Thread] = threading.Thread) -> None:
        super().__init__(name, config.stream, config.pipelines, config.scan_wait, link, host, open_scans,
                         thread_factory, self.logger)
        self.config = config
        self.mapper = SeriesMapper(config.stream, config.block_frames)
        self.detector: zmq.Socket | None = None
        self.series = -1
        self.series_seen = 0
        self.restarts = 0
        self._finding: concurrent.futures.Future | None = None
        self._finding_header: simplon.SeriesStart | None = None
        self.capabilities = {"stream": config.stream, "detector": config.endpoint, "protocol": "simplon"}

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.start_sources()
        self.detector = self._open_detector()
        self.start_threads(self._run, self.thread_prefix)
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
        self.stop_common()
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
                    self.send(self.mapper.flush())
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
            if not backlog:  # a message that is part of one still to complete (Xspress3's old three-part form)
                continue
            self._handle_safely(backlog.pop(0))
            try:
                if not backlog and not self.detector.poll(0):  # nothing more waiting: what is pending goes now
                    self.send(self.mapper.flush())
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
                self.send(closing)
                self.counters.error(f"{self.config.stream}: series {event.series} started while series "
                                    f"{self.series} was open (detector restarted?): that one ended there, "
                                    "its missing frames declared")
            self.series = event.series if event.series is not None else -1
            self._finding_header = event
            self._finding = self.request_scan(f"series {event.series}")
        elif isinstance(event, simplon.Frame):
            self.send(self.mapper.frame(event))
        else:
            self.send(self.mapper.end(event))
            if self.mapper.open is None:
                self.targets = ()

    def _found(self, choice: ScanChoice | None) -> None:
        header, self._finding, self._finding_header = self._finding_header, None, None
        assert header is not None
        if choice is None:
            self.mapper.refuse(header.series)
            self.refused(f"series {header.series}")
            return
        self.joined(choice)
        self.logger.info("series %s joins scan %s (%d points, first index %d) on %s", header.series, choice.scan,
                 choice.points, choice.first_index, ", ".join(choice.pipelines))
        self.send(self.mapper.bind(header, choice))

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
