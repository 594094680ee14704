"""Who is in the mesh: registrations with leases, Tango-free.

The TopologyManager device is a thin shell over :class:`Registry`; everything
about leases, lookups and change notification lives here so that it is tested
without a Tango database.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from services.registration import UnknownService
from services.schema import validate


@dataclass(slots=True)
class ServiceRecord:
    name: str
    kind: str
    pipeline: str
    server: str
    host: str
    pid: int
    endpoints: dict[str, str]
    capabilities: dict[str, Any]
    registered_at: float
    last_seen: float
    pinned: bool = False
    curve_key: str = ""  # CurveZMQ public key (Z85); a restart registers a new one, replacing this

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pipeline": self.pipeline,
            "server": self.server,
            "host": self.host,
            "pid": self.pid,
            "endpoints": dict(self.endpoints),
            "capabilities": dict(self.capabilities),
            "registered_at": self.registered_at,
            "last_seen": self.last_seen,
            "curve_key": self.curve_key,
        }


@dataclass
class Registry:
    """Registrations keyed by device name, each alive while its lease is renewed.

    ``on_change`` is called (outside the lock) with the new snapshot after every
    change: join, leave, expiry, or a re-registration with different facts.
    """

    lease_seconds: float  # the manager's terms: TopologyConfig (component.py) holds their defaults
    heartbeat_seconds: float
    clock: Callable[[], float] = time.time
    on_change: Callable[[list[dict[str, Any]]], None] | None = None
    _records: dict[str, ServiceRecord] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def register(self, info: dict[str, Any], pinned: bool = False) -> dict[str, Any]:
        """Add or refresh a service; returns its lease terms."""
        validate("registration", info)
        now = self.clock()
        record = ServiceRecord(
            name=info["name"].lower(),
            kind=info["kind"],
            pipeline=info.get("pipeline", ""),
            server=info.get("server", ""),
            host=info["host"],
            pid=info["pid"],
            endpoints=dict(info.get("endpoints", {})),
            capabilities=dict(info.get("capabilities", {})),
            registered_at=now,
            last_seen=now,
            pinned=pinned,
            curve_key=info.get("curve_key", ""),
        )
        with self._lock:
            old = self._records.get(record.name)
            if old is not None and _same_facts(old, record):
                record.registered_at = old.registered_at
                changed = False
            else:
                changed = True
            self._records[record.name] = record
        if changed:
            self._notify()
        return self.lease_terms(record.name)

    def lease_terms(self, name: str) -> dict[str, Any]:
        return {"name": name.lower(), "lease_s": self.lease_seconds, "heartbeat_s": self.heartbeat_seconds}

    def heartbeat(self, name: str) -> dict[str, Any]:
        """Renew the lease; UnknownService tells the caller to register again."""
        key = name.lower()
        with self._lock:
            record = self._records.get(key)
            if record is None:
                raise UnknownService(name)
            record.last_seen = self.clock()
        return self.lease_terms(key)

    def deregister(self, name: str) -> None:
        with self._lock:
            if self._records.pop(name.lower(), None) is None:
                raise UnknownService(name)
        self._notify()

    def expire(self) -> list[str]:
        """Drop every service whose lease ran out; returns their names."""
        deadline = self.clock() - self.lease_seconds
        with self._lock:
            gone = [n for n, r in self._records.items() if not r.pinned and r.last_seen < deadline]
            for name in gone:
                del self._records[name]
        if gone:
            self._notify()
        return gone

    def lookup(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        validate("lookup", query)
        wanted = {k: (v.lower() if k == "name" else v) for k, v in query.items()}
        return [r for r in self.snapshot() if all(r[k] == v for k, v in wanted.items())]

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._records[n].to_json() for n in sorted(self._records)]

    def __len__(self) -> int:
        return len(self._records)

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(self.snapshot())


def _same_facts(a: ServiceRecord, b: ServiceRecord) -> bool:
    keys = ("kind", "pipeline", "server", "host", "pid", "endpoints", "capabilities", "curve_key")
    return all(getattr(a, k) == getattr(b, k) for k in keys)
