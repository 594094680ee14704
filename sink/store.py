"""The sink's memory: the latest scans, assembled into maps, under a byte budget.

No sockets and no Tango here, so that assembly, accounting and eviction are
unit-tested directly. One lock guards the structure; the inlet thread writes,
the query, viewer and Tango threads read.

Products
    Every result array a pipeline delivers becomes a product named
    ``<pipeline>/<result>`` (``counters/i0``, ``xrf/Fe-K``), shaped
    ``map_shape + point_shape``: a 2-D map of a scalar for a raster (snake rows
    unfolded), a 1-D trace for a line, a stack of 1-D patterns for a line of
    spectra. Points without a value (not received yet, failed, gaps) show it
    in the value, so products are stored in services.ledger.nan_dtype and
    hold its fill_value there (the one rule, docs/sink.md).

Memory
    Budget accounting counts the real bytes of every product array and of the
    per-point state arrays. A product is allocated whole (NaN-filled) when its
    first values arrive; if that would exceed the budget, the scans least
    recently touched (read or written) are evicted first. Scans still being
    written are never evicted (unless idle for ``stale_seconds``: a pipeline
    that died mid-scan must not pin memory forever); if the product still
    does not fit it is refused, counted and logged, and the scan's info says so.
    Large arrays live in anonymous memory maps, so an eviction returns the
    memory to the operating system at once (the process RSS follows the
    accounting instead of growing with heap fragmentation).
"""

from __future__ import annotations

import collections
import logging
import math
import mmap
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from services.ledger import GAP, PENDING, RECEIVED, PointLedger, fill_value, nan_dtype
from services.placement import blocks, cells, place
from services.scan import ScanMeta, axis_values
from sink.derived import MAP_PRODUCTS, REDUCTIONS, MapProduct, Running, map_product, reduction
from sink.regrid import RegridError, regrid

log = logging.getLogger("tangomesh.sink")

MMAP_MIN_BYTES = 256 * 1024
EVICTED_KEPT = 10_000


class StoreError(ValueError):
    """A question the store cannot answer, or data it refuses; the message says why."""


class EvictedError(StoreError):
    """The scan was here and has been evicted to stay within the budget."""


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype the sink stores a result of ``dtype`` in (services.ledger.nan_dtype)."""
    try:
        return nan_dtype(dtype)
    except ValueError:
        raise StoreError(f"dtype {np.dtype(dtype)} cannot be stored") from None


def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array holding the fill value; big ones in their own anonymous mmap (see module doc)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MMAP_MIN_BYTES:
        return np.full(shape, fill_value(dtype), dtype=dtype)
    buf = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)  # the NaN fill faults in 2 MB pages, not 4 KB: about twice as fast
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    arr.fill(fill_value(dtype))
    return arr


@dataclass
class Product:
    name: str  # <pipeline>/<result>
    pipeline: str
    result: str
    data: np.ndarray  # map_shape + point_shape, C-contiguous
    point_shape: tuple[int, ...]
    source_dtype: str
    version: int = 0  # bumped on every write, for the viewers
    running: dict[str, Running] = field(default_factory=dict)  # the reductions of sink.derived it has

    @property
    def flat(self) -> np.ndarray:
        """A view with one row per map cell: ``(points, *point_shape)``."""
        return self.data.reshape(-1, *self.point_shape)

    def describe(self) -> dict[str, Any]:
        return {"shape": list(self.data.shape), "dtype": self.data.dtype.str, "source_dtype": self.source_dtype,
                "point_shape": list(self.point_shape), "bytes": self.data.nbytes}


@dataclass
class PipelineRun(PointLedger):
    """One pipeline's part of a scan: the point ledger and whether it ended."""

    open: bool = True
    aborted: bool = False
    ended_as: str = ""  # PointLedger.end_status once ended
    summary: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"open": self.open, "aborted": self.aborted, **super().describe(), "summary": self.summary}


@dataclass
class ScanEntry:
    meta: ScanMeta
    started: float  # wall clock, for people
    updated: float
    touched: float  # monotonic, for staleness
    runs: dict[str, PipelineRun] = field(default_factory=dict)
    products: dict[str, Product] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    version: int = 0  # bumped on every change
    _counts: tuple[int, dict[str, int]] | None = field(default=None, repr=False)

    @property
    def scan_id(self) -> str:
        return self.meta.scan_id

    @property
    def open(self) -> bool:
        """Still being written (a scan whose first pipeline is being set up counts)."""
        return not self.runs or any(r.open for r in self.runs.values())

    @property
    def nbytes(self) -> int:
        return sum(p.data.nbytes for p in self.products.values()) + sum(r.state.nbytes for r in self.runs.values())

    @property
    def status(self) -> str:
        if self.open:
            return "running"
        if any(r.aborted for r in self.runs.values()):
            return "aborted"
        if any(r.ended_as == "incomplete" for r in self.runs.values()):
            return "incomplete"
        return "complete"

    def counts(self) -> dict[str, int]:
        """Points over the pipelines that reported: a point counts as received
        when every such pipeline has it (so a map is whole only then). Every
        change bumps ``version``, so the viewers' and Tango's frequent reads
        scan the point states once per change, not once per read."""
        cached = self._counts
        if cached is not None and cached[0] == self.version:
            return cached[1]
        counts = self._count()
        self._counts = (self.version, counts)
        return counts

    def _count(self) -> dict[str, int]:
        points = self.meta.points
        if not self.runs:
            return {"expected": points, "received": 0, "failed": 0, "missing": points, "gaps": 0, "duplicates": 0}
        received = np.ones(points, bool)
        for run in self.runs.values():
            received &= run.state != PENDING
            received &= run.state != GAP
        n = int(received.sum())
        return {"expected": points, "received": n,
                "failed": max(r.failed for r in self.runs.values()),
                "missing": points - n,
                "gaps": max(r.gaps for r in self.runs.values()),
                "duplicates": sum(r.duplicates for r in self.runs.values())}

    def summary(self) -> dict[str, Any]:
        return {"scan": self.scan_id, "number": self.meta.number, "status": self.status,
                "geometry": self.meta.geometry_type, "map_shape": list(self.meta.map_shape),
                "pipelines": sorted(self.runs), "products": len(self.products), "bytes": self.nbytes,
                "started": self.started, "updated": self.updated, **self.counts()}


class ScanStore:
    """Scans by id in least-recently-touched order, within ``budget`` bytes."""

    def __init__(self, budget: int, stale_seconds: float = 600.0,
                 on_error: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if budget < 1:
            raise ValueError("the memory budget must be at least 1 byte")
        self.budget = budget
        self.stale_seconds = stale_seconds
        self.scans: collections.OrderedDict[str, ScanEntry] = collections.OrderedDict()
        self.evicted: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.resident = 0
        self.peak = 0
        self.evictions = 0
        self.refused_products = 0
        self.current: dict[str, str] = {}  # pipeline -> latest scan started
        self.latest_scan = ""
        self.lock = threading.RLock()
        self._on_error = on_error or (lambda message: log.error(message))
        self._clock = clock

    # ------------------------------------------------------------ writing
    def resume(self, scan_id: str, pipeline: str) -> bool:
        """A pipeline's scan_start re-sent after its sorter restarted: True if
        that part of the scan is here and open, so the entry simply goes on
        (points delivered again count as duplicates, never twice)."""
        with self.lock:
            entry = self.scans.get(scan_id)
            run = entry.runs.get(pipeline) if entry is not None else None
            if run is None or not run.open:
                return False
            self._touch(entry)
            return True

    def start(self, meta: ScanMeta, pipeline: str, joined_at: int | None = None) -> ScanEntry:
        """A pipeline's scan_start. The same scan from another pipeline joins
        the existing entry (its document must be the same scan). ``joined_at``:
        the first index this sink is given (it restarted mid-scan)."""
        with self.lock:
            entry = self.scans.get(meta.scan_id)
            now = self._clock()
            if entry is None:
                self.evicted.pop(meta.scan_id, None)
                entry = ScanEntry(meta, time.time(), time.time(), now)
                self.scans[meta.scan_id] = entry
                self.latest_scan = meta.scan_id
            elif pipeline in entry.runs:
                raise StoreError(f"scan {meta.scan_id} already started for pipeline {pipeline!r}")
            elif entry.meta.points != meta.points or entry.meta.map_shape != meta.map_shape:
                raise StoreError(f"scan {meta.scan_id} from pipeline {pipeline!r} has geometry "
                                 f"{meta.map_shape}, not the {entry.meta.map_shape} already stored")
            state = np.zeros(meta.points, np.uint8)
            try:
                self._reserve(state.nbytes, entry, f"the point states of {meta.scan_id}/{pipeline}")
            except StoreError:
                if not entry.runs:
                    del self.scans[meta.scan_id]
                raise
            entry.runs[pipeline] = PipelineRun(state, joined_at=joined_at)
            entry.version += 1
            self.resident += state.nbytes
            self.peak = max(self.peak, self.resident)
            self.current[pipeline] = meta.scan_id
            self._touch(entry)
            return entry

    def add_result(self, scan_id: str, pipeline: str, index: int, count: int, arrays: dict[str, np.ndarray],
                   meta: dict[str, Any] | None = None) -> None:
        """Place a result chunk: ``count`` points from ``index``, arrays with
        that leading axis. ``meta`` may carry the failed points and the
        incomplete ranges (services.protocol)."""
        meta = meta or {}
        with self.lock:
            entry, run = self._open_run(scan_id, pipeline)
            try:
                stop, failed = run.check(index, count, meta)
            except ValueError as exc:
                raise StoreError(f"scan {scan_id}/{pipeline}: {exc}") from None
            self._check_arrays(entry, pipeline, count, arrays)  # before anything changes
            unsummed = run.unsummed(index, stop, failed)
            run.mark_result(index, stop, failed, meta, on_duplicate=lambda again: self._on_error(
                f"scan {scan_id}/{pipeline}: {again} points of [{index}, {stop}) delivered again"))
            parts = blocks(entry.meta, index, stop)
            failed_cells = cells(entry.meta, failed) if failed.size else failed
            for result, arr in arrays.items():
                product = self._product(entry, pipeline, result, arr)
                if product is None:
                    continue
                place(product.data, parts, arr)
                if failed.size:
                    product.flat[failed_cells] = fill_value(product.data.dtype)
                for name, running in product.running.items():
                    reduction(name).add(running.value, arr, unsummed)
                    running.points += stop - index - unsummed.size
                product.version += 1
            entry.version += 1
            entry.updated = time.time()
            self._touch(entry)

    @staticmethod
    def _check_arrays(entry: ScanEntry, pipeline: str, count: int, arrays: dict[str, np.ndarray]) -> None:
        for result, arr in arrays.items():
            if arr.ndim < 1 or arr.shape[0] != count:
                raise StoreError(f"result {result!r} has {arr.shape[:1]} points, the chunk {count}")
            product = entry.products.get(f"{pipeline}/{result}")
            if product is None:
                storage_dtype(arr.dtype)
            elif arr.shape[1:] != product.point_shape:
                raise StoreError(f"{product.name}: per-point shape {arr.shape[1:]} differs from the "
                                 f"{product.point_shape} of this scan's earlier points")

    def add_gap(self, scan_id: str, pipeline: str, index: int, count: int) -> None:
        """Points the pipeline gave up on: they stay NaN and count as missing."""
        with self.lock:
            entry, run = self._open_run(scan_id, pipeline)
            try:
                run.mark_gap(index, count)
            except ValueError as exc:
                raise StoreError(f"scan {scan_id}/{pipeline}: {exc}") from None
            entry.version += 1
            self._touch(entry)

    def end(self, scan_id: str, pipeline: str, summary: dict[str, Any] | None = None, aborted: bool = False) -> None:
        with self.lock:
            entry, run = self._open_run(scan_id, pipeline)
            run.open = False
            run.aborted = aborted
            run.summary = dict(summary or {})
            run.ended_as = run.end_status(run.summary, aborted)
            entry.version += 1
            entry.updated = time.time()
            self._touch(entry)
            if aborted:
                return
            for derived in MAP_PRODUCTS:
                if self._can_derive(entry, pipeline, derived):
                    self._store_derived(entry, pipeline, derived, self.derive(scan_id, pipeline, derived.name))

    def _store_derived(self, entry: ScanEntry, pipeline: str, derived: MapProduct, value: np.ndarray) -> None:
        point_shape = value.shape[len(entry.meta.map_shape):]
        product = self._product(entry, pipeline, derived.name, value.reshape(-1, *point_shape)[:1])
        if product is not None:
            product.data[...] = value
            product.version += 1

    @staticmethod
    def _can_derive(entry: ScanEntry, pipeline: str, derived: MapProduct) -> bool:
        return derived.applies(entry.meta) and all(f"{pipeline}/{name}" in entry.products for name in derived.inputs)

    def derivable(self, scan_id: str, name: str) -> bool:
        """Whether product ``name`` (``<pipeline>/<result>``) is a map product of
        sink.derived not stored yet whose inputs are there: a query computes it."""
        with self.lock:
            entry = self.entry(scan_id)
            pipeline, _, result = name.partition("/")
            derived = map_product(result)
            return (name not in entry.products and derived is not None
                    and self._can_derive(entry, pipeline, derived))

    def derive(self, scan_id: str, pipeline: str, name: str) -> np.ndarray:
        """Map product ``name`` of sink.derived computed from ``pipeline``'s
        products as they are now; the store keeps it as ``<pipeline>/<name>``
        when the pipeline ends the scan."""
        derived = map_product(name)
        if derived is None:
            raise StoreError(f"the sink derives no product {name!r}")
        with self.lock:
            entry = self.entry(scan_id)
            if not self._can_derive(entry, pipeline, derived):
                raise StoreError(f"scan {scan_id} has no {derived.needs} from {pipeline!r}: "
                                 f"no {derived.name} to compute")
            maps = [entry.products[f"{pipeline}/{result}"].data.copy() for result in derived.inputs]
        return derived.compute(entry.meta, maps)

    def reduced(self, scan_id: str, name: str, how: str) -> tuple[ScanEntry, Product, np.ndarray, int]:
        """A copy of the running reduction ``how`` (sink.derived) of product
        ``name`` and the points in it."""
        with self.lock:
            entry, product = self.product(scan_id, name)
            running = product.running.get(how)
            if running is None:
                known = reduction(how)
                why = known.refusal if known else f"the sink keeps no {how!r}"
                raise StoreError(f"{product.name} has {len(product.point_shape)}-D points; {why}")
            return entry, product, running.value.copy(), running.points

    def _open_run(self, scan_id: str, pipeline: str) -> tuple[ScanEntry, PipelineRun]:
        entry = self._entry(scan_id)
        run = entry.runs.get(pipeline)
        if run is None:
            raise StoreError(f"scan {scan_id} was not started for pipeline {pipeline!r}")
        if not run.open:
            raise StoreError(f"scan {scan_id} already ended for pipeline {pipeline!r}")
        return entry, run

    def _product(self, entry: ScanEntry, pipeline: str, result: str, arr: np.ndarray) -> Product | None:
        name = f"{pipeline}/{result}"
        product = entry.products.get(name)
        if product is not None:
            return product
        if name in entry.refused:
            return None
        dtype = storage_dtype(arr.dtype)
        shape = (*entry.meta.map_shape, *arr.shape[1:])
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            self._reserve(nbytes, entry, f"product {name} of {entry.scan_id}")
        except StoreError as exc:
            entry.refused[name] = str(exc)
            self.refused_products += 1
            self._on_error(str(exc))
            return None
        point_shape = tuple(arr.shape[1:])
        running = {r.name: Running(r.start(point_shape)) for r in REDUCTIONS if r.kept_for(point_shape)}
        product = Product(name, pipeline, result, allocate(shape, dtype), point_shape, arr.dtype.str, running=running)
        entry.products[name] = product
        self.resident += nbytes
        self.peak = max(self.peak, self.resident)
        return product

    # ------------------------------------------------------------ budget
    def _protected(self, entry: ScanEntry) -> bool:
        return entry.open and self._clock() - entry.touched < self.stale_seconds

    def _reserve(self, nbytes: int, for_entry: ScanEntry, what: str) -> None:
        """Evict least recently touched scans until ``nbytes`` more fit."""
        if self.resident + nbytes <= self.budget:
            return
        for entry in list(self.scans.values()):
            if self.resident + nbytes <= self.budget:
                return
            if entry is for_entry or self._protected(entry):
                continue
            self._evict(entry, f"to make room for {what}")
        if self.resident + nbytes > self.budget:
            raise StoreError(f"{what} needs {nbytes} bytes: it does not fit in the sink's budget of "
                             f"{self.budget} bytes beside the {self.resident} bytes of scans still being written")

    def _evict(self, entry: ScanEntry, why: str) -> None:
        nbytes = entry.nbytes
        del self.scans[entry.scan_id]
        self.resident -= nbytes
        self.evictions += 1
        for pipeline, scan_id in list(self.current.items()):
            if scan_id == entry.scan_id:
                del self.current[pipeline]
        self.evicted[entry.scan_id] = {"scan": entry.scan_id, "evicted": time.time(), "bytes": nbytes,
                                       "status": entry.status}
        while len(self.evicted) > EVICTED_KEPT:
            self.evicted.popitem(last=False)
        log.warning("evicted scan %s (%d bytes, %s) %s", entry.scan_id, nbytes, entry.status, why)
        entry.products.clear()

    def _touch(self, entry: ScanEntry) -> None:
        entry.touched = self._clock()
        self.scans.move_to_end(entry.scan_id)

    # ------------------------------------------------------------ reading
    def _entry(self, scan_id: str) -> ScanEntry:
        entry = self.scans.get(scan_id)
        if entry is not None:
            return entry
        gone = self.evicted.get(scan_id)
        if gone is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(gone["evicted"]))
            raise EvictedError(f"scan {scan_id} was evicted from the sink's memory at {stamp} to stay within "
                               f"its budget of {self.budget} bytes; read it from the files")
        raise StoreError(f"no scan {scan_id!r} in the sink")

    def entry(self, scan_id: str, touch: bool = True) -> ScanEntry:
        """The scan, refreshed in the LRU order when ``touch`` (a read counts)."""
        with self.lock:
            entry = self._entry(scan_id)
            if touch:
                self._touch(entry)
            return entry

    def product(self, scan_id: str, name: str) -> tuple[ScanEntry, Product]:
        with self.lock:
            entry = self.entry(scan_id)
            product = entry.products.get(name)
            if product is None:
                why = entry.refused.get(name)
                if why:
                    raise StoreError(f"product {name} of scan {scan_id} was refused: {why}")
                raise StoreError(f"scan {scan_id} has no product {name!r} "
                                 f"(products: {', '.join(entry.products) or 'none yet'})")
            return entry, product

    def regridded(self, scan_id: str, name: str, positions: str) -> tuple[ScanEntry, Product, np.ndarray]:
        """A raster product of scalars resampled onto the nominal grid at the
        positions ``<positions>/<fast axis>`` and ``<positions>/<slow axis>``
        (the ``position`` pipeline's corrected positions); see sink.regrid."""
        with self.lock:
            entry, product = self.product(scan_id, name)
            meta = entry.meta
            if meta.geometry_type != "raster" or product.point_shape:
                raise StoreError(f"only raster maps of scalars can be regridded; {name} is "
                                 f"{meta.geometry_type} with points of shape {product.point_shape}")
            fast, slow = meta.axis_names
            _, x = self.product(scan_id, f"{positions}/{fast}")
            _, y = self.product(scan_id, f"{positions}/{slow}")
            values, xs, ys = product.data.copy(), x.data.copy(), y.data.copy()
        grid_x, grid_y = axis_values(meta)
        try:
            return entry, product, regrid(values, xs, ys, grid_x, grid_y)
        except RegridError as exc:
            raise StoreError(f"cannot regrid {name} of scan {scan_id}: {exc}") from None

    def list_scans(self) -> list[dict[str, Any]]:
        """Resident scans, oldest started first (no LRU refresh)."""
        with self.lock:
            return sorted((e.summary() for e in self.scans.values()), key=lambda s: s["started"])

    def info(self, scan_id: str) -> dict[str, Any]:
        with self.lock:
            entry = self.entry(scan_id)
            return {**entry.summary(), "metadata": entry.meta.raw,
                    "products": {n: p.describe() for n, p in entry.products.items()},
                    "refused": dict(entry.refused),
                    "runs": {p: r.describe() for p, r in entry.runs.items()}}

    def latest(self, scan_id: str, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` highest acquisition indices received by the product's
        pipeline and their values (copies, in index order)."""
        with self.lock:
            entry, product = self.product(scan_id, name)
            state = entry.runs[product.pipeline].state
            indices = np.flatnonzero(state == RECEIVED)[-n:] if n > 0 else np.zeros(0, np.int64)
            return indices.astype(np.int64), product.flat[cells(entry.meta, indices)]

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"budget": self.budget, "resident": self.resident, "peak": self.peak, "scans": len(self.scans),
                    "evictions": self.evictions, "refused_products": self.refused_products}
