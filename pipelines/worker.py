"""PipelineWorker: runs a processor over units of work; owns I/O, credit and errors.

Two threads: the *link* thread owns the DEALER to the master (credit, heartbeat,
receiving units, finding the master and sorter through the topology manager);
the *processing* thread runs the processor and pushes results to the sorter.
The link thread keeps heartbeating while a long batch is processed, and grants
new credit only when a unit is finished, so the master never gives a worker
more than ``Prefetch`` units.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zmq

from pipelines import processors
from services import protocol
from pipelines.component import PipelineComponent
from services import codec, compression, security
from services.ledger import fill_value
from services.dataplane import DATA_MAX_FRAME_BYTES, DropWatch, limit_frames
from services.registration import ManagerLink, ManagerUnavailable
from services.scan import ScanMeta, parse_scan

log = logging.getLogger("tangomesh.worker")

SCANS_KEPT = 8
_identities = itertools.count()
_done_endpoints = itertools.count()


@dataclass(frozen=True)
class WorkerConfig:
    prefetch: int = 2
    heartbeat: float = 0.25
    lookup_period: float = 2.0
    role: str = ""
    processing_delay: float = 0.0
    preload: tuple[str, ...] = ()  # processors prepared at start-up; "*": every installed one

    def __post_init__(self) -> None:
        if not 1 <= self.prefetch <= 1000:
            raise ValueError("Prefetch must be 1..1000")
        if self.heartbeat <= 0 or self.lookup_period <= 0 or self.processing_delay < 0:
            raise ValueError("HeartbeatSeconds and the lookup period must be positive, ProcessingDelaySeconds >= 0")


class WorkerComponent(PipelineComponent):
    kind = protocol.Kind.WORKER

    def __init__(
        self,
        name: str,
        pipeline: str,
        config: WorkerConfig,
        link: ManagerLink,
        thread_factory: Callable[..., threading.Thread] = threading.Thread,
    ) -> None:
        super().__init__(name, pipeline, link, log)
        self.config = config
        self.capabilities = {"processors": processors.available(), "role": config.role, "prefetch": config.prefetch}
        self.scans: collections.OrderedDict[str, ScanMeta] = collections.OrderedDict()
        self.todo: queue.Queue[codec.Message] = queue.Queue()
        self.master_endpoint = ""
        self.sorter_endpoint = ""
        self.units = 0
        self.in_hand = 0  # units received and not yet finished; the link thread alone changes it
        self.points = 0
        self.failed_points = 0
        self.copies = 0
        self.processor_name = ""
        self._done = self.context.socket(zmq.PULL)  # processing -> link: "a unit is finished"
        # unique in the process for good: id(self) comes back once a stopped worker is freed, and a killed
        # worker's inproc socket may not be closed yet
        self._done_endpoint = f"inproc://worker-done-{next(_done_endpoints)}"
        self._done.bind(self._done_endpoint)
        self.threads = [thread_factory(target=self._link_loop, name="worker-link", daemon=True),
                        thread_factory(target=self._work_loop, name="worker-processing", daemon=True)]

    def stop(self) -> None:
        super().stop()
        self._done.close(0)

    # ------------------------------------------------------------ link thread
    def _lookup(self, kind: str, role: str) -> str:
        found = [s["endpoints"].get(role, "") for s in self.link.lookup({"kind": kind, "pipeline": self.pipeline})]
        found = [e for e in found if e]
        return found[0] if len(found) == 1 else ""

    def _link_loop(self) -> None:
        dealer: zmq.Socket | None = None
        drops: DropWatch | None = None
        next_lookup = 0.0
        last_sent = 0.0
        poller = zmq.Poller()
        poller.register(self._done, zmq.POLLIN)
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_lookup:
                # look again soon while there is no master or sorter yet, then at the slow pace
                found = self.master_endpoint and self.sorter_endpoint
                next_lookup = now + (self.config.lookup_period if found else min(0.25, self.config.lookup_period))
                try:
                    master = self._lookup(protocol.Kind.MASTER, protocol.WORK)
                    self.sorter_endpoint = self._lookup(protocol.Kind.SORTER, protocol.RESULTS_IN) or self.sorter_endpoint
                except (ManagerUnavailable, ValueError) as exc:
                    log.debug("lookup failed: %s", exc)
                    master = self.master_endpoint
                if master and master != self.master_endpoint:
                    dealer, drops = self._reconnect(poller, dealer, drops, master)
                    self.master_endpoint = master if dealer is not None else ""
                    last_sent = time.monotonic()
            ready = dict(poller.poll(int(self.config.heartbeat * 500)))
            if dealer is None:
                continue
            if drops is not None and drops.monitor in ready and drops.poll():
                # libzmq never reconnects after dropping the master for an oversized unit: connect anew
                dealer, drops = self._reconnect(poller, dealer, drops, self.master_endpoint)
                last_sent = time.monotonic()
                if dealer is None:
                    continue
            if self._done in ready:
                finished = 0
                while True:
                    try:
                        self._done.recv(zmq.NOBLOCK)
                        finished += 1
                    except zmq.Again:
                        break
                self.in_hand -= finished
                self._send(dealer, self._credit(finished))
                last_sent = time.monotonic()
            if dealer in ready:
                self._drain_master(dealer)
            if time.monotonic() - last_sent >= self.config.heartbeat:
                self._send(dealer, self._credit(0))
                last_sent = time.monotonic()
        if drops is not None:
            drops.close()
        if dealer is not None:
            dealer.close(0)

    def _reconnect(self, poller: zmq.Poller, dealer: zmq.Socket | None, drops: DropWatch | None,
                   endpoint: str) -> tuple[zmq.Socket | None, DropWatch | None]:
        """Leave the old link to the master (if any) for a new one to ``endpoint``,
        watched for drops; (None, None), counted, if the master's key is not
        found (it left again since the lookup: the next lookup decides)."""
        if dealer is not None:
            poller.unregister(dealer)
            if drops is not None:
                poller.unregister(drops.monitor)
                drops.close()
            dealer.close(0)
        try:
            dealer, drops = self._connect(endpoint)
        except security.UnknownPeer as exc:
            self.counters.error(f"cannot connect to the master: {exc}")
            self.master_endpoint = ""
            return None, None
        poller.register(dealer, zmq.POLLIN)
        poller.register(drops.monitor, zmq.POLLIN)
        return dealer, drops

    def _connect(self, endpoint: str) -> tuple[zmq.Socket, DropWatch]:
        """A fresh identity per connection: the master treats it as a new worker
        and sends it the active scans before any unit. Watched for drops from
        before it connects."""
        dealer = self.context.socket(zmq.DEALER)
        dealer.identity = f"{self.name}#{os.getpid()}-{next(_identities)}".encode()
        dealer.linger = 0
        limit_frames(dealer, DATA_MAX_FRAME_BYTES)
        drops = DropWatch(dealer, "the link from the master", self.counters)
        try:
            self.auth.connect(dealer, endpoint)
        except security.UnknownPeer:
            drops.close()
            raise
        # Work still queued here from an earlier master connection stays valid:
        # only units not yet received are asked for.
        self._send(dealer, self._credit(self.open_units))
        log.info("connected to master %s", endpoint)
        return dealer, drops

    @property
    def open_units(self) -> int:
        """Credit this worker holds open: the window less the units it has in hand."""
        return max(0, self.config.prefetch - self.in_hand)

    def _credit(self, count: int) -> codec.Message:
        return protocol.credit(count, self.name, self.config.role, self.open_units)

    def _send(self, dealer: zmq.Socket, msg: codec.Message) -> None:
        try:
            codec.send(dealer, msg, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the master is not reading: a heartbeat more or less does not matter, credit is re-sent below
            # (unreachable in practice: DEALER queues up to its HWM of 1000 messages)

    def _drain_master(self, dealer: zmq.Socket) -> None:
        for msg in self.drain(dealer, "the link from the master"):
            self.counters.events_in += 1
            if msg.type == codec.SCAN_START:
                try:
                    meta = parse_scan(msg.meta.get(protocol.META_SCAN, {}))
                    sorter = protocol.check_sorter(msg.meta)
                except ValueError as exc:
                    self.counters.error(f"refused scan_start of {msg.scan!r}: {exc}")
                    continue
                if sorter and sorter != self.sorter_endpoint:
                    # the master's word beats a lookup that may lag: after a sorter restart the master sends
                    # this before the units it dispatches again, whose results must reach the new sorter
                    log.info("results now go to the sorter at %s", sorter)
                    self.sorter_endpoint = sorter
                self.scans[meta.scan_id] = meta
                self.scans.move_to_end(meta.scan_id)
                while len(self.scans) > SCANS_KEPT:
                    self.scans.popitem(last=False)
            elif msg.type in (codec.DATA, codec.SCAN_END, codec.SCAN_ABORT):
                self.in_hand += msg.type == codec.DATA
                self.todo.put(msg)
                self.counters.queue_depth = self.todo.qsize()
            else:
                self.counters.error(f"refused {msg.type} from the master: expected data or scan control")

    # ------------------------------------------------------------ processing thread
    def _work_loop(self) -> None:
        done = self.context.socket(zmq.PUSH)
        done.connect(self._done_endpoint)
        results: zmq.Socket | None = None
        connected_to = ""
        active: dict[str, processors.Processor | Exception] = {}
        for name, why in processors.preload(self.config.preload).items():  # heavy imports now, not in the first scan
            self.counters.error(f"processor {name} cannot be loaded: {why}")
        while not self._stopping.is_set():
            try:
                msg = self.todo.get(timeout=0.1)
            except queue.Empty:
                continue
            self.counters.queue_depth = self.todo.qsize()
            if msg.type != codec.DATA:
                proc = active.pop(msg.scan, None)
                if isinstance(proc, processors.Processor):
                    self._safely(proc.end_scan, f"end_scan of {msg.scan}")
                continue
            try:
                if self.config.processing_delay:
                    time.sleep(self.config.processing_delay)
                result = self._process(msg, active)
                while result is not None and not self._stopping.is_set():
                    if self.sorter_endpoint != connected_to:
                        if results is not None:
                            results.close(0)
                            results, connected_to = None, ""
                        if self.sorter_endpoint:
                            results = self.context.socket(zmq.PUSH)
                            results.linger = 0
                            try:
                                self.auth.connect(results, self.sorter_endpoint)
                                connected_to = self.sorter_endpoint
                            except security.UnknownPeer as exc:  # the master named a sorter not (yet) registered
                                results = None
                                self.counters.error(f"cannot send results: {exc}")
                                time.sleep(0.5)
                                continue
                    if not connected_to:
                        time.sleep(0.1)  # no sorter registered yet: wait, the master keeps the unit meanwhile
                        continue
                    try:
                        codec.send(results, result, zmq.NOBLOCK)
                        self.counters.events_out += 1
                        break
                    except zmq.Again:  # the sorter pushes back: wait, the link thread keeps heartbeating
                        results.poll(100, zmq.POLLOUT)
            except Exception as exc:  # a bug of ours must not stop the worker
                log.exception("processing a unit failed")
                self.counters.error(f"unit [{msg.index}, {msg.stop}) of {msg.scan}: {exc!r}")
            finally:
                done.send(b"")
        done.close(0)
        if results is not None:
            results.close(0)

    def _safely(self, fn: Callable[[], Any], what: str) -> None:
        try:
            fn()
        except Exception as exc:
            self.counters.error(f"{what} failed: {exc!r}")

    def _processor(self, scan: ScanMeta, active: dict[str, Any]) -> processors.Processor:
        """The scan's processor, started once; the exception if it cannot start."""
        proc = active.get(scan.scan_id)
        if proc is None:
            try:
                name, settings = scan.analysis_for(self.pipeline)
                proc = processors.load(name)()
                proc.start_scan(scan, settings)
                self.processor_name = name
            except Exception as exc:
                proc = exc
                self.counters.error(f"scan {scan.scan_id}: processor does not start: {exc}")
            active[scan.scan_id] = proc
        if isinstance(proc, Exception):
            raise proc
        return proc

    def _process(self, unit: codec.Message, active: dict[str, Any]) -> codec.Message | None:
        scan = self.scans.get(unit.scan)
        if scan is None:
            self.counters.error(f"unit for scan {unit.scan!r} without its scan_start: not processed")
            return None
        missing = unit.meta.get(protocol.META_MISSING, [])
        self.units += 1
        self.points += unit.count
        try:
            proc = self._processor(scan, active)
            # frames that travelled compressed are decompressed here, once, unless the processor passes them on
            given = unit.arrays if proc.keeps_compressed else compression.decoded(unit.arrays)
            batch = processors.Batch(scan, unit.index, unit.count, given, frozenset(missing))
            arrays, errors = run_isolated(proc, batch)
        except Exception as exc:  # a frame that does not decompress, a processor that cannot start: every point fails
            arrays, errors = {}, {str(i): f"{type(exc).__name__}: {exc}" for i in range(unit.index, unit.stop)}
        self.failed_points += len(errors)
        if unit.meta.get("copy"):
            self.copies += 1
            log.debug("copy of [%d, %d) of %s processed: %s", unit.index, unit.stop, unit.scan, sorted(arrays))
            return None
        meta: dict[str, Any] = {}
        if errors:
            meta[protocol.META_ERRORS] = errors
        if missing:
            meta[protocol.META_INCOMPLETE] = {s: [[unit.index, unit.stop]] for s in missing}
        return codec.Message(codec.RESULT, scan=unit.scan, stream=self.pipeline, index=unit.index,
                             count=unit.count, arrays=arrays, meta=meta)

    def status(self) -> str:
        master = self.master_endpoint or "not found yet"
        return (f"Master {master}, sorter {self.sorter_endpoint or 'not found yet'}; "
                f"{self.units} units, {self.points} points, {self.failed_points} failed.")


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_isolated(proc: processors.Processor, batch: processors.Batch) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Process a batch; if it raises, process its points one by one so that one
    bad point fails alone. Failed rows hold services.ledger.fill_value (NaN for
    floats); ``errors`` maps the index (as text) to the message."""
    try:
        return processors.check_results(proc.process(batch), batch.count), {}
    except Exception as exc:
        if batch.count == 1:
            return {}, {str(batch.index): _why(exc)}
    good: dict[int, dict[str, np.ndarray]] = {}
    errors: dict[str, str] = {}
    for j in range(batch.count):
        try:
            good[j] = processors.check_results(proc.process(batch.point(j)), 1)
        except Exception as exc:
            errors[str(batch.index + j)] = _why(exc)
    if not good:
        return {}, errors
    layouts = {j: tuple((n, a.dtype.str, a.shape[1:]) for n, a in res.items()) for j, res in good.items()}
    common = collections.Counter(layouts.values()).most_common(1)[0][0]  # the odd points fail, not the rest
    layout = {n: (np.dtype(dt), shape) for n, dt, shape in common}
    for j in list(good):
        if layouts[j] != common:
            errors[str(batch.index + j)] = "results differ in names, dtypes or shapes from the batch's other points"
            del good[j]
    arrays = {}
    for name, (dtype, shape) in layout.items():
        out = np.full((batch.count, *shape), fill_value(dtype), dtype=dtype)
        for j, res in good.items():
            out[j] = res[name][0]
        arrays[name] = out
    return arrays, errors
