"""PcapIngester's component: a PandABox PCAP data port (TCP 8889) into the mesh as one named stream.

One loop thread owns the TCP connection: it connects, writes the options
line, feeds what it receives to :class:`ingesters.pcap.PcapDecoder`, maps
each capture's samples to acquisition indices
(:class:`ingesters.series.CaptureMapper`) and sends data blocks, one 1-D
array per captured field, through the sources of
:class:`ingesters.base.IngesterComponent`. When the PandA goes away (or
sends bytes the decoder refuses), the open capture ends there, its missing
samples declared, and the loop connects again every ``reconnect`` seconds:
the next capture on the new connection joins a scan of its own.

Backpressure: while a master holds the stream back, sending blocks and the
loop stops reading the socket; the kernel's TCP buffers and then the
PandA's own capture buffer fill, and the PandA ends the capture with ``END
n Data overrun``: its undelivered samples become gaps. Nothing is buffered
here beyond one block.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import select
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from ingesters import pcap
from ingesters.base import IngesterComponent, OpenScans
from ingesters.series import CaptureMapper, ScanChoice
from services.registration import ManagerLink

log = logging.getLogger("tangomesh.ingester.pcap")

POLL_S = 0.05
RECV_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 3.0
ARRAY_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def default_array_name(column: str) -> str:
    """A PandA column (``INENC1.VAL.Value``) as a tangomesh array name: itself,
    any character an array name must not carry (``/``, spaces) made ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", column)[:64]


@dataclass(frozen=True)
class PcapConfig:
    panda: str = ""  # host:port of the PandA's data port (port 8889 when left out)
    stream: str = "panda"
    pipelines: tuple[str, ...] = ()  # default: the device's Pipeline
    capture: str = "XML FRAMED SCALED"  # the options line written to the data port
    block_points: int = 1000  # most samples in one block; fewer when the PandA has sent nothing more
    arrays: tuple[str, ...] = ()  # "COLUMN=name" lines: a column's array name (default: the column, sanitised)
    scan_wait: float = 10.0
    reconnect: float = 1.0  # seconds between connection attempts

    def __post_init__(self) -> None:
        host, _, port = self.panda.rpartition(":") if ":" in self.panda else (self.panda, "", str(pcap.DATA_PORT))
        if self.republished:
            host, port = "zmq", "1"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"PandaHost must be host or host:port (data port {pcap.DATA_PORT}), not {self.panda!r}")
        if not self.stream or "/" in self.stream or len(self.stream) > 64:
            raise ValueError(f"Stream must be a name without '/', not {self.stream!r}")
        if not self.pipelines:
            raise ValueError("no pipeline to feed: set Pipelines (or Pipeline)")
        try:
            pcap.parse_options(self.capture)
        except pcap.PcapError as exc:
            raise ValueError(f"CaptureOptions: {exc}") from None
        if not 1 <= self.block_points <= 1_000_000:
            raise ValueError(f"BlockPoints must be 1..1000000 (got {self.block_points})")
        if self.scan_wait <= 0 or self.reconnect <= 0:
            raise ValueError("ScanWaitSeconds and ReconnectSeconds must be positive")
        self.array_names()

    @property
    def republished(self) -> bool:
        """``PandaHost`` is the ZeroMQ PUB of a republisher (``tcp://host:port``), not the PandA's data port."""
        return self.panda.startswith("tcp://")

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.panda.rpartition(":") if ":" in self.panda else (self.panda, "", str(pcap.DATA_PORT))
        return host, int(port)

    @property
    def handshake(self) -> bytes:
        return pcap.handshake(*pcap.parse_options(self.capture))

    def array_names(self) -> dict[str, str]:
        """The ``ArrayNames`` property: column -> array name."""
        names: dict[str, str] = {}
        for line in self.arrays:
            column, sep, name = (part.strip() for part in line.partition("="))
            if not sep or not column or not ARRAY_NAME.match(name):
                raise ValueError(f"ArrayNames line {line!r} is not COLUMN=name (name: letters, digits, _ . -; "
                                 "up to 64)")
            if column in names:
                raise ValueError(f"ArrayNames names column {column} twice")
            names[column] = name
        return names


class PcapComponent(IngesterComponent):
    def __init__(self, name: str, config: PcapConfig, link: ManagerLink, host: str, open_scans: OpenScans,
                 thread_factory: Callable[..., threading.Thread] = threading.Thread) -> None:
        super().__init__(name, config.stream, config.pipelines, config.scan_wait, link, host, open_scans,
                         thread_factory, log)
        self.config = config
        self.names = config.array_names()
        self.mapper = CaptureMapper(config.stream, config.block_points)
        self.connected = False
        self.connections = 0
        self.captures = 0
        self.faulted_captures = 0
        self.beyond_points = 0
        self.last_end = ""
        self._start: pcap.CaptureStart | None = None
        self._finding: concurrent.futures.Future | None = None
        self._last_connect_error = ""
        self.capabilities = {"stream": config.stream, "detector": config.panda, "protocol": "pcap"}

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.start_sources()
        self.start_threads(self._run, "pcap")
        log.info("reading PandA %s as stream %s for %s", self.config.panda, self.config.stream,
                 ", ".join(self.config.pipelines))

    def stop(self) -> None:
        self.stop_common()

    # ------------------------------------------------------------ connection
    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(self.config.address, timeout=CONNECT_TIMEOUT_S)
            sock.sendall(self.config.handshake)
            sock.setblocking(False)
        except OSError as exc:
            message = f"PandA {self.config.panda}: cannot connect: {exc}"
            if message != self._last_connect_error:  # counted each time, logged when it changes
                self.counters.error(message)
            else:
                self.counters.error(message, log=False)
            self._last_connect_error = message
            return None
        self._last_connect_error = ""
        self.connections += 1
        return sock

    def _run(self) -> None:
        while not self._stopping.is_set():
            sock = self._connect()
            if sock is None:
                self._stopping.wait(self.config.reconnect)
                continue
            try:
                why = self._read(sock)
            except Exception as exc:  # a bug must not stop the ingester: the connection is made anew
                log.exception("PCAP loop failed")
                self.counters.error(f"internal error: {exc!r}")
                why = f"internal error: {exc!r}"
            finally:
                sock.close()
                self.connected = False
            self._lost(why)
            if not self._stopping.is_set():
                self._stopping.wait(self.config.reconnect)

    def _read(self, sock: socket.socket) -> str:
        """Reads one connection until it ends; returns why it ended."""
        decoder = pcap.PcapDecoder()
        backlog: list[pcap.Event] = []
        while not self._stopping.is_set():
            if self._finding is not None:
                if not self._finding.done():
                    self._stopping.wait(0.02)  # the socket stays unread: the PandA's buffer holds the samples
                    continue
                self._found(self._finding.result())
            if backlog:
                self._handle_safely(backlog.pop(0))
                continue
            readable, _, _ = select.select([sock], [], [], POLL_S)
            if not readable:
                self.send(self.mapper.flush())
                continue
            try:
                data = sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                return f"the connection to the PandA failed: {exc}"
            if not data:
                return "the PandA closed the connection"
            try:
                backlog = decoder.feed(data)
            except pcap.PcapError as exc:
                self.counters.error(f"{self.config.stream}: {exc}: connecting again")
                return f"the PandA sent what the protocol does not allow ({exc})"
        return "the ingester stopped"

    def _lost(self, why: str) -> None:
        """The connection is gone: an open capture ends here, its rest declared missing."""
        self._start = None
        if self._finding is not None:
            self._finding = None  # the answer, when it comes, is for a capture that is gone
        if self.mapper.open is not None:
            self.faulted_captures += 1
            self.last_end = "lost"
            self.counters.error(f"{self.config.stream}: capture of scan {self.mapper.scan} cut: {why}")
            self.send(self.mapper.end(f"the capture was cut: {why}"))
        else:
            self.mapper.end(why)  # a refused capture stops draining
        self.targets = ()

    # ------------------------------------------------------------ events
    def _handle_safely(self, event: pcap.Event) -> None:
        try:
            self._handle(event)
        except ValueError as exc:  # refused samples: counted, the stream goes on
            self.counters.error(f"{self.config.stream}: {exc}")

    def _handle(self, event: pcap.Event) -> None:
        if isinstance(event, pcap.Ready):
            self.connected = True
            log.info("PandA %s accepted %r", self.config.panda, self.config.capture)
        elif isinstance(event, pcap.CaptureStart):
            self.captures += 1
            self._start = event
            self._finding = self.request_scan(f"capture {self.captures}")
        elif isinstance(event, pcap.Samples):
            self.counters.events_in += len(event)
            if self._start is None:
                raise ValueError("samples without a capture header")
            if self.mapper.open is None:
                if not self.mapper.draining:
                    raise ValueError(f"{len(event)} samples of a capture that joined no scan")
                self.mapper.drained += len(event)
                return
            arrays = {self.names.get(c, default_array_name(c)): v
                      for c, v in pcap.columns(self._start, event.rows).items()}
            room = self.mapper.room()
            if len(event) > room:
                self.beyond_points += len(event) - room
                self.counters.error(f"{self.config.stream}: {len(event) - room} samples beyond scan "
                                    f"{self.mapper.scan}'s {self.mapper.open.choice.points} points refused")
                arrays = {n: a[:room] for n, a in arrays.items()}
            self.send(self.mapper.samples(arrays))
        else:
            self._ended(event)

    def _ended(self, end: pcap.CaptureEnd) -> None:
        self.last_end = end.reason
        self._start = None
        missing = "" if end.samples == end.received else \
            f" (the PandA counts {end.samples} samples, {end.received} arrived)"
        if end.fault:
            self.faulted_captures += 1
            if self.mapper.open is not None:
                self.counters.error(f"{self.config.stream}: capture of scan {self.mapper.scan} ended with "
                                    f"'{end.reason}' after {end.received} samples{missing}: the rest declared missing")
        elif missing and self.mapper.open is not None:
            self.counters.error(f"{self.config.stream}: capture ended '{end.reason}'{missing}")
        self.send(self.mapper.end(f"the PandA's capture ended '{end.reason}' after {end.received} samples"))
        self.targets = ()

    def _found(self, choice: ScanChoice | None) -> None:
        self._finding = None
        start: Any = self._start
        if start is None:
            return
        if choice is None:
            self.mapper.refuse()
            self.refused(f"capture {self.captures}")
            return
        self.joined(choice)
        missed = getattr(start, "missed", 0)  # a republished start says nothing of missed samples
        log.info("capture %d joins scan %s (%d points, first index %d, %d missed) on %s", self.captures,
                 choice.scan, choice.points, choice.first_index, missed, ", ".join(choice.pipelines))
        self.send(self.mapper.bind(choice, missed))

    # ------------------------------------------------------------ views
    @property
    def current_scan(self) -> str:
        return self.mapper.scan

    def status(self) -> str:
        state = ("not connected" if not self.connected else
                 f"capture {self.captures} -> scan {self.mapper.scan}" if self.mapper.open else
                 f"looking for the scan of capture {self.captures}" if self._finding is not None else
                 "waiting for a capture")
        return (f"PandA {self.config.panda} as stream {self.config.stream}: {state}; {self.mapper.points} samples "
                f"sent, {self.mapper.gap_points} missing, {self.refused_series} captures refused, "
                f"{self.mapper.drained} samples discarded, {self.connections} connections.")



class RepublishComponent(PcapComponent):
    """The MAX IV variant: a Tango device re-publishes the PandA's captures on
    a ZeroMQ PUB as JSON (``series-start``, ``data`` rows from
    ``frame_number`` on, ``series-end``; :func:`ingesters.pcap.decode_republished`).
    This ingester subscribes to it instead of reading the data port. A PUB
    cannot be held back: rows the republisher drops when this reader falls
    behind show up as a ``frame_number`` jump, declared missing at their own
    indices, never shifted."""

    SUB_HWM = 10_000  # messages queued here before the publisher drops for this reader

    def start(self) -> None:
        self.start_sources()
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.rcvhwm = self.SUB_HWM
        self.sub.linger = 0
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.config.panda)
        self.connected, self.connections = True, 1
        self.start_threads(self._run, "pcap-zmq")
        log.info("subscribed to the PCAP republisher %s as stream %s for %s", self.config.panda, self.config.stream,
                 ", ".join(self.config.pipelines))

    def stop(self) -> None:
        self.stop_common()
        if getattr(self, "sub", None) is not None:  # None when the start failed before subscribing
            self.sub.close(0)

    def _run(self) -> None:
        backlog: list[Any] = []
        while not self._stopping.is_set():
            if self._finding is not None:
                if not self._finding.done():
                    self._stopping.wait(0.02)
                    continue
                self._found(self._finding.result())
            if backlog:
                self._handle_republished(backlog.pop(0))
                continue
            try:
                if not self.sub.poll(int(POLL_S * 1000)):
                    self.send(self.mapper.flush())
                    continue
                parts = self.sub.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if self._stopping.is_set():
                    return
                self.counters.error(f"republisher socket: {exc}")
                continue
            try:
                backlog = [pcap.decode_republished(parts)]
            except pcap.PcapError as exc:
                self.counters.error(f"{self.config.stream}: {exc}")

    def _handle_republished(self, event: Any) -> None:
        try:
            if isinstance(event, pcap.RepublishStart):
                if self.mapper.open is not None:
                    self.faulted_captures += 1
                    self.counters.error(f"{self.config.stream}: series-start while the capture of scan "
                                        f"{self.mapper.scan} was open (its end lost?): that one ends here")
                    self.send(self.mapper.end("a new series started before this one's end"))
                self.captures += 1
                self._start = event
                self._finding = self.request_scan(f"capture {self.captures}")
            elif isinstance(event, pcap.RepublishRows):
                self._rows(event)
            else:
                self.last_end = "series-end"
                self._start = None
                self.send(self.mapper.end("the capture's series-end came before the scan's last point"))
                self.targets = ()
        except ValueError as exc:
            self.counters.error(f"{self.config.stream}: {exc}")

    def _rows(self, rows: pcap.RepublishRows) -> None:
        self.counters.events_in += len(rows)
        if self.mapper.open is None:
            if not self.mapper.draining:
                raise ValueError(f"rows from frame {rows.frame_number} without a series-start")
            self.mapper.drained += len(rows)
            return
        expected = self.mapper.next_sample
        if rows.frame_number < expected:
            raise ValueError(f"rows from frame {rows.frame_number} again or out of order (next expected "
                             f"{expected}): refused, never renumbered")
        if rows.frame_number > expected:
            self.send(self.mapper.skip(rows.frame_number, f"republished frames {expected}.."
                                                          f"{rows.frame_number - 1} never arrived"))
        arrays = {self.names.get(c, default_array_name(c)): v for c, v in rows.columns.items()}
        room = self.mapper.room()
        if len(rows) > room:
            self.beyond_points += len(rows) - room
            self.counters.error(f"{self.config.stream}: {len(rows) - room} rows beyond scan {self.mapper.scan}'s "
                                f"{self.mapper.open.choice.points} points refused")
            arrays = {n: a[:room] for n, a in arrays.items()}
        self.send(self.mapper.samples(arrays))
