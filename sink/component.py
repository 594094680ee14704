"""The sink's logic without Tango: inlet, store, query endpoint and viewers.

Threads: the inlet drains ``data_in`` into the store (and, by simply not
reading while a write is under way, pushes back on the sorters); the query
server answers on its own socket; the viewer loop publishes live products to
Lavue at the viewer rate and calls ``on_refresh`` so the device can push its
Tango change events from the same cadence, never per data message.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq

from services import codec, compression, protocol, security
from services.component import Component, brief
from services.dataplane import PullInlet
from services.registration import ManagerLink
from services.scan import ScanError, parse_scan
from services.schema import preload
from sink.lavue import LavuePublisher
from sink.queries import QUERY, QueryServer
from sink.store import Product, ScanEntry, ScanStore, StoreError
from sink.views import LiveFrame, live_frame

log = logging.getLogger("tangomesh.sink")

LAVUE = "lavue"  # role of the PUB endpoint in the registration


@dataclass(frozen=True)
class SinkConfig:
    budget_bytes: int = 2 * 1024**3
    viewer_rate_hz: float = 5.0
    announce_seconds: float = 2.0
    stale_seconds: float = 600.0
    viewer_hwm: int = 2

    def __post_init__(self) -> None:
        if self.budget_bytes < 1:
            raise ValueError("MemoryBudgetBytes must be positive")
        if not 0 < self.viewer_rate_hz <= 100:
            raise ValueError("ViewerRateHz must be in (0, 100]")
        if self.announce_seconds <= 0 or self.stale_seconds <= 0 or self.viewer_hwm < 1:
            raise ValueError("DatasourcesSeconds and StaleScanSeconds must be positive, ViewerHwm at least 1")


@dataclass(frozen=True)
class Progress:
    scan: str
    expected: int
    received: int
    status: str


class SinkComponent(Component):
    kind = protocol.Kind.SINK

    def __init__(self, name: str, pipeline: str, bind_host: str, advertised_host: str, config: SinkConfig,
                 thread_factory: Callable[..., threading.Thread] = threading.Thread,
                 on_refresh: Callable[[float], None] | None = None, link: ManagerLink | None = None) -> None:
        super().__init__(name, pipeline, log)
        self.auth = security.Auth(link, self.counters, name)
        preload("scan", "sink-query")
        self.config = config
        self.store = ScanStore(config.budget_bytes, config.stale_seconds, on_error=self.counters.error)
        context = zmq.Context.instance()
        self.inlet = PullInlet(context, bind_host, advertised_host, self._ingest, self.counters, thread_factory,
                               name="sink-in", auth=self.auth, admits=security.consumer_rule(pipeline),
                               check_sender=security.check_consumer_sender)
        self.queries = QueryServer(context, bind_host, advertised_host, self.store, self.counters, thread_factory)
        self.lavue = LavuePublisher(context, bind_host, advertised_host, config.viewer_hwm)
        self.endpoints = {protocol.DATA_IN: self.inlet.endpoint, QUERY: self.queries.endpoint,
                          LAVUE: self.lavue.endpoint}
        self.on_refresh = on_refresh
        self.topics: list[str] = []
        self._announced_at = -math.inf
        self._sent: dict[str, tuple[str, int]] = {}  # topic -> (scan, version) last published
        self._sent_at: dict[str, float] = {}
        self._viewer = thread_factory(target=self._viewer_loop, name="sink-viewers", daemon=True)

    def start(self) -> None:
        self.inlet.start()
        self.queries.start()
        self._viewer.start()

    def stop(self) -> None:
        super().stop()
        self.inlet.stop()
        self.queries.stop()
        if self._viewer.is_alive():
            self._viewer.join(5)
        self.lavue.close()

    # ------------------------------------------------------------ data in
    def _ingest(self, msg: codec.Message) -> None:
        """One sorter message into the store; ValueError (counted, logged by
        the inlet) for what cannot be placed."""
        pipeline = msg.stream
        if msg.type == codec.SCAN_START:
            try:
                meta = parse_scan(msg.meta.get(protocol.META_SCAN, {}))
            except ScanError as exc:
                raise StoreError(f"scan_start refused: {exc}") from None
            if meta.scan_id != msg.scan:
                raise StoreError(f"scan_start for {msg.scan!r} carries the document of {meta.scan_id!r}")
            try:
                resume = protocol.check_resume(msg.meta)
            except ValueError as exc:
                raise StoreError(f"scan_start refused: {exc}") from None
            if resume is not None and self.store.resume(msg.scan, pipeline):
                log.warning("scan %s: sorter of pipeline %s restarted, delivery resumes at index %d",
                            msg.scan, pipeline or "-", resume)
                return
            self.store.start(meta, pipeline, joined_at=resume or None)
            if resume:  # this sink restarted mid-scan: it holds the rest of the scan, and says so
                log.warning("scan %s: pipeline %s joined at index %d: %s", msg.scan, pipeline or "-", resume,
                            brief(str(msg.meta.get(protocol.META_REASON, ""))))
            log.info("scan %s: receiving from pipeline %s", msg.scan, pipeline or "-")
        elif msg.type == codec.RESULT:
            try:  # raw frames a processor passed on still compressed: the sink shows them decoded
                arrays = compression.decoded(msg.arrays)
            except compression.CompressionError as exc:
                raise StoreError(f"scan {msg.scan}/{pipeline}: a compressed result does not decode: {exc}") from None
            self.store.add_result(msg.scan, pipeline, msg.index, msg.count, arrays, msg.meta)
        elif msg.type == codec.GAP:
            self.store.add_gap(msg.scan, pipeline, msg.index, msg.count)
        elif msg.type in (codec.SCAN_END, codec.SCAN_ABORT):
            self.store.end(msg.scan, pipeline, msg.meta, aborted=msg.type == codec.SCAN_ABORT)
            log.info("scan %s %s for pipeline %s%s", msg.scan,
                     "aborted" if msg.type == codec.SCAN_ABORT else "ended", pipeline or "-",
                     f": {msg.meta.get(protocol.META_REASON)}" if msg.meta.get(protocol.META_REASON) else "")
        else:
            raise StoreError(f"{protocol.DATA_IN} takes sorted results and scan control, not {msg.type}")

    # ------------------------------------------------------------ viewers
    def live_products(self) -> dict[str, tuple[ScanEntry, Product]]:
        """Topic -> product of the latest scan of every pipeline."""
        with self.store.lock:
            live: dict[str, tuple[ScanEntry, Product]] = {}
            for scan_id in self.store.current.values():
                entry = self.store.scans.get(scan_id)
                if entry is not None:
                    live.update((name, (entry, product)) for name, product in entry.products.items())
            return live

    def frame(self, topic: str) -> LiveFrame | None:
        live = self.live_products().get(topic)
        if live is None:
            return None
        with self.store.lock:
            return live_frame(*live)

    def progress(self) -> Progress:
        with self.store.lock:
            entry = self.store.scans.get(self.store.latest_scan)
            if entry is None:
                return Progress("", 0, 0, "")
            counts = entry.counts()
            return Progress(entry.scan_id, counts["expected"], counts["received"], entry.status)

    def refresh_viewers(self, now: float) -> None:
        live = self.live_products()
        topics = sorted(live)
        if topics != self.topics or now - self._announced_at >= self.config.announce_seconds:
            self.lavue.announce(topics)
            if topics != self.topics:
                log.info("Lavue topics now %s", topics)
            self.topics, self._announced_at = topics, now
        period = 1.0 / self.config.viewer_rate_hz
        for topic, (entry, product) in live.items():
            state = (entry.scan_id, product.version)
            if self._sent.get(topic) == state or now - self._sent_at.get(topic, -math.inf) < period:
                continue
            with self.store.lock:
                frame = live_frame(entry, product)
            if frame is not None:
                self.lavue.publish(topic, frame)
                self.counters.events_out += 1
            self._sent[topic], self._sent_at[topic] = state, now
        for topic in set(self._sent) - set(live):
            del self._sent[topic]
            self._sent_at.pop(topic, None)

    def _viewer_loop(self) -> None:
        tick = min(0.05, 0.25 / self.config.viewer_rate_hz)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            try:
                self.refresh_viewers(now)
                if self.on_refresh is not None:
                    self.on_refresh(now)
            except Exception as exc:  # a viewer problem must not stop the viewers for good
                log.exception("viewer refresh failed")
                self.counters.error(f"viewer refresh failed: {exc!r}")
            with self.store.lock:
                self.counters.queue_depth = sum(1 for e in self.store.scans.values() if e.open)

    def status(self) -> str:
        s = self.store.stats()
        return (f"{s['scans']} scans, {s['resident'] / 2**20:.1f} of {s['budget'] / 2**20:.1f} MiB; "
                f"{s['evictions']} evicted; Lavue at {self.lavue.address}; "
                f"{self.queries.answered} queries answered.")
