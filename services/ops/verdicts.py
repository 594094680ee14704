"""What the consumers say of a scan: the sink's count of points and every
writer's files. A scan is lossless only if the probes saw every point *and*
the sink holds it complete *and* every writer made its files, complete, for
every pipeline: a scan a writer refused (a full MaxOpenScans, a path it may
not write) is not a success, whatever the sorter delivered.

Asking never outlasts its timeout and never raises for one consumer: a
writer or sink that does not answer is in the verdict (``errors``), so that
``tangomesh scan --json`` always has a summary to print.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from services import protocol
from services.ops.masters import describe
from services.registration import ManagerLink
from sink.component import LAVUE
from sink.queries import QUERY, QueryError, SinkClient, find_sinks

SINK_KEYS = ("status", "expected", "received", "missing", "failed")


@dataclass
class ConsumerVerdict:
    sink: dict[str, Any] | None  # the sink's info on the scan; None without a sink in the mesh
    files: list[dict[str, Any]] = field(default_factory=list)  # the writers' records of the scan's files
    missing_files: list[str] = field(default_factory=list)  # writer:pipeline pairs that wrote nothing in time
    errors: list[str] = field(default_factory=list)  # consumers that could not be asked, and why

    @property
    def ok(self) -> bool:
        sink_ok = self.sink is None or (self.sink.get("status") == "complete" and self.sink.get("missing") == 0)
        return (sink_ok and not self.missing_files and not self.errors
                and all(f.get("status") == "complete" for f in self.files))

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok,
                "sink": None if self.sink is None else {k: self.sink.get(k) for k in (*SINK_KEYS, "error")
                                                        if k in self.sink},
                "files": [{k: f.get(k) for k in ("writer", "pipeline", "path", "bytes", "status")} for f in self.files],
                "missing_files": self.missing_files, "errors": self.errors}


def writers(link: ManagerLink) -> list[str]:
    return sorted(s["name"] for s in link.lookup({"kind": protocol.Kind.WRITER}))


def wait_for_files(link: ManagerLink, scan: str, pipelines: list[str], timeout: float,
                   also: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Every writer's files of ``scan``, once each has finished every pipeline
    (or the time is up): the files, the writer:pipeline pairs still missing
    (of ``pipelines`` and, not waited for, of ``also``), and the writers that
    did not answer."""
    import tango

    deadline = time.monotonic() + timeout
    proxies, errors = {}, []
    for name in writers(link):
        proxies[name] = tango.DeviceProxy(name)
    while True:
        files, missing, waiting = [], [], False
        for name, proxy in list(proxies.items()):
            try:
                proxy.set_timeout_millis(int(1000 * min(5.0, max(0.5, deadline - time.monotonic()))))
                mine = [f for f in json.loads(proxy.ListFiles(0)) if f["scan"] == scan]
            except Exception as exc:  # noqa: BLE001 - a writer that does not answer is part of the verdict
                errors.append(f"{name}: {describe(exc)}")
                del proxies[name]
                mine = []
            files += [{**f, "writer": name} for f in mine]
            for p in (*pipelines, *(also or ())):
                if not any(f["pipeline"] == p for f in mine):
                    missing.append(f"{name}:{p}")
                    waiting = waiting or (p in pipelines and name in proxies)
        if not waiting or time.monotonic() > deadline:
            return files, missing, errors
        time.sleep(0.2)


def sink_client(link: ManagerLink) -> tuple[SinkClient, str]:
    """A query client of the first registered sink, and its Lavue address."""
    sinks = find_sinks(link)
    if not sinks:
        raise RuntimeError("no sink registered: is the mesh up?")
    endpoints = sinks[0]["endpoints"]
    return SinkClient(endpoints[QUERY]), endpoints.get(LAVUE, "").removeprefix("tcp://")


def wait_sink_complete(client: SinkClient, scan: str, timeout: float) -> dict[str, Any]:
    """The sink's info once the scan is no longer running there (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = client.info(scan)
            if info["status"] != "running" or time.monotonic() > deadline:
                return info
        except QueryError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


#: With a pipeline lost, the sink's scan never ends: how long to let the other pipelines' last points arrive.
AFTER_LOSS_S = 2.0


def consumer_verdict(link: ManagerLink, scan: str, pipelines: list[str], timeout: float,
                     failed: list[str] | None = None) -> ConsumerVerdict:
    """Ask the sink (if the mesh has one) and every writer what they made of
    ``scan``, waiting up to ``timeout`` for ``pipelines``; the ``failed``
    pipelines (lost mid-scan) are reported as found, never waited for."""
    deadline = time.monotonic() + timeout
    sink: dict[str, Any] | None = None
    if find_sinks(link):
        client, _ = sink_client(link)
        client.timeout_ms = int(1000 * min(client.timeout_ms / 1000, max(0.5, timeout)))
        try:
            sink = wait_sink_complete(client, scan, min(timeout, AFTER_LOSS_S) if failed else timeout)
        except QueryError as exc:
            sink = {"status": "absent", "error": str(exc)}
        finally:
            client.close()
    files, missing, errors = wait_for_files(link, scan, pipelines, max(0.0, deadline - time.monotonic()), failed)
    return ConsumerVerdict(sink, files, missing, errors)
