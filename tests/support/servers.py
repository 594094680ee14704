"""Real device-server processes for the integration tests: declared in the
Tango database, started from the installed console scripts, stopped at the end."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from services.ops.home import executable, pid_alive, spawn, terminate
from support.waiting import wait_for


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
              wait_devices: bool = True, argv: list[str] | None = None) -> ServerHandle:
        """``argv``: how to run the server (default: its console script with the instance)."""
        import tango

        db = tango.Database()
        for cls, devices in classes.items():
            for device, props in devices.items():
                info = tango.DbDevInfo()
                info.name, info._class, info.server = device, cls, server
                db.add_device(info)
                if props:
                    db.put_device_property(device, {k: [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
                                                    for k, v in props.items()})  # a list: one value per line
        script, instance = server.split("/")
        log = self.log_dir / f"{server.replace('/', '_')}.log"
        handle = ServerHandle(server, spawn(argv or [executable(script), instance], log), log)
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


def topology_props(heartbeat: float = 0.5, lease: float = 2.0) -> dict[str, object]:
    return {"HeartbeatSeconds": heartbeat, "LeaseSeconds": lease}
