"""The sorter's per-scan logic: restore acquisition order, drop duplicates,
declare gaps, and merge consecutive results into chunks. No sockets."""

from __future__ import annotations

import time
from typing import Any

from services import codec, compression, protocol


class ScanOrder:
    """Results of one scan, delivered in index order exactly once.

    ``add`` returns what became deliverable; a result whose indices were
    already delivered (a re-dispatch race) is a duplicate, counted and dropped.
    When the next index has been awaited ``gap_timeout`` seconds since a later
    result started waiting for it (or since the scan's end became known),
    :meth:`check_gap` gives it up:
    a ``gap`` record goes downstream instead and a late result is dropped.
    """

    def __init__(self, scan_id: str, points: int, gap_timeout: float, now: float | None = None) -> None:
        self.scan_id = scan_id
        self.points = points  # planned; the master's scan_end may say fewer
        self.gap_timeout = gap_timeout
        self.next = 0
        self.pending: dict[int, codec.Message] = {}
        self.end: int | None = None
        self.waiting_since: float | None = None  # when something started waiting for `next`
        self.pending_bytes = 0
        self.delivered = 0
        self.gap_points = 0
        self.duplicates = 0
        self.failed_points = 0

    def add(self, msg: codec.Message, now: float | None = None) -> list[codec.Message]:
        """Deliverable results, in order; ValueError for a result that cannot
        belong to this scan (the caller counts it as an error)."""
        limit = self.end if self.end is not None else self.points
        if msg.count < 1 or msg.stop > limit:
            raise ValueError(f"result [{msg.index}, {msg.stop}) outside the scan's {limit} points")
        if msg.stop <= self.next or msg.index in self.pending:
            self.duplicates += msg.count
            return []
        if msg.index < self.next:
            raise ValueError(f"result [{msg.index}, {msg.stop}) straddles index {self.next}, already delivered")
        for start, other in self.pending.items():
            if start < msg.stop and msg.index < other.stop:
                raise ValueError(f"result [{msg.index}, {msg.stop}) overlaps pending [{start}, {other.stop})")
        self.pending[msg.index] = msg
        self.pending_bytes += msg.nbytes
        return self._drain(now)

    def _now(self, now: float | None) -> float:
        return time.monotonic() if now is None else now

    def _drain(self, now: float | None) -> list[codec.Message]:
        out = []
        while self.next in self.pending:
            msg = self.pending.pop(self.next)
            self.pending_bytes -= msg.nbytes
            self.next = msg.stop
            self.delivered += msg.count
            self.failed_points += len(msg.meta.get(protocol.META_ERRORS, {}))
            out.append(msg)
        if not self.pending and (self.end is None or self.next >= self.end):
            self.waiting_since = None  # nothing waits
        elif out or self.waiting_since is None:
            self.waiting_since = self._now(now)  # what is left now waits for the new `next`
        return out

    def set_end(self, points: int, now: float | None = None) -> list[codec.Message]:
        """The master dispatched every event: the scan has ``points`` indices."""
        if not 0 <= points <= self.points or points < max((m.stop for m in self.pending.values()), default=0):
            raise ValueError(f"scan_end with {points} points (planned {self.points}, results beyond it pending)")
        self.end = points
        return self._drain(now)

    def check_gap(self, now: float | None = None) -> tuple[codec.Message | None, list[codec.Message]]:
        """A gap record if the awaited index has timed out, and what it unblocks."""
        now = self._now(now)
        if self.waiting_since is None or now - self.waiting_since < self.gap_timeout:
            return None, []
        stop = min(self.pending) if self.pending else self.end
        assert stop is not None and stop > self.next
        gap = codec.Message(codec.GAP, scan=self.scan_id, index=self.next, count=stop - self.next, meta={
            "reason": f"no result within {self.gap_timeout:g} s"})
        self.gap_points += gap.count
        self.next = stop
        self.waiting_since = None
        return gap, self._drain(now)

    @property
    def finished(self) -> bool:
        return self.end is not None and self.next >= self.end

    def summary(self) -> dict[str, Any]:
        return {"scan": self.scan_id, "points": self.end if self.end is not None else self.points,
                "delivered": self.delivered, "gaps": self.gap_points, "duplicates": self.duplicates,
                "failed": self.failed_points}


def _layout(msg: codec.Message) -> tuple:
    """What chunks may be merged on: names, dtypes, per-point shapes, and the
    frame codec of results that stay compressed (services/compression.py)."""
    return tuple((n, a.dtype.str, a.shape[1:], getattr(a, "codec", None)) for n, a in msg.arrays.items())


class Chunker:
    """Merges consecutive in-order results of one scan into chunks of at most
    ``max_points``, flushed at that size or ``max_age`` seconds after the
    first result in it, whichever comes first. Results of a different array
    layout start a new chunk."""

    def __init__(self, max_points: int, max_age: float) -> None:
        self.max_points = max_points
        self.max_age = max_age
        self.parts: list[codec.Message] = []
        self.points = 0
        self.since = 0.0

    def add(self, msg: codec.Message, now: float) -> list[codec.Message]:
        out = []
        if self.parts and (_layout(msg) != _layout(self.parts[0]) or self.points + msg.count > self.max_points):
            out.append(self.flush())
        if not self.parts:
            self.since = now
        self.parts.append(msg)
        self.points += msg.count
        if self.points >= self.max_points:
            out.append(self.flush())
        return out

    def due(self, now: float) -> bool:
        return bool(self.parts) and now - self.since >= self.max_age

    def flush(self) -> codec.Message:
        parts, self.parts, self.points = self.parts, [], 0
        first = parts[0]
        if len(parts) == 1:
            return first
        arrays = {n: compression.concatenate([p.arrays[n] for p in parts]) for n in first.arrays}
        errors: dict[str, str] = {}
        incomplete: dict[str, list[list[int]]] = {}
        for p in parts:
            errors.update(p.meta.get(protocol.META_ERRORS, {}))
            protocol.merge_incomplete(incomplete, p.meta.get(protocol.META_INCOMPLETE, {}))
        meta: dict[str, Any] = {}
        if errors:
            meta[protocol.META_ERRORS] = errors
        if incomplete:
            meta[protocol.META_INCOMPLETE] = incomplete
        count = sum(p.count for p in parts)
        return codec.Message(codec.RESULT, first.scan, first.stream, first.index, count, arrays, meta)
