"""The state directory and the Tango database the CLI works against.

Without a reachable ``TANGO_HOST``, tangomesh runs PyTango's sqlite DataBaseds
(the ``pytango-db`` package) on a loopback port under ``$TANGOMESH_HOME``
(default ``./.tangomesh``). The port is remembered, so a ``TANGO_HOST`` exported
from ``tangomesh env`` stays valid across restarts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DB_START_TIMEOUT = 30.0


def home() -> Path:
    path = Path(os.environ.get("TANGOMESH_HOME", ".tangomesh")).resolve()
    for sub in ("logs", "run"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def bin_dir() -> Path:
    """Where this installation's console scripts are (Starter's StartDsPath)."""
    return Path(sys.executable).parent


def executable(name: str) -> str:
    candidate = bin_dir() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (looked in {bin_dir()} and PATH)")
    return found


def database_answers(tango_host: str, timeout: float = 2.0) -> bool:
    """True when a Tango database answers at host:port."""
    host, _, port = tango_host.partition(":")
    if not port.isdigit():
        return False
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError:
        return False
    import tango

    try:
        tango.Database(host, int(port)).get_info()
        return True
    except tango.DevFailed:
        return False


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def process_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        return []


def terminate(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; True if the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return not pid_alive(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def spawn(argv: list[str], log_file: Path, env: dict[str, str] | None = None) -> int:
    """Start a detached process (own session, survives the CLI) logging to a file."""
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, close_fds=True,
        )
    return proc.pid


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def port_free(port: int, address: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False


@dataclass
class EmbeddedDatabase:
    """The sqlite-backed DataBaseds of one state directory, listening on
    ``address`` (loopback by default: a laptop's mesh; an address the other
    hosts reach for a mesh across hosts)."""

    root: Path
    address: str = "127.0.0.1"

    @property
    def pid_file(self) -> Path:
        return self.root / "run" / "databaseds.pid"

    @property
    def host_file(self) -> Path:
        return self.root / "tango_host"

    @property
    def db_file(self) -> Path:
        return self.root / "tango_database.db"

    def tango_host(self) -> str | None:
        return self.host_file.read_text().strip() if self.host_file.exists() else None

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and any("PyDatabaseds" in p for p in process_cmdline(pid)) else None

    def running(self) -> bool:
        host = self.tango_host()
        return self.pid() is not None and host is not None and database_answers(host)

    def start(self) -> str:
        """Start it unless it runs; return its TANGO_HOST."""
        if self.running():
            return self.tango_host()  # type: ignore[return-value]
        previous = self.tango_host()
        port = int(previous.rpartition(":")[2]) if previous else 0
        if not port or not port_free(port, self.address):
            port = free_port(self.address)
        tango_host = f"{self.address}:{port}"
        env = dict(os.environ, PYTANGO_DATABASE_NAME=str(self.db_file), TANGO_HOST=tango_host)
        pid = spawn(
            [executable("PyDatabaseds"), "--host", self.address, "--port", str(port), "2"],
            self.root / "logs" / "databaseds.log",
            env,
        )
        self.pid_file.write_text(str(pid))
        self.host_file.write_text(tango_host + "\n")
        deadline = time.monotonic() + DB_START_TIMEOUT
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise RuntimeError(f"the embedded Tango database exited; see {self.root / 'logs' / 'databaseds.log'}")
            if database_answers(tango_host, timeout=0.5):
                return tango_host
            time.sleep(0.1)
        terminate(pid)
        raise RuntimeError(f"the embedded Tango database did not answer within {DB_START_TIMEOUT:.0f} s")

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        terminate(pid)
        self.pid_file.unlink(missing_ok=True)
        return True


def resolve_tango_host(root: Path, start: bool = True) -> tuple[str, bool]:
    """The database every command uses: a reachable ``TANGO_HOST`` (the facility
    database), else the embedded one (started if ``start``). Returns the host and
    whether it is the embedded one, and exports it in ``os.environ``."""
    external = os.environ.get("TANGO_HOST", "")
    embedded = EmbeddedDatabase(root)
    if external and external != embedded.tango_host():
        if database_answers(external):
            return external, False
        print(f"tangomesh: TANGO_HOST={external} does not answer: using the embedded database of {root}",
              file=sys.stderr)
    if start:
        tango_host = embedded.start()
    else:
        tango_host = embedded.tango_host() or ""
    os.environ["TANGO_HOST"] = tango_host
    return tango_host, True
