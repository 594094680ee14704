"""What every ingester's component shares: its sources, the scan lookup, sending with backpressure.

An ingester reads one detector stream in the detector's protocol (its own
loop thread, in the subclass) and feeds it to the mesh as one named stream:
one :class:`~services.source.SourceClient` (a bound PUSH, registered as kind
``source``) per pipeline fed. Which scan a detector's series or capture
joins is asked once, at its start, on a second thread (a read of each
pipeline's master's ``OpenScans``, :func:`ingesters.series.choose_scan`),
so that the loop never waits on Tango per frame; the loop leaves the
detector unread until the answer comes, so its frames wait upstream.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

import zmq

from ingesters.series import ScanChoice, choose_scan
from services import codec, protocol
from services.component import Component
from services.registration import ManagerLink
from services.source import SourceClient

FIND_PERIOD_S = 0.2  # how often a series start asks the masters again while no scan is open

#: pipeline -> that pipeline's master's open scans (``PipelineMaster.OpenScans``); raises if unreachable
OpenScans = Callable[[str], list[dict[str, Any]]]


class IngesterComponent(Component):
    """Sources, scan lookup and backpressured sending; the subclass owns the
    detector and its loop (``start`` calls :meth:`start_sources` and
    :meth:`start_finder`, ``stop`` calls :meth:`stop_common`)."""

    kind = protocol.Kind.INGESTER

    def __init__(self, name: str, stream: str, pipelines: tuple[str, ...], scan_wait: float, link: ManagerLink,
                 host: str, open_scans: OpenScans, thread_factory: Callable[..., threading.Thread],
                 log: logging.Logger) -> None:
        super().__init__(name, pipelines[0], log)
        self.stream = stream
        self.pipelines = pipelines
        self.scan_wait = scan_wait
        self.link = link
        self.host = host
        self.open_scans = open_scans
        self.thread_factory = thread_factory
        self.sources: dict[str, SourceClient] = {}
        self.used_scans: list[str] = []  # scans earlier series joined, newest last (a few kept)
        self.targets: tuple[str, ...] = ()
        self.refused_series = 0
        self.blocked_seconds = 0.0
        self._requests: list[tuple[str, concurrent.futures.Future]] = []
        self._wake = threading.Event()
        self.threads: list[threading.Thread] = []

    # ------------------------------------------------------------ life cycle
    def start_sources(self) -> None:
        for pipeline in self.pipelines:
            self.sources[pipeline] = SourceClient(self.stream, pipeline, self.link, self.host,
                                                  prefix="ingester", thread_factory=self.thread_factory)
        self.endpoints = {f"{protocol.SOURCE_OUT}:{p}": s.endpoint for p, s in self.sources.items()}

    def start_threads(self, loop: Callable[[], None], prefix: str) -> None:
        self.threads = [self.thread_factory(target=loop, name=f"{prefix}-loop", daemon=True),
                        self.thread_factory(target=self._find_loop, name=f"{prefix}-scan-finder", daemon=True)]
        for t in self.threads:
            t.start()

    def stop_common(self) -> None:
        self._stopping.set()
        self._wake.set()
        for t in self.threads:
            t.join(2)
        for s in self.sources.values():
            s.close()

    # ------------------------------------------------------------ which scan
    def request_scan(self, label: str) -> concurrent.futures.Future:
        """Ask, on the finder thread, which scan the series or capture
        ``label`` (for the log) joins; the future's result is a
        :class:`ScanChoice` or None after ``scan_wait`` seconds without one."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.append((label, future))
        self._wake.set()
        return future

    def joined(self, choice: ScanChoice) -> None:
        """The series joined ``choice``: send there, never join it again."""
        self.used_scans = [*self.used_scans[-63:], choice.scan]
        self.targets = choice.pipelines

    def refused(self, label: str) -> None:
        self.refused_series += 1
        self.counters.error(f"{self.stream}: no open scan takes stream {self.stream} on "
                            f"{', '.join(self.pipelines)} within {self.scan_wait:g} s: "
                            f"{label} refused, its data discarded")

    def _find_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while self._requests:
                label, future = self._requests.pop(0)
                try:
                    future.set_result(self._find(label))
                except Exception as exc:  # never leave the loop waiting on an answer that does not come
                    self.log.exception("looking up the scan of %s failed", label)
                    self.counters.error(f"scan lookup failed: {exc!r}")
                    future.set_result(None)

    def _find(self, label: str) -> ScanChoice | None:
        deadline = time.monotonic() + self.scan_wait
        problem = ""
        while not self._stopping.is_set():
            scans: dict[str, list[dict[str, Any]]] = {}
            for pipeline in self.pipelines:
                try:
                    scans[pipeline] = self.open_scans(pipeline)
                except Exception as exc:  # master not registered or not answering: ask again
                    problem = f"{pipeline}: {exc}"
            try:
                choice = choose_scan(self.stream, scans, self.used_scans)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a master answering nonsense
                problem, choice = f"malformed OpenScans: {exc!r}", None
            if choice is not None:
                return choice
            if time.monotonic() >= deadline:
                if problem:
                    self.log.warning("%s: last problem asking the masters: %s", label, problem)
                return None
            self._stopping.wait(FIND_PERIOD_S)
        return None

    # ------------------------------------------------------------ sending
    def send(self, messages: list[codec.Message]) -> None:
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
