"""Event formation: join the blocks of a scan's source streams by acquisition index.

Each stream delivers blocks (``index``, ``count``) in any order and of any size;
the former keeps, per stream, the contiguous *frontier* (every index below it
has arrived or has been declared missing). Every index below the lowest
frontier is a complete event, and units of work are cut from that range with
slices of the blocks (a view when one block covers the unit: no copy).

A stream that stops delivering while others go on is waited for at most
``incomplete_timeout`` seconds; then its missing indices are declared, logged,
and the events go on without it (the unit's ``missing`` meta names the stream).
A source that knows indices will never come (a detector skipped frames) says
so with a ``gap`` message (:meth:`EventFormer.declare_missing`): the same
outcome at once, without the wait.
Nothing here blocks or touches sockets: the master's loop drives it.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services import protocol
from services import codec, compression
from services.scan import ScanMeta

log = logging.getLogger("tangomesh.master.formation")

#: per-point descriptor of one array: (dtype, shape without the point axis)
ArraySpec = dict[str, tuple[np.dtype, tuple[int, ...]]]


def declared_spec(meta: ScanMeta, stream: str) -> ArraySpec | None:
    """What the scan document says a stream sends per point, if it says."""
    arrays = meta.raw.get("streams", {}).get(stream, {}).get("arrays")
    if not arrays:
        return None
    return {name: (np.dtype(a["dtype"]), tuple(a["shape"])) for name, a in arrays.items()}


@dataclass
class StreamState:
    name: str
    spec: ArraySpec | None
    advanced_at: float
    frontier: int = 0
    blocks: collections.deque = field(default_factory=collections.deque)  # contiguous, not yet taken
    early: dict[int, codec.Message] = field(default_factory=dict)  # beyond a hole
    early_missing: dict[int, int] = field(default_factory=dict)  # start -> stop declared missing beyond a hole
    missing: list[list[int]] = field(default_factory=list)  # declared ranges not yet passed by `taken`
    end: int | None = None  # announced by the source's scan_end
    nbytes: int = 0
    highest: int = 0  # one past the highest index received
    behind_since: float | None = None  # when another stream first got ahead of this one

    @property
    def point_bytes(self) -> int:
        if not self.spec:
            return 0
        return sum(dt.itemsize * math.prod(shape) for dt, shape in self.spec.values())


class EventFormer:
    """Formation state of one scan in one pipeline."""

    def __init__(self, meta: ScanMeta, streams: list[str], incomplete_timeout: float, now: float | None = None) -> None:
        if not streams:
            raise ValueError("a scan needs at least one source stream")
        now = time.monotonic() if now is None else now
        self.meta = meta
        self.scan_id = meta.scan_id
        self.points = meta.points
        self.timeout = incomplete_timeout
        self.streams = {s: StreamState(s, declared_spec(meta, s), now) for s in streams}
        self.taken = 0  # next index to cut into a unit
        self.end_requested_at: float | None = None
        self.last_data = now
        self.incomplete_points = 0
        self.formed_points = 0

    # ------------------------------------------------------------ input
    def add_block(self, msg: codec.Message, now: float | None = None) -> None:
        """Accept one data block; ValueError (counted by the caller) if it
        does not belong: unknown stream, out of range, overlap, wrong arrays."""
        state = self.streams.get(msg.stream)
        if state is None:
            raise ValueError(f"stream {msg.stream!r} is not a source of scan {self.scan_id} "
                             f"(expected {sorted(self.streams)})")
        if msg.count < 1:
            raise ValueError("empty data block")
        if msg.stop > self.points:
            raise ValueError(f"indices [{msg.index}, {msg.stop}) outside the scan's {self.points} points")
        self._check_arrays(state, msg)
        if msg.index < state.frontier:
            raise ValueError(f"indices [{msg.index}, {msg.stop}) of {msg.stream} already received "
                             f"or declared missing (frontier {state.frontier})")
        for start, other in state.early.items():
            if start < msg.stop and msg.index < other.stop:
                raise ValueError(f"indices [{msg.index}, {msg.stop}) of {msg.stream} overlap a block already received")
        for start, stop in state.early_missing.items():
            if start < msg.stop and msg.index < stop:
                raise ValueError(f"indices [{msg.index}, {msg.stop}) of {msg.stream} were declared missing")
        now = time.monotonic() if now is None else now
        self.last_data = now
        state.nbytes += msg.nbytes
        state.highest = max(state.highest, msg.stop)
        if msg.index == state.frontier:
            self._append(state, msg, now)
        else:
            state.early[msg.index] = msg
        for other in self.streams.values():  # streams this block got ahead of start waiting now
            if other.frontier < msg.stop and other.behind_since is None:
                other.behind_since = now

    def declare_missing(self, stream: str, start: int, stop: int, now: float | None = None) -> None:
        """The source says indices [start, stop) of its stream will never come
        (a detector skipped frames): the events go on without waiting for the
        incomplete timeout, marked incomplete. ValueError if the range is not
        the stream's to declare (unknown stream, outside the scan, already
        received, overlapping what arrived)."""
        state = self.streams.get(stream)
        if state is None:
            raise ValueError(f"gap of stream {stream!r}, not a source of scan {self.scan_id}")
        if not 0 <= start < stop <= self.points:
            raise ValueError(f"gap [{start}, {stop}) of {stream} outside the scan's {self.points} points")
        if start < state.frontier:
            raise ValueError(f"gap [{start}, {stop}) of {stream} below its frontier {state.frontier}: "
                             "those indices were received or declared already")
        ranges = [(a, m.stop) for a, m in state.early.items()] + list(state.early_missing.items())
        if any(a < stop and start < b for a, b in ranges):
            raise ValueError(f"gap [{start}, {stop}) of {stream} overlaps indices already received or declared")
        now = time.monotonic() if now is None else now
        self.last_data = now
        state.highest = max(state.highest, stop)
        if start == state.frontier:
            self._declare(state, start, stop, now)
        else:
            state.early_missing[start] = stop

    def stream_end(self, stream: str, count: int) -> None:
        """The source says its stream of this scan has ``count`` points."""
        state = self.streams.get(stream)
        if state is None:
            raise ValueError(f"scan_end for stream {stream!r}, not a source of scan {self.scan_id}")
        if not 0 <= count <= self.points or count < state.highest:
            raise ValueError(f"scan_end of {stream} with {count} points (scan has {self.points}, "
                             f"{state.highest} already received)")
        state.end = count

    def request_end(self, now: float | None = None) -> None:
        """EndScan: finish with what the sources deliver, without waiting for the planned points."""
        if self.end_requested_at is None:
            self.end_requested_at = time.monotonic() if now is None else now

    def _check_arrays(self, state: StreamState, msg: codec.Message) -> None:
        if state.spec is None:  # the first block of an undeclared stream fixes its arrays
            if not msg.arrays:
                raise ValueError(f"data block of {msg.stream} without arrays")
            state.spec = {n: (a.dtype, a.shape[1:]) for n, a in msg.arrays.items()}
            return
        if msg.arrays.keys() != state.spec.keys():
            raise ValueError(f"{msg.stream} sends arrays {sorted(msg.arrays)}, expected {sorted(state.spec)}")
        for name, a in msg.arrays.items():
            dtype, shape = state.spec[name]
            if a.dtype != dtype or a.shape[1:] != shape:
                raise ValueError(f"{msg.stream}/{name} is {a.dtype.str}{list(a.shape[1:])} per point, "
                                 f"expected {dtype.str}{list(shape)}")

    def _append(self, state: StreamState, msg: codec.Message, now: float) -> None:
        state.blocks.append(msg)
        self._advance(state, msg.stop, now)

    def _advance(self, s: StreamState, frontier: int, now: float) -> None:
        s.frontier = frontier
        s.advanced_at = now
        while True:
            if s.frontier in s.early:
                nxt = s.early.pop(s.frontier)
                s.blocks.append(nxt)
                s.frontier = nxt.stop
            elif s.frontier in s.early_missing:
                stop = s.early_missing.pop(s.frontier)
                self._add_missing(s, s.frontier, stop)
                s.frontier = stop
            else:
                break
        ahead = max(o.highest for o in self.streams.values())
        s.behind_since = now if s.frontier < ahead else None

    # ------------------------------------------------------------ progress
    @property
    def frontier(self) -> int:
        """Every index below is a formed event (complete or declared incomplete)."""
        return min(s.frontier for s in self.streams.values())

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.streams.values())

    def _target(self) -> int:
        """How far the events should go now: what any stream has delivered,
        and once the scan is ending, what the sources announced."""
        target = max(max(s.highest, s.end or 0) for s in self.streams.values())
        return min(target, self.points)

    def lagging(self) -> list[str]:
        """Streams holding the frontier back (the master keeps reading them when full)."""
        f = self.frontier
        return [s.name for s in self.streams.values() if s.frontier == f]

    def check_timeouts(self, now: float | None = None) -> list[str]:
        """Declare missing what a stream has failed to deliver for too long:
        ``incomplete_timeout`` after another stream got ahead of it and after
        its own last block, so a slow start or a pause of every stream is not
        a loss. Returns the warnings (the caller logs and counts them)."""
        now = time.monotonic() if now is None else now
        target = self._target()
        warnings = []
        for s in self.streams.values():
            if s.frontier >= target:
                s.behind_since = None  # caught up
                continue
            if s.end is not None and s.frontier >= s.end:
                self._declare(s, s.frontier, target, now)  # the source said it is done
                continue
            if s.behind_since is None:
                s.behind_since = now
            if now - max(s.advanced_at, s.behind_since) < self.timeout:
                continue
            hole_end = min([target, *(i for i in (*s.early, *s.early_missing) if i > s.frontier)])
            warnings.append(
                f"scan {self.scan_id}: stream {s.name} did not deliver indices [{s.frontier}, {hole_end}) "
                f"within {self.timeout:g} s; those events go on marked incomplete")
            self._declare(s, s.frontier, hole_end, now)
        return warnings

    def _declare(self, s: StreamState, start: int, stop: int, now: float) -> None:
        self._add_missing(s, start, stop)
        self._advance(s, stop, now)

    @staticmethod
    def _add_missing(s: StreamState, start: int, stop: int) -> None:
        if s.missing and s.missing[-1][1] == start:
            s.missing[-1][1] = stop
        else:
            s.missing.append([start, stop])

    def is_complete(self, now: float | None = None) -> bool:
        """Every event of the scan has been cut into units: all planned points,
        or after EndScan, everything the sources delivered (announced by their
        scan_end, or nothing new for ``incomplete_timeout``)."""
        if self.taken >= self.points:
            return True
        if self.end_requested_at is None:
            return False
        target = self._target()
        if self.taken < target or self.frontier < target:
            return False
        announced = all(s.end is not None for s in self.streams.values())
        quiet_since = max(self.end_requested_at, self.last_data)
        now = time.monotonic() if now is None else now
        return announced or now - quiet_since >= self.timeout

    # ------------------------------------------------------------ output
    def take_unit(self, max_points: int, max_bytes: int, align: int = 0) -> codec.Message | None:
        """Cut the next unit of work from the formed events, or None.

        A unit is homogeneous: a stream is present at every point or absent
        from all (``meta["missing"]``). ``align`` > 0 keeps a unit inside one
        group of ``align`` consecutive indices (affinity by ``index // align``).
        """
        a = self.taken
        b = min(self.frontier, a + max(1, max_points))
        if b <= a:
            return None
        if align > 0:
            b = min(b, (a // align + 1) * align)
        missing = []
        for s in self.streams.values():
            for start, stop in s.missing:
                if stop <= a:
                    continue
                if start <= a:
                    missing.append(s.name)
                    b = min(b, stop)
                else:
                    b = min(b, start)
                break
        present = [s for s in self.streams.values() if s.name not in missing]
        per_point = sum(s.point_bytes for s in present)
        if per_point:
            b = min(b, a + max(1, max_bytes // per_point))
        arrays: dict[str, np.ndarray] = {}
        for s in self.streams.values():
            if s.name in missing:
                s.missing = [r for r in s.missing if r[1] > b]
                continue
            for name, value in self._take(s, a, b).items():
                arrays[protocol.array_key(s.name, name)] = value
        self.taken = b
        count = b - a
        self.formed_points += count
        meta: dict[str, Any] = {}
        if missing:
            meta[protocol.META_MISSING] = sorted(missing)
            self.incomplete_points += count
        return codec.Message(codec.DATA, scan=self.scan_id, index=a, count=count, arrays=arrays, meta=meta)

    def _take(self, s: StreamState, a: int, b: int) -> dict[str, np.ndarray]:
        pieces: list[dict[str, np.ndarray]] = []
        while s.blocks:
            blk = s.blocks[0]
            lo, hi = max(a, blk.index) - blk.index, min(b, blk.stop) - blk.index
            if hi > lo:
                pieces.append({n: arr[lo:hi] for n, arr in blk.arrays.items()})
            if blk.stop <= b:
                s.blocks.popleft()
                s.nbytes -= blk.nbytes
            else:
                break
        if len(pieces) == 1:
            return pieces[0]
        return {n: compression.concatenate([p[n] for p in pieces]) for n in pieces[0]}

    def summary(self) -> dict[str, Any]:
        return {
            "scan": self.scan_id,
            "points": self.points,
            "formed": self.formed_points,
            "incomplete": self.incomplete_points,
            "frontier": {s.name: s.frontier for s in self.streams.values()},
        }
