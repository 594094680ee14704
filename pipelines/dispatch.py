"""Credit-based fan-out with acknowledgement and re-dispatch (the master's bookkeeping).

A worker is known by its DEALER identity; it holds ``credit`` (units it has
asked for and not yet received). A unit stays *in flight* from dispatch until
the sorter acknowledges its indices; when its worker disappears (heartbeat
silence, or the ROUTER cannot route to it) the unit goes back to the front of
the queue for another worker. Affinity: with ``group`` > 0 every index of one
group ``index // group`` goes to the same worker while it lives; workers of
role ``copy_to`` receive a copy of every unit besides (never acknowledged, never
re-dispatched). Pure logic, no sockets: unit-tested on its own.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from services import codec

UnitKey = tuple[str, int]  # (scan id, first index)


@dataclass
class WorkerState:
    identity: bytes
    name: str
    role: str
    last_seen: float
    credit: int = 0
    in_flight: set[UnitKey] = field(default_factory=set)
    units: int = 0
    points: int = 0


@dataclass
class InFlight:
    unit: codec.Message
    worker: bytes | None  # None: waiting to be dispatched again
    sent_at: float = 0.0
    attempts: int = 0


@dataclass(frozen=True)
class Affinity:
    group: int = 0  # indices i // group go to one worker
    copy_to: str = ""  # role of workers that get a copy of every unit

    @classmethod
    def from_json(cls, obj: object) -> "Affinity":
        """From a property or the scan's analysis settings; ValueError if malformed."""
        if obj in (None, "", {}):
            return cls()
        if not isinstance(obj, dict) or set(obj) - {"group", "copy_to"}:
            raise ValueError(f"affinity must be an object with 'group' and/or 'copy_to', not {obj!r}")
        group, copy_to = obj.get("group", 0), obj.get("copy_to", "")
        if type(group) is not int or group < 0 or not isinstance(copy_to, str):
            raise ValueError(f"affinity group must be an integer >= 0 and copy_to a role name: {obj!r}")
        return cls(group, copy_to)


class Dispatcher:
    def __init__(self, worker_timeout: float) -> None:
        self.worker_timeout = worker_timeout
        self.workers: dict[bytes, WorkerState] = {}
        self.in_flight: dict[UnitKey, InFlight] = {}
        self.retry: collections.deque[UnitKey] = collections.deque()
        self.group_owner: dict[tuple[str, int], bytes] = {}
        self.in_flight_bytes = 0
        self.redispatched = 0
        self._rr = itertools.count()

    # ------------------------------------------------------------ workers
    def seen(self, identity: bytes, name: str, role: str, credit: int, now: float,
             open_units: int | None = None) -> bool:
        """A credit or heartbeat from a worker; True if the worker is new. A new
        worker (or one given up earlier, heard again) starts from the credit it
        says it holds open; a known one adds the increment (its ``open_units``
        lags the units already on their way to it)."""
        w = self.workers.get(identity)
        new = w is None
        if new:
            w = self.workers[identity] = WorkerState(identity, name, role, now)
            w.credit = credit if open_units is None else max(credit, open_units)
        else:
            w.credit += credit
        w.last_seen = now
        return new

    def expire(self, now: float) -> list[WorkerState]:
        """Forget workers silent for longer than the timeout; their units wait for others."""
        gone = [w for w in self.workers.values() if now - w.last_seen > self.worker_timeout]
        for w in gone:
            self.remove(w.identity)
        return gone

    def remove(self, identity: bytes) -> WorkerState | None:
        w = self.workers.pop(identity, None)
        if w is None:
            return None
        lost = sorted(w.in_flight, key=lambda k: k[1])
        for key in reversed(lost):  # oldest first at the front of the queue
            entry = self.in_flight.get(key)
            if entry is not None and entry.worker == identity:
                entry.worker = None
                self.retry.appendleft(key)
        self.redispatched += len(lost)
        for g, owner in list(self.group_owner.items()):
            if owner == identity:
                del self.group_owner[g]
        return w

    def processing_workers(self, copy_role: str = "") -> list[WorkerState]:
        return [w for w in self.workers.values() if not copy_role or w.role != copy_role]

    # ------------------------------------------------------------ choosing
    def choose(self, unit: codec.Message, affinity: Affinity) -> list[bytes] | None:
        """Workers to send ``unit`` to now (the first one processes it for
        real, the rest are copies), or None if it has to wait for credit."""
        eligible = [w for w in self.workers.values()
                    if not affinity.copy_to or w.role != affinity.copy_to]
        target: WorkerState | None = None
        if affinity.group:
            owner = self.group_owner.get((unit.scan, unit.index // affinity.group))
            if owner is not None and owner in self.workers:
                target = self.workers[owner] if self.workers[owner].credit > 0 else None
                if target is None:
                    return None
        if target is None:
            ready = [w for w in eligible if w.credit > 0]
            if not ready:
                return None
            best = max(w.credit for w in ready)
            ready = [w for w in ready if w.credit == best]
            target = ready[next(self._rr) % len(ready)]
        chosen = [target.identity]
        if affinity.copy_to:
            copies = [w for w in self.workers.values() if w.role == affinity.copy_to]
            if any(w.credit <= 0 for w in copies):
                return None  # a copy is part of the pipeline: wait for it too
            chosen += [w.identity for w in copies]
        return chosen

    def sent(self, unit: codec.Message, identities: list[bytes], affinity: Affinity, now: float) -> None:
        """Record a dispatch made with :meth:`choose`."""
        key = (unit.scan, unit.index)
        owner = identities[0]
        entry = self.in_flight.get(key)
        if entry is None:
            entry = self.in_flight[key] = InFlight(unit, owner)
            self.in_flight_bytes += unit.nbytes
        entry.worker, entry.sent_at = owner, now
        entry.attempts += 1
        for identity in identities:
            w = self.workers[identity]
            w.credit -= 1
            w.units += 1
            w.points += unit.count
        self.workers[owner].in_flight.add(key)
        if affinity.group:
            self.group_owner[(unit.scan, unit.index // affinity.group)] = owner

    def requeue_scan(self, scan: str) -> int:
        """Every unacknowledged unit of ``scan`` waits to be dispatched again,
        oldest first (its sorter restarted: what it held is gone); the number
        queued. Workers keep the credit they spent: a result still coming back
        from them is a duplicate the new sorter drops."""
        keys = sorted((k for k, e in self.in_flight.items() if k[0] == scan and e.worker is not None),
                      key=lambda k: k[1])
        for key in reversed(keys):
            entry = self.in_flight[key]
            w = self.workers.get(entry.worker) if entry.worker is not None else None
            if w is not None:
                w.in_flight.discard(key)
            entry.worker = None
            self.retry.appendleft(key)
        self.redispatched += len(keys)
        return len(keys)

    def next_retry(self) -> InFlight | None:
        """The oldest unit whose worker vanished, still unacknowledged."""
        while self.retry:
            entry = self.in_flight.get(self.retry[0])
            if entry is not None and entry.worker is None:
                return entry
            self.retry.popleft()
        return None

    def pop_retry(self) -> None:
        self.retry.popleft()

    # ------------------------------------------------------------ acknowledgement
    def ack(self, scan: str, ranges: list[tuple[int, int]]) -> int:
        """Forget units whose first index lies in an acknowledged range; the
        number forgotten (0 for a duplicate ack)."""
        freed = 0
        for key in [k for k in self.in_flight if k[0] == scan and any(a <= k[1] < b for a, b in ranges)]:
            entry = self.in_flight.pop(key)
            self.in_flight_bytes -= entry.unit.nbytes
            if entry.worker is not None and entry.worker in self.workers:
                self.workers[entry.worker].in_flight.discard(key)
            freed += 1
        return freed

    def drop_scan(self, scan: str) -> int:
        """An aborted scan: forget its units."""
        keys = [k for k in self.in_flight if k[0] == scan]
        for key in keys:
            entry = self.in_flight.pop(key)
            self.in_flight_bytes -= entry.unit.nbytes
            for w in self.workers.values():
                w.in_flight.discard(key)
        for g in [g for g in self.group_owner if g[0] == scan]:
            del self.group_owner[g]
        return len(keys)

    def outstanding(self, scan: str) -> int:
        return sum(1 for k in self.in_flight if k[0] == scan)

    def end_scan(self, scan: str) -> None:
        for g in [g for g in self.group_owner if g[0] == scan]:
            del self.group_owner[g]
