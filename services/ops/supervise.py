"""The embedded mesh's supervisor process, and how the CLI talks to it.

One detached process per ``$TANGOMESH_HOME`` (``python -m services.ops.supervise
HOME``), started by the first server start of ``tangomesh up`` (or ``scale``)
and stopped by ``tangomesh down`` before the servers. It is the parent of the
servers it starts, so it knows how they ended (exit status or signal), and it
restarts those that exit unexpectedly by the policy of ``services/ops/supervisor.py``.

Files under ``run/``:

- ``supervisor.pid``: its pid; ``supervisor.lock``: held while it runs (one per home);
- ``supervisor.sock``: a Unix socket taking one JSON request per connection:
  ``{"op": "start", "server": S, "env": {...}}`` (start S as a child, reply
  ``{"pid": n}``), ``{"op": "forget", "server": S}`` (S is about to be stopped on
  purpose: never restart it, remove its pid file, reply ``{"pid": n|null}``),
  ``{"op": "ping"}``;
- ``supervisor.json``: per server its pid, restarts, last exit, last restart
  time and quick failures in a row, rewritten whenever something changes
  (``tangomesh status`` reads it). It outlives a supervisor that is killed: the
  next one (``tangomesh up`` starts it) restores every record from it before
  adopting, so the counts carry on; only a supervisor stopped on purpose
  (``tangomesh down``) removes it;
- ``<Server>_<instance>.pid``: what should run. Servers with a pid file that
  the supervisor did not start (it was not running then) are adopted: restarted
  as well when they exit, but their exit status is lost (not our child).

Without a supervisor (it failed to start, or the socket path is too long) the
CLI starts servers itself, as before, and they are not restarted.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from services.ops.home import executable, pid_alive, process_cmdline, spawn, terminate
from services.ops.supervisor import Exit, Supervisor

log = logging.getLogger("tangomesh.supervisor")

MODULE = "services.ops.supervise"
TICK_S = 0.25
REQUEST_TIMEOUT_S = 10.0
START_TIMEOUT_S = 15.0
NOT_SERVERS = {"databaseds", "Starter", "supervisor"}  # pid files in run/ that are not mesh servers
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


def pid_path(root: Path) -> Path:
    return root / "run" / "supervisor.pid"


def socket_path(root: Path) -> Path:
    return root / "run" / "supervisor.sock"


def state_path(root: Path) -> Path:
    return root / "run" / "supervisor.json"


def server_pid_file(root: Path, server: str) -> Path:
    return root / "run" / f"{server.replace('/', '_')}.pid"


def server_argv(server: str) -> list[str]:
    name, _, instance = server.partition("/")
    return [executable(name), instance]


def runs_server(pid: int, server: str) -> bool:
    """The pid is alive and is that server's executable (not a reused pid)."""
    return pid_alive(pid) and any(server.partition("/")[0] in p for p in process_cmdline(pid)[:3])


# --------------------------------------------------------------------------- the process


class SupervisorProcess:
    """The supervisor's process: a socket for the CLI, a tick loop, the state file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.children: set[int] = set()
        self.envs: dict[str, dict[str, str]] = {}
        self.stopping = threading.Event()
        self.supervisor = Supervisor(self._spawn, self._exited, time.monotonic, time.time)

    def _spawn(self, server: str) -> int:
        env = self.envs.get(server, dict(os.environ))
        pid = spawn(server_argv(server), self.root / "logs" / f"{server.replace('/', '_')}.log", env)
        self.children.add(pid)
        server_pid_file(self.root, server).write_text(str(pid))
        return pid

    def _exited(self, server: str, pid: int) -> Exit | None:
        if pid in self.children:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.children.discard(pid)
                return Exit()
            if done == 0:
                return None
            self.children.discard(pid)
            return Exit.from_wait_status(status)
        return None if runs_server(pid, server) else Exit()

    def _reap_forgotten(self) -> None:
        """Collect the children stopped on purpose, so that none stays a zombie."""
        watched = {r.pid for r in self.supervisor.records.values()}
        for pid in list(self.children - watched):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def _restore(self) -> None:
        """Carry on from the state file a killed supervisor left: each server
        that still has a pid file (is meant to run) gets its record back."""
        try:
            saved = json.loads(state_path(self.root).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("previous state %s unreadable (%s): restart counts start from 0", state_path(self.root), exc)
            return
        servers = saved.get("servers") if isinstance(saved, dict) else None
        for server, record in (servers if isinstance(servers, dict) else {}).items():
            path = server_pid_file(self.root, str(server))
            if not isinstance(record, dict) or not path.exists():
                continue  # forgotten (stopped on purpose) since
            try:
                pid: int | None = int(path.read_text())
            except (OSError, ValueError):
                pid = None
            running = pid is not None and runs_server(pid, server)
            self.supervisor.restore(server, pid, record, running)
            log.info("%s: carried on from the previous supervisor (%s, %s restarts)", server,
                     f"running, pid {pid}" if running else "not running", record.get("restarts"))

    def _adopt(self) -> None:
        """Watch the servers that have a pid file (started while no supervisor ran)."""
        for path in (self.root / "run").glob("*.pid"):
            stem = path.stem
            if stem in NOT_SERVERS or "_" not in stem:
                continue
            server = "/".join(stem.split("_", 1))
            try:
                pid = int(path.read_text())
            except (OSError, ValueError):
                continue
            if server not in self.supervisor.records:
                self.supervisor.watch(server, pid)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op, server = request.get("op"), str(request.get("server", ""))
        with self.lock:
            if op == "ping":
                return {"pid": os.getpid()}
            if op == "start":
                record = self.supervisor.records.get(server)
                if record and record.pid and runs_server(record.pid, server):
                    return {"pid": record.pid}  # it runs (maybe just restarted, still starting): not twice
                self.envs[server] = {str(k): str(v) for k, v in request.get("env", os.environ).items()}
                pid = self.supervisor.start(server)
                log.info("%s started (pid %d)", server, pid)
                self._write_state()
                return {"pid": pid}
            if op == "forget":
                record = self.supervisor.records.get(server)
                self.supervisor.forget(server)
                server_pid_file(self.root, server).unlink(missing_ok=True)
                self._write_state()
                log.info("%s stopped on purpose: not supervised any more", server)
                return {"pid": record.pid if record else None}
        return {"error": f"unknown request {op!r}"}

    def _write_state(self) -> None:
        path = state_path(self.root)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "updated": time.time(),
                                   "servers": self.supervisor.state()}, indent=1))
        os.replace(tmp, path)

    def _serve(self, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(REQUEST_TIMEOUT_S)
                    request = json.loads(_read_line(conn))
                    reply = self.handle(request if isinstance(request, dict) else {})
                except Exception as exc:  # one bad request must not stop the supervisor
                    log.exception("request failed")
                    reply = {"error": str(exc)}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def run(self) -> int:
        lock = open(self.root / "run" / "supervisor.lock", "w")
        try:  # one supervisor per home, even when two `tangomesh up` race
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("another supervisor runs for %s", self.root)
            return 0
        sock = socket_path(self.root)
        sock.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock))
        listener.listen(16)
        pid_path(self.root).write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        threading.Thread(target=self._serve, args=(listener,), name="requests", daemon=True).start()
        log.info("supervising the servers of %s (pid %d)", self.root, os.getpid())
        with self.lock:
            self._restore()
            self._adopt()
            self._write_state()
        while not self.stopping.wait(TICK_S):
            with self.lock:
                self._adopt()
                self._reap_forgotten()
                if self.supervisor.tick():
                    self._write_state()
        listener.close()
        sock.unlink(missing_ok=True)
        state_path(self.root).unlink(missing_ok=True)
        pid_path(self.root).unlink(missing_ok=True)
        log.info("stopped; the servers keep running")
        return 0


def _read_line(conn: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError("request too long")
    return data


# --------------------------------------------------------------------------- the CLI's side


def running_pid(root: Path) -> int | None:
    try:
        pid = int(pid_path(root).read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) and MODULE in process_cmdline(pid) else None


def request(root: Path, message: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any] | None:
    """Ask this home's supervisor; None when none answers."""
    path = socket_path(root)
    if not path.exists() or len(str(path)) > MAX_SOCKET_PATH:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            conn.sendall(json.dumps(message).encode() + b"\n")
            reply = json.loads(_read_line(conn) or b"null")
    except (OSError, ValueError):
        return None
    if isinstance(reply, dict) and "error" in reply:
        raise RuntimeError(f"supervisor: {reply['error']}")
    return reply if isinstance(reply, dict) else None


def ensure_running(root: Path) -> int | None:
    """Start this home's supervisor unless it runs; its pid, or None if it cannot run here."""
    pid = running_pid(root)
    if pid is not None and request(root, {"op": "ping"}) is not None:
        return pid
    if len(str(socket_path(root))) > MAX_SOCKET_PATH:
        log.warning("%s is too long a path for a Unix socket: servers are not supervised", socket_path(root))
        return None
    if pid is not None:  # alive but deaf: replace it
        terminate(pid)
    # -P: do not put the current directory first on sys.path (PYTHONPATH still counts)
    pid = spawn([sys.executable, "-P", "-m", MODULE, str(root)], root / "logs" / "supervisor.log", dict(os.environ))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        answer = request(root, {"op": "ping"}, timeout=1.0)
        if answer is not None:
            return int(answer["pid"])  # ours, or one another `tangomesh up` started at the same time
        if not pid_alive(pid) and running_pid(root) is None:
            raise RuntimeError(f"the supervisor exited; see {root / 'logs' / 'supervisor.log'}")
        time.sleep(0.1)
    terminate(pid)
    raise RuntimeError(f"the supervisor did not answer within {START_TIMEOUT_S:.0f} s; "
                       f"see {root / 'logs' / 'supervisor.log'}")


def stop(root: Path) -> bool:
    """Stop this home's supervisor (the servers keep running); True if one ran.
    What a killed one left is removed too: stopping on purpose starts the counts afresh."""
    pid = running_pid(root)
    if pid is not None:
        terminate(pid)
    for path in (pid_path(root), socket_path(root), state_path(root)):
        path.unlink(missing_ok=True)
    return pid is not None


def left_behind(root: Path) -> bool:
    """A state file but no supervisor: it was killed, nothing restarts the
    servers until ``tangomesh up`` starts a new one (which carries on from the file)."""
    return state_path(root).exists() and running_pid(root) is None


def read_state(root: Path) -> dict[str, dict[str, Any]]:
    """Per server what the running supervisor recorded; empty when none runs."""
    if running_pid(root) is None:
        return {}
    try:
        return json.loads(state_path(root).read_text()).get("servers", {})
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.ops.supervise TANGOMESH_HOME", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return SupervisorProcess(Path(args[0]).resolve()).run()


if __name__ == "__main__":
    sys.exit(main())
