"""What the consumers say of a scan: the sink's count of points and every
writer's files. A scan is lossless only if the probes saw every point *and*
the sink holds it complete *and* every writer made its files, complete, for
every pipeline: a scan a writer refused (a full MaxOpenScans, a path it may
not write) is not a success, whatever the sorter delivered.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from services import protocol
from services.registration import ManagerLink
from sink.component import LAVUE
from sink.queries import QUERY, QueryError, SinkClient, find_sinks

SINK_KEYS = ("status", "expected", "received", "missing", "failed")


@dataclass
class ConsumerVerdict:
    sink: dict[str, Any] | None  # the sink's info on the scan; None without a sink in the mesh
    files: list[dict[str, Any]] = field(default_factory=list)  # the writers' records of the scan's files
    missing_files: list[str] = field(default_factory=list)  # writer:pipeline pairs that wrote nothing in time

    @property
    def ok(self) -> bool:
        sink_ok = self.sink is None or (self.sink.get("status") == "complete" and self.sink.get("missing") == 0)
        return sink_ok and not self.missing_files and all(f.get("status") == "complete" for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok,
                "sink": None if self.sink is None else {k: self.sink.get(k) for k in (*SINK_KEYS, "error")
                                                        if k in self.sink},
                "files": [{k: f.get(k) for k in ("writer", "pipeline", "path", "bytes", "status")} for f in self.files],
                "missing_files": self.missing_files}


def writers(link: ManagerLink) -> list[str]:
    return sorted(s["name"] for s in link.lookup({"kind": protocol.Kind.WRITER}))


def wait_for_files(link: ManagerLink, scan: str, pipelines: list[str], timeout: float
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    """Every writer's files of ``scan``, once each has finished every pipeline
    (or the time is up: the pairs still missing are returned)."""
    import tango

    proxies = {}
    for name in writers(link):
        proxies[name] = tango.DeviceProxy(name)
        proxies[name].set_timeout_millis(5000)
    deadline = time.monotonic() + timeout
    while True:
        files, missing = [], []
        for name, proxy in proxies.items():
            mine = [f for f in json.loads(proxy.ListFiles(0)) if f["scan"] == scan]
            files += [{**f, "writer": name} for f in mine]
            missing += [f"{name}:{p}" for p in pipelines if not any(f["pipeline"] == p for f in mine)]
        if not missing or time.monotonic() > deadline:
            return files, missing
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


def consumer_verdict(link: ManagerLink, scan: str, pipelines: list[str], timeout: float) -> ConsumerVerdict:
    """Ask the sink (if the mesh has one) and every writer what they made of ``scan``."""
    deadline = time.monotonic() + timeout
    sink: dict[str, Any] | None = None
    if find_sinks(link):
        client, _ = sink_client(link)
        try:
            sink = wait_sink_complete(client, scan, timeout)
        except QueryError as exc:
            sink = {"status": "absent", "error": str(exc)}
        finally:
            client.close()
    files, missing = wait_for_files(link, scan, pipelines, max(0.0, deadline - time.monotonic()))
    return ConsumerVerdict(sink, files, missing)
