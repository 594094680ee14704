"""What became of every acquisition index of one pipeline's part of a scan.

Every consumer of sorted results (the sink, the writers) must tell a point
received from one that failed in the processor, one the sorter gave up on
(a gap) and one that never came; and each must refuse a chunk outside the
scan or with failures outside the chunk before anything changes. This is the
one place that bookkeeping lives, and the one place that decides what value a
point without one (failed, a gap, not received yet) holds in a product:
:func:`fill_value`, :func:`nan_dtype`, :func:`blank_failed` and, for running
sums, :func:`sum_of_points`; the rule is written out for users in
docs/sink.md ("Points without a value").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from services import protocol

PENDING, RECEIVED, FAILED, GAP = 0, 1, 2, 3
COMPLETE, INCOMPLETE, ABORTED = "complete", "incomplete", "aborted"  # how a scan ended: PointLedger.end_status
STATE_NAMES = {PENDING: "pending", RECEIVED: "received", FAILED: "failed", GAP: "gap"}
ERRORS_KEPT = 20


def fill_value(dtype: np.dtype | str | type) -> np.generic:
    """What a point without a value holds in a product of ``dtype``: NaN for
    floating point, NaN+NaN·j for complex (no part of it is a measurement), 0
    for integers and False for bools, which have no "not a number". The worker
    sends failed rows with it; the sink, NeXus, images and FIO fill with it."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return dtype.type(np.nan)
    if dtype.kind == "c":
        return dtype.type(complex(np.nan, np.nan))
    if dtype.kind in "iub":
        return dtype.type(0)
    raise ValueError(f"dtype {dtype} is not numeric: no fill value")


def marks_missing(dtype: np.dtype | str | type) -> bool:
    """Whether :func:`fill_value` tells a missing point by itself (a NaN).
    Integer and bool fills do not (0 is a count like any other): there the
    point's state (the ledger; NeXus ``process/point_status``) tells."""
    return np.dtype(dtype).kind in "fc"


def nan_dtype(dtype: np.dtype | str | type) -> np.dtype:
    """The smallest dtype that holds every value of ``dtype`` exactly and
    marks a missing point (NaN), for consumers that must show missing points
    in the values themselves (the sink's maps): float and complex keep their
    dtype (native byte order); integers and bools become float32 up to 16 bits
    and float64 above (exact to 2**53)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "fc":
        return dtype.newbyteorder("=")
    if dtype.kind in "biu":
        return np.dtype(np.float32) if dtype.itemsize <= 2 else np.dtype(np.float64)
    raise ValueError(f"dtype {dtype} is not numeric: it cannot hold a missing point")


def blank_failed(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values`` (one row per point) with the failed ``rows`` set to the fill
    value where it marks them (float, complex): a copy then, ``values`` itself
    otherwise. Integer and bool rows keep what was sent, which from a worker is
    the fill already; overwriting them would mark nothing."""
    if not len(rows) or not marks_missing(values.dtype):
        return values
    out = values.copy()
    out[rows] = fill_value(values.dtype)
    return out


def sum_of_points(values: np.ndarray, skip: np.ndarray) -> np.ndarray:
    """Sum over the points (axis 0), in float64, of a chunk's points that count:
    the rows ``skip`` (failed, delivered before: :meth:`PointLedger.unsummed`)
    are left out, NaN values ignored. The chunk is not copied: the few skipped
    rows are subtracted instead."""
    def total(a: np.ndarray) -> np.ndarray:
        return a.sum(axis=0, dtype=np.float64) if a.dtype.kind in "biu" else np.nansum(a, axis=0, dtype=np.float64)

    return total(values) - total(values[skip]) if len(skip) else total(values)


@dataclass
class PointLedger:
    state: np.ndarray  # uint8 per acquisition index: PENDING/RECEIVED/FAILED/GAP
    received: int = 0
    failed: int = 0
    gaps: int = 0
    duplicates: int = 0
    incomplete: int = 0
    last_index: int = -1  # highest acquisition index received
    errors: dict[str, str] = field(default_factory=dict)  # the first failure messages, bounded
    # the first index this consumer was given, when it joined the scan late (it restarted mid-scan):
    # the points before it went to its previous process, or nowhere, and count as missing here
    joined_at: int | None = None

    @classmethod
    def for_points(cls, points: int) -> "PointLedger":
        return cls(np.zeros(points, np.uint8))

    @property
    def points(self) -> int:
        return int(self.state.size)

    def check(self, index: int, count: int, meta: dict[str, Any] | None = None) -> tuple[int, np.ndarray]:
        """(stop, failed indices) of a result chunk, or ValueError naming the
        problem; call it before changing anything so that a refused chunk
        leaves no trace."""
        stop = self.check_range(index, count)
        errors = (meta or {}).get(protocol.META_ERRORS, {})
        if not isinstance(errors, dict):
            raise ValueError("failed points must be a map of index to message")
        try:
            failed = np.array(sorted(int(k) for k in errors), dtype=np.int64)
        except ValueError:
            raise ValueError("failed point indices must be integers") from None
        if failed.size and (failed[0] < index or failed[-1] >= stop):
            raise ValueError(f"failed points {failed.tolist()[:5]} outside the chunk [{index}, {stop})")
        return stop, failed

    def check_range(self, index: int, count: int) -> int:
        stop = index + count
        if index < 0 or count < 1 or stop > self.points:
            raise ValueError(f"points [{index}, {stop}) outside the scan's {self.points}")
        return stop

    def unsummed(self, index: int, stop: int, failed: np.ndarray) -> np.ndarray:
        """Rows (positions in the chunk [index, stop)) a running sum leaves out:
        failed points, and points delivered before, which are summed once.
        Ask before :meth:`mark_result` records the chunk."""
        again = np.flatnonzero(self.state[index:stop] != PENDING)
        return np.union1d(failed - index, again) if again.size else failed - index

    def mark_result(self, index: int, stop: int, failed: np.ndarray, meta: dict[str, Any] | None = None,
                    on_duplicate: Callable[[int], None] | None = None) -> None:
        """Record a checked chunk; points delivered twice are counted (and
        reported through ``on_duplicate``), never double-counted."""
        meta = meta or {}
        window = self.state[index:stop]
        again = int(np.count_nonzero(window))
        if again:
            self.duplicates += again
            if on_duplicate is not None:
                on_duplicate(again)
        window[:] = RECEIVED
        if failed.size:
            self.state[failed] = FAILED
            self.failed += int(failed.size)
            room = max(0, ERRORS_KEPT - len(self.errors))
            for k, why in list(meta.get(protocol.META_ERRORS, {}).items())[:room]:
                self.errors[str(k)] = str(why)
        self.received += (stop - index) - again
        self.last_index = max(self.last_index, stop - 1)
        self.incomplete += sum(min(b, stop) - max(a, index)
                               for ranges in meta.get(protocol.META_INCOMPLETE, {}).values()
                               for a, b in ranges if a < stop and b > index)

    def mark_gap(self, index: int, count: int) -> None:
        """Points the pipeline gave up on; ones already received stay received."""
        stop = self.check_range(index, count)
        window = self.state[index:stop]
        fresh = window == PENDING
        window[fresh] = GAP
        self.gaps += int(fresh.sum())

    def end_status(self, summary: dict[str, Any] | None = None, aborted: bool = False) -> str:
        """How a scan ended for this ledger, the one rule every writer and the
        sink follow: ``aborted`` for a scan_abort; else ``complete`` only if
        every point of the scan was delivered (received, failed or declared a
        gap by the sorter), ``incomplete`` if some never came. The scan's
        points are those the sorter's scan_end counts (``points``: an EndScan
        may cut a scan short of its plan); without that count, those up to the
        last one delivered."""
        if aborted:
            return ABORTED
        points = (summary or {}).get(protocol.META_POINTS)
        if type(points) is not int or not 0 <= points <= self.points:
            points = int(np.flatnonzero(self.state).max()) + 1 if self.state.any() else 0
        return COMPLETE if not np.count_nonzero(self.state[:points] == PENDING) else INCOMPLETE

    @property
    def missing(self) -> int:
        """Points with no value: never delivered, or given up as gaps."""
        return self.points - self.received

    def describe(self) -> dict[str, Any]:
        joined = {} if self.joined_at is None else {"joined_at": self.joined_at}
        return {"points": self.points, "received": self.received, "failed": self.failed, "gaps": self.gaps,
                "missing": self.missing, "duplicates": self.duplicates, "incomplete": self.incomplete,
                **joined, "errors": dict(list(self.errors.items())[:ERRORS_KEPT])}
