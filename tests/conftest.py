"""Fixtures for tests against real parts: the embedded Tango database and real
device-server processes started from the installed console scripts."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from services.ops.home import EmbeddedDatabase, executable, pid_alive, spawn, terminate


def scan_geometry(kind: str, rows: int = 5, cols: int = 7) -> dict:
    """A small scan geometry: ``raster``, ``snake`` (rows x cols) or ``line``."""
    if kind == "line":
        return {"type": "line", "axes": [{"name": "samx", "units": "mm", "start": 1.0, "stop": 2.0,
                                          "points": rows * cols}]}
    return {"type": "raster", "snake": kind == "snake", "axes": [
        {"name": "samx", "units": "um", "start": -3.0, "stop": 3.0, "points": cols},
        {"name": "samy", "units": "um", "start": 10.0, "stop": 12.0, "points": rows}]}


def map_by_hand(kind: str, values, rows: int, cols: int):
    """Where a beamline scientist expects each point of :func:`scan_geometry`,
    written out point by point rather than with the code under test."""
    import numpy as np

    values = np.asarray(values)
    if kind == "line":
        return values.copy()
    out = np.empty((rows, cols, *values.shape[1:]), values.dtype)
    for i, v in enumerate(values):
        r, c = divmod(i, cols)
        if kind == "snake" and r % 2:
            c = cols - 1 - c
        out[r, c] = v
    return out


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll until predicate() is truthy; its value, or a failure naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - the device may not be up yet
            value, last = None, exc
        else:
            last = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


@pytest.fixture(scope="session")
def tango_db(tmp_path_factory) -> Iterator[str]:
    """The embedded sqlite Tango database, started by tangomesh's own code."""
    root = tmp_path_factory.mktemp("tangomesh-home")
    for sub in ("logs", "run"):
        (root / sub).mkdir()
    db = EmbeddedDatabase(root)
    tango_host = db.start()
    os.environ["TANGO_HOST"] = tango_host
    os.environ["TANGOMESH_HOME"] = str(root)
    yield tango_host
    db.stop()


@dataclass
class ServerHandle:
    name: str
    pid: int
    log: Path

    def kill(self, hard: bool = True) -> None:
        import signal

        os.kill(self.pid, signal.SIGKILL if hard else signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pid_alive(self.pid) and time.monotonic() < deadline:
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
        assert not pid_alive(self.pid), f"{self.name} survived"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ServerPool:
    """Declares servers in the database and runs their console scripts; stops them all at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ServerHandle] = []

    def start(self, server: str, classes: dict[str, dict[str, dict[str, object]]],
              wait_devices: bool = True) -> ServerHandle:
        import tango

        db = tango.Database()
        for cls, devices in classes.items():
            for device, props in devices.items():
                info = tango.DbDevInfo()
                info.name, info._class, info.server = device, cls, server
                db.add_device(info)
                if props:
                    db.put_device_property(device, {k: [str(v)] for k, v in props.items()})
        script, instance = server.split("/")
        log = self.log_dir / f"{server.replace('/', '_')}.log"
        handle = ServerHandle(server, spawn([executable(script), instance], log), log)
        self.started.append(handle)
        if wait_devices:
            for devices in classes.values():
                for device in devices:
                    wait_for(lambda d=device: tango.DeviceProxy(d).ping() >= 0, 30,
                             f"{device} to answer\n{handle.log_text()}")
        return handle

    def stop_all(self) -> None:
        for handle in self.started:
            if pid_alive(handle.pid):
                terminate(handle.pid, timeout=5)
        self.started.clear()


@pytest.fixture
def tango_server(tango_db, tmp_path) -> Iterator[Callable[..., ServerHandle]]:
    """start(server, {class: {device: {property: value}}}) declares a server in
    the database and runs its console script; every server is stopped at teardown."""
    pool = ServerPool(tmp_path)
    yield pool.start
    pool.stop_all()


def topology_props(heartbeat: float = 0.5, lease: float = 2.0) -> dict[str, object]:
    return {"HeartbeatSeconds": heartbeat, "LeaseSeconds": lease}
