"""What every file writer shares: the inlet, one open file per scan and
pipeline, point bookkeeping, housekeeping and the list of files written.

A format is a :class:`ScanFile` subclass; :class:`WriterComponent` feeds it
sorted results in acquisition order and finishes it at the scan's end. A scan
the writer cannot write (bad path, file owned by another writer, disk error)
is refused once, with a counted and logged error; its later messages are
skipped silently (counted in ``skipped``) instead of raising one error per
chunk. A scan whose end never comes (its pipeline died) is finished as
``abandoned`` after ``stale_seconds``, so neither memory nor file handles are
held forever.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from services import codec, protocol, security
from services.compression import CompressionError, CompressedFrames
from services.component import Component, brief
from services.dataplane import PullInlet
from services.registration import ManagerLink
from services.ledger import ABORTED, COMPLETE, INCOMPLETE, PointLedger
from services.scan import ScanError, ScanMeta, parse_scan
from services.schema import preload
from writers.layout import OutputLayout, WriterError

FILES_KEPT = 1000
REFUSED_KEPT = 1000
HOUSEKEEPING_SECONDS = 0.5

ABANDONED = "abandoned"
__all__ = ["ABANDONED", "ABORTED", "COMPLETE", "INCOMPLETE", "ScanFile", "ScanRun", "WriterComponent", "WriterConfig"]


def now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds")


@dataclass
class ScanRun:
    """One pipeline's part of one scan, as a writer sees it."""

    meta: ScanMeta
    pipeline: str
    stem: Path
    owner: str
    ledger: PointLedger
    start_time: str = field(default_factory=now_iso)
    end_time: str = ""
    status: str = "running"
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def processor(self) -> tuple[str, dict[str, Any]]:
        """(processor, settings) as the scan document gives them for this pipeline."""
        try:
            return self.meta.analysis_for(self.pipeline)
        except ScanError:
            return "", {}


def decoded(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """Compressed frames decoded for a file that does not store chunks; WriterError if one does not decode."""
    try:
        return {n: a.decompress() if isinstance(a, CompressedFrames) else a for n, a in arrays.items()}
    except CompressionError as exc:
        raise WriterError(f"a compressed result does not decode: {exc}") from None


class ScanFile:
    """One format's output for one :class:`ScanRun`. Subclasses claim their
    file(s) in ``__init__`` and raise :class:`WriterError` when they may not."""

    #: True: :meth:`write` takes compressed frames as they came (the NeXus
    #: writer stores their chunks directly); otherwise they arrive decoded.
    keeps_compressed = False

    def __init__(self, run: ScanRun) -> None:
        self.run = run

    def write(self, index: int, stop: int, arrays: dict[str, np.ndarray], failed: np.ndarray) -> None:
        """Points [index, stop) in acquisition order; ``failed`` are indices
        whose values the processor could not compute."""
        raise NotImplementedError

    def gap(self, index: int, stop: int) -> None:
        """Points the pipeline gave up on (nothing will come for them)."""

    def tick(self, now: float) -> None:
        """Called about twice a second while the scan is open (flushes, interim output)."""

    def finish(self) -> list[tuple[Path, str]]:
        """Complete the output (``run.status`` and ``run.end_time`` are set);
        return (final path, SHA-256) of every file made final."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Stop writing after an error: close what is open, keep partial files
        as they are, give up the claims."""


@dataclass(frozen=True)
class WriterConfig:
    stale_seconds: float = 3600.0
    max_open_scans: int = 64

    def __post_init__(self) -> None:
        if self.stale_seconds <= 0 or self.max_open_scans < 1:
            raise ValueError("StaleScanSeconds must be positive and MaxOpenScans at least 1")


class WriterComponent(Component):
    """A writer of one format: ``open_file`` makes the format's
    :class:`ScanFile` for a scan (``"nexus"``, ``"fio"``, ``"images"``)."""

    kind = protocol.Kind.WRITER

    def __init__(self, name: str, pipeline: str, bind_host: str, advertised_host: str, layout: OutputLayout,
                 file_format: str, open_file: Callable[[ScanRun], ScanFile], config: WriterConfig,
                 thread_factory: Callable[..., threading.Thread] = threading.Thread,
                 on_file: Callable[[str], None] | None = None, link: ManagerLink | None = None) -> None:
        self.file_format = file_format
        super().__init__(name, pipeline, logging.getLogger(f"tangomesh.writer.{file_format}"))
        self.auth = security.Auth(link, self.counters, name)
        self.open_file = open_file
        preload("scan")
        self.layout = layout
        self.config = config
        self.on_file = on_file
        self.runs: dict[tuple[str, str], tuple[ScanRun, ScanFile]] = {}
        self.refused: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self.files: collections.deque[dict[str, Any]] = collections.deque(maxlen=FILES_KEPT)
        self.files_written = 0
        self.bytes_written = 0
        self.skipped = 0
        self.last_file = ""
        self.lock = threading.Lock()
        self._touched: dict[tuple[str, str], float] = {}
        self.inlet = PullInlet(zmq.Context.instance(), bind_host, advertised_host, self._handle, self.counters,
                               thread_factory, name=f"{self.file_format}-in", auth=self.auth,
                               admits=security.consumer_rule(pipeline), check_sender=security.check_consumer_sender)
        self.endpoints = {protocol.DATA_IN: self.inlet.endpoint}
        self.capabilities = {"format": self.file_format, "root": str(layout.root)}
        self._housekeeper = thread_factory(target=self._housekeeping, name=f"{self.file_format}-tick", daemon=True)

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.inlet.start()
        self._housekeeper.start()

    def stop(self) -> None:
        super().stop()
        self.inlet.stop()
        if self._housekeeper.is_alive():
            self._housekeeper.join(5)
        with self.lock:
            for key in list(self.runs):
                try:
                    self._finish(key, ABANDONED, {"reason": "writer stopped"})
                except WriterError as exc:
                    self.counters.error(str(exc))

    # ------------------------------------------------------------ data in
    def _handle(self, msg: codec.Message) -> None:
        key = (msg.scan, msg.stream)
        with self.lock:
            if key in self.refused and msg.type != codec.SCAN_START:
                self.skipped += 1
                return
            if msg.type == codec.SCAN_START:
                self._start(msg, key)
                return
            entry = self.runs.get(key)
            if entry is None:
                raise WriterError(f"scan {msg.scan} was not started for pipeline {msg.stream!r}")
            run, out = entry
            self._touched[key] = time.monotonic()
            try:
                if msg.type == codec.RESULT:
                    stop, failed = run.ledger.check(msg.index, msg.count, msg.meta)
                    out.write(msg.index, stop, msg.arrays if out.keeps_compressed else decoded(msg.arrays), failed)
                    run.ledger.mark_result(msg.index, stop, failed, msg.meta, on_duplicate=lambda n: self.log.warning(
                        "scan %s/%s: %d points delivered again", msg.scan, msg.stream, n))
                elif msg.type == codec.GAP:
                    stop = run.ledger.check_range(msg.index, msg.count)
                    out.gap(msg.index, stop)
                    run.ledger.mark_gap(msg.index, msg.count)
                elif msg.type in (codec.SCAN_END, codec.SCAN_ABORT):
                    self._finish(key, run.ledger.end_status(msg.meta, aborted=msg.type == codec.SCAN_ABORT), msg.meta)
                else:
                    raise WriterError(f"{protocol.DATA_IN} takes sorted results and scan control, not {msg.type}")
            except WriterError:
                raise
            except ValueError as exc:  # a chunk that does not fit: refuse it, keep the file
                raise WriterError(f"scan {msg.scan}/{msg.stream}: {exc}") from None
            except Exception as exc:  # an I/O error: this scan's file is lost, the writer goes on
                self._refuse(key, f"writing failed: {exc!r}")
                self.runs.pop(key, None)
                self._touched.pop(key, None)
                out.abandon()
                raise WriterError(f"scan {msg.scan}/{msg.stream}: writing failed, file abandoned: {exc!r}") from exc

    def _start(self, msg: codec.Message, key: tuple[str, str]) -> None:
        try:
            resume = protocol.check_resume(msg.meta)
        except ValueError as exc:
            if key not in self.runs:
                self._refuse(key, str(exc))
            raise WriterError(f"scan_start of {msg.scan} refused: {exc}") from None
        if key in self.runs:
            if resume is not None:  # the sorter restarted: the same file goes on, re-delivered points count as duplicates
                self._touched[key] = time.monotonic()
                self.log.warning("scan %s/%s: sorter restarted, delivery resumes at index %d",
                                 msg.scan, msg.stream or "-", resume)
                return
            raise WriterError(f"scan {msg.scan} already started for pipeline {msg.stream!r}")
        try:
            meta = parse_scan(msg.meta.get(protocol.META_SCAN, {}))
        except ScanError as exc:
            self._refuse(key, str(exc))
            raise WriterError(f"scan_start refused: {exc}") from None
        if meta.scan_id != msg.scan:
            self._refuse(key, "scan id mismatch")
            raise WriterError(f"scan_start for {msg.scan!r} carries the document of {meta.scan_id!r}")
        if len(self.runs) >= self.config.max_open_scans:
            self._refuse(key, "too many open scans")
            raise WriterError(f"scan {msg.scan}: {len(self.runs)} scans open already (MaxOpenScans)")
        try:
            run = ScanRun(meta, msg.stream, self.layout.stem(meta, msg.stream), self.name,
                          PointLedger.for_points(meta.points))
            out = self.open_file(run)
        except (WriterError, OSError) as exc:
            self._refuse(key, str(exc))
            raise WriterError(f"scan {msg.scan}/{msg.stream or '-'} not written: {exc}") from None
        self.refused.pop(key, None)
        self.runs[key] = (run, out)
        self._touched[key] = time.monotonic()
        if resume:  # this writer restarted (or registered) mid-scan: its file holds the rest, and says so
            run.ledger.joined_at = resume
            self.log.warning("scan %s/%s: joined at index %d: %s", msg.scan, msg.stream or "-", resume,
                             brief(str(msg.meta.get(protocol.META_REASON, ""))))
        self.log.info("scan %s/%s: writing %s", msg.scan, msg.stream or "-", run.stem)

    def _refuse(self, key: tuple[str, str], why: str) -> None:
        self.refused[key] = why
        while len(self.refused) > REFUSED_KEPT:
            self.refused.popitem(last=False)

    def _finish(self, key: tuple[str, str], status: str, summary: dict[str, Any]) -> None:
        run, out = self.runs.pop(key)
        self._touched.pop(key, None)
        run.status, run.summary, run.end_time = status, dict(summary or {}), now_iso()
        try:
            finals = out.finish()
        except Exception as exc:
            out.abandon()
            raise WriterError(f"scan {run.meta.scan_id}/{run.pipeline}: finishing failed: {exc!r}") from exc
        for path, digest in finals:
            size = path.stat().st_size
            self.files.append({"path": str(path), "sha256": digest, "bytes": size, "scan": run.meta.scan_id,
                               "pipeline": run.pipeline, "status": status, "written": run.end_time})
            self.files_written += 1
            self.bytes_written += size
            self.last_file = str(path)
            self.counters.events_out += 1
        self.log.info("scan %s/%s %s: %d files, %s", run.meta.scan_id, run.pipeline or "-", status, len(finals),
                      run.ledger.describe())
        if finals and self.on_file is not None:
            self.on_file(self.last_file)

    # ------------------------------------------------------------ housekeeping
    def _housekeeping(self) -> None:
        while not self._stopping.wait(HOUSEKEEPING_SECONDS):
            now = time.monotonic()
            with self.lock:
                for key, (run, out) in list(self.runs.items()):
                    try:
                        if now - self._touched.get(key, now) > self.config.stale_seconds:
                            self.log.warning("scan %s/%s: nothing for %.0f s, finishing it as abandoned",
                                             *key, self.config.stale_seconds)
                            self._finish(key, ABANDONED, {"reason": "no scan end before StaleScanSeconds"})
                        else:
                            out.tick(now)
                    except Exception as exc:
                        self.counters.error(f"scan {key[0]}/{key[1]}: {exc}")
                self.counters.queue_depth = len(self.runs)

    def status(self) -> str:
        return (f"{len(self.runs)} scans open; {self.files_written} files written "
                f"({self.bytes_written / 2**20:.1f} MiB) under {self.layout.root}; last: {self.last_file or '-'}")

    def list_files(self, n: int) -> list[dict[str, Any]]:
        files = list(self.files)
        return files[-n:] if n > 0 else files
