"""Declare, start, stop and inspect a mesh described by a dsconfig file.

The mesh file is plain dsconfig JSON (servers → instances → classes → devices →
properties) plus a ``_tangomesh`` section with what dsconfig does not cover:
the Starter startup level (and host) of every server. Servers start level by
level (topology manager first, master last), each level only once every
device of the previous one has registered with the topology manager.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Protocol

import tango

from services import security
from services.ops import starter_stats, supervise
from services.ops.home import executable, pid_alive, spawn, terminate
from services.registration import DEFAULT_TOPOLOGY_DEVICE, ManagerUnavailable, TangoManagerLink
from services.schema import validate

log = logging.getLogger("tangomesh.mesh")

DEFAULT_MESH = Path(__file__).resolve().parents[2] / "deploy" / "mesh.json"
STARTER_PATH = "/usr/lib/tango/Starter"
#: Starter properties set only where the host has none yet.
STARTER_DEFAULTS = {
    "LogFileHome": "",
    "StartServersAtStartup": "false",
    "InterStartupLevelWait": "1",
    "ServerStartupTimeout": "30",
    # Restart a controlled server that fails after running more than this many minutes (0: never);
    # a server failing sooner stays stopped (Starter's guard against crash loops). See docs/operating.md.
    "AutoRestartDuration": "1",
}


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


@dataclass(frozen=True)
class ServerSpec:
    name: str  # "Server/instance", as Tango and Starter call it
    level: int
    host: str
    devices: tuple[str, ...]

    @property
    def executable(self) -> str:
        return self.name.split("/")[0]

    @property
    def instance(self) -> str:
        return self.name.split("/")[1]

    @property
    def admin_device(self) -> str:
        return f"dserver/{self.name}"

    @property
    def file_stem(self) -> str:
        return self.name.replace("/", "_")


@dataclass
class MeshSpec:
    path: Path
    config: dict[str, Any]
    servers: list[ServerSpec]
    topology_device: str = DEFAULT_TOPOLOGY_DEVICE
    levels: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | str = DEFAULT_MESH) -> "MeshSpec":
        path = Path(path)
        config = json.loads(path.read_text())
        validate("mesh", config)
        info = config["_tangomesh"]
        servers = []
        for server, instances in config["servers"].items():
            for instance, classes in instances.items():
                name = f"{server}/{instance}"
                if name not in info["servers"]:
                    raise ValueError(f"{path}: server {name} has no startup level in _tangomesh.servers")
                devices = tuple(d.lower() for devs in classes.values() for d in devs)
                spec = info["servers"][name]
                servers.append(ServerSpec(name, spec["level"], spec.get("host", short_hostname()), devices))
        unknown = set(info["servers"]) - {s.name for s in servers}
        if unknown:
            raise ValueError(f"{path}: _tangomesh.servers names undeclared servers {sorted(unknown)}")
        servers.sort(key=lambda s: (s.level, s.name))
        managers = [
            device.lower()
            for instances in config["servers"].values()
            for classes in instances.values()
            for device in classes.get("TopologyManager", {})
        ]
        if len(managers) > 1:
            raise ValueError(f"{path}: one TopologyManager per mesh, found {managers}")
        topology = managers[0] if managers else DEFAULT_TOPOLOGY_DEVICE
        return cls(path, config, servers, topology, sorted({s.level for s in servers}))

    def at_level(self, level: int) -> list[ServerSpec]:
        return [s for s in self.servers if s.level == level]


# --------------------------------------------------------------------------- declaring


HOME_TOKEN = "${TANGOMESH_HOME}"


def with_home(config: Any, root: Path) -> Any:
    """The mesh file with ``${TANGOMESH_HOME}`` in property values replaced by
    the state directory, so a laptop mesh keeps its files under it (servers
    started by Starter do not inherit the CLI's environment)."""
    if isinstance(config, dict):
        return {k: with_home(v, root) for k, v in config.items()}
    if isinstance(config, list):
        return [with_home(v, root) for v in config]
    if isinstance(config, str):
        return config.replace(HOME_TOKEN, str(root))
    return config


def declare(spec: MeshSpec, root: Path) -> bool:
    """Write servers, devices and properties with dsconfig (update mode: add and
    change, never remove, so properties set by hand in Jive survive)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # dsconfig draws a tqdm bar when tqdm is installed (read on import)
    from dsconfig.json2tango import apply_config, prepare_config

    config = prepare_config(with_home(spec.config, root))
    _, _, calls, *_ = apply_config(config, tango.Database(), write=True, update=True, verbose=False)
    return bool(calls)


def put_server_info(db: tango.Database, server: ServerSpec) -> None:
    """Starter's view of a server: host, controlled, startup level (Astor shows it)."""
    info = tango.DbServerInfo()
    info.name = server.name
    info.host = server.host
    info.mode = 1
    info.level = server.level
    db.put_server_info(info)


def admin_answers(server: ServerSpec, timeout_ms: int = 1000) -> bool:
    try:
        proxy = tango.DeviceProxy(server.admin_device)
        proxy.set_timeout_millis(timeout_ms)
        proxy.ping()
        return True
    except tango.DevFailed:
        return False


def exported_pid(db: tango.Database, server: ServerSpec) -> int | None:
    """The pid this host's server last exported, if that process still runs it."""
    try:
        info = db.get_device_info(server.admin_device)
    except tango.DevFailed:
        return None
    pid = int(getattr(info, "pid", 0) or 0)
    if pid and supervise.runs_server(pid, server.name):
        return pid
    return None


# --------------------------------------------------------------------------- launching


def stop_through_starter(server: ServerSpec) -> None:
    """``DevStop`` through this host's Starter when it runs the server: a server
    it runs and that just exits counts as failed, and with ``AutoRestartDuration``
    set the Starter would start it again."""
    try:
        proxy = tango.DeviceProxy(f"tango/admin/{short_hostname()}")
        proxy.ping()
        if server.name not in proxy.command_inout("DevGetRunningServers", True):
            return
        proxy.command_inout("DevStop", server.name)
    except tango.DevFailed as exc:
        log.info("DevStop %s through this host's Starter: %s", server.name, exc.args[0].desc if exc.args else exc)


class Launcher(Protocol):
    def start(self, server: ServerSpec) -> None: ...
    def stop(self, server: ServerSpec) -> None: ...
    def stop_supervising(self) -> None: ...
    def shutdown(self) -> None: ...


class LocalLauncher:
    """Servers as detached processes of this host, logging under the home.

    They are started through the home's supervisor (``services/ops/supervise.py``),
    which restarts a server that exits unexpectedly; a server is forgotten by the
    supervisor before it is stopped on purpose. Without a supervisor they are
    started directly and not restarted.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._supervised: bool | None = None
        for sub in ("logs", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def supervise(self) -> bool:
        """Make sure the home's supervisor runs (once per launcher); False if it cannot."""
        if self._supervised is None:
            try:
                self._supervised = supervise.ensure_running(self.root) is not None
            except RuntimeError as exc:  # the mesh still starts, unsupervised
                log.warning("%s: servers start unsupervised (no restarts)", exc)
                self._supervised = False
        return self._supervised

    def start(self, server: ServerSpec) -> None:
        if self.supervise() and supervise.request(
                self.root, {"op": "start", "server": server.name, "env": dict(os.environ)}) is not None:
            return  # the supervisor started it and wrote its pid file
        pid = spawn(
            [executable(server.executable), server.instance],
            self.root / "logs" / f"{server.file_stem}.log",
            dict(os.environ),
        )
        supervise.server_pid_file(self.root, server.name).write_text(str(pid))

    def stop(self, server: ServerSpec) -> None:
        """Stop a server on purpose: first tell whoever would restart it (the
        home's supervisor, this host's Starter), then SIGTERM, SIGKILL if it hangs."""
        pids = set()
        forgotten = supervise.request(self.root, {"op": "forget", "server": server.name})  # before it exits
        stop_through_starter(server)
        if forgotten and forgotten.get("pid"):
            pids.add(int(forgotten["pid"]))
        pid_file = supervise.server_pid_file(self.root, server.name)
        if pid_file.exists():
            try:
                pids.add(int(pid_file.read_text()))
            except ValueError:
                pass
        exported = exported_pid(tango.Database(), server)
        if exported:
            pids.add(exported)
        for pid in pids:
            if supervise.runs_server(pid, server.name):
                terminate(pid)
        pid_file.unlink(missing_ok=True)

    def stop_supervising(self) -> None:
        """Stop the home's supervisor, so that stopping the servers races no restart."""
        supervise.stop(self.root)

    def shutdown(self) -> None:
        pass


class StarterLauncher(LocalLauncher):
    """Servers started through this host's Starter device, as Astor would."""

    def __init__(self, root: Path, timeout: float = 30.0) -> None:
        super().__init__(root)
        self.host = short_hostname()
        self.device = f"tango/admin/{self.host}"
        self.timeout = timeout
        self.pid_file = root / "run" / "Starter.pid"
        self._proxy: tango.DeviceProxy | None = None

    @property
    def proxy(self) -> tango.DeviceProxy:
        if self._proxy is None:
            self._proxy = self.ensure_running()
        return self._proxy

    def declare(self) -> None:
        db = tango.Database()
        info = tango.DbDevInfo()
        info.name, info._class, info.server = self.device, "Starter", f"Starter/{self.host}"
        db.add_server(info.server, [info])
        # A host's Starter runs other servers too: add to its configuration, never replace it.
        ours = str(Path(executable("TopologyManager")).parent)
        current = db.get_device_property(self.device, list(STARTER_DEFAULTS) + ["StartDsPath"])
        update = {k: [v] for k, v in STARTER_DEFAULTS.items() if not list(current[k])}
        if "LogFileHome" in update:
            log_home = self.root / "logs" / "starter"
            log_home.mkdir(parents=True, exist_ok=True)
            update["LogFileHome"] = [str(log_home)]
        paths = list(current["StartDsPath"])
        if ours not in paths:
            update["StartDsPath"] = paths + [ours]
        if update:
            db.put_device_property(self.device, update)

    def ensure_running(self) -> tango.DeviceProxy:
        self.declare()
        proxy = tango.DeviceProxy(self.device)
        try:
            proxy.ping()
            return proxy
        except tango.DevFailed:
            pass
        if not os.path.exists(STARTER_PATH):
            raise FileNotFoundError(f"{STARTER_PATH} is missing: install Debian's tango-starter (make does)")
        pid = spawn([STARTER_PATH, self.host], self.root / "logs" / "Starter.log", dict(os.environ))
        self.pid_file.write_text(str(pid))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise RuntimeError(f"Starter exited; see {self.root / 'logs' / 'Starter.log'}")
            try:
                proxy.state()  # OFF until its controlled servers run: answering is enough
                return proxy
            except tango.DevFailed:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Starter {self.device} did not come up within {self.timeout:.0f} s")

    def supervise(self) -> bool:
        return False  # Starter restarts its servers itself (AutoRestartDuration)

    def start(self, server: ServerSpec) -> None:
        self.proxy.command_inout("DevStart", server.name)

    def shutdown(self) -> None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return
        if pid_alive(pid):
            terminate(pid)
        self.pid_file.unlink(missing_ok=True)



# --------------------------------------------------------------------------- up / down


def registered_names(topology_device: str) -> set[str]:
    try:
        return {s["name"] for s in TangoManagerLink(topology_device, 1500).lookup({})}
    except ManagerUnavailable:
        return set()


def wait_registered(spec: MeshSpec, devices: list[str], root: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    missing = set(devices)
    while time.monotonic() < deadline:
        missing = set(devices) - registered_names(spec.topology_device)
        if not missing:
            return
        time.sleep(0.2)
    raise TimeoutError(
        f"not registered after {timeout:.0f} s: {sorted(missing)}; see the logs under {root / 'logs'}"
    )


def up(spec: MeshSpec, launcher: Launcher, root: Path, timeout: float = 60.0,
       trusted: bool = False, hosts: Collection[str] | None = None) -> dict[str, str]:
    """Declare the mesh and start what is not running, level by level, of
    the servers on ``hosts`` (default: this host; the others are started
    there, by their Starter or a launcher of theirs).

    States the data plane's mode first (the ``DataPlaneAuth`` free property,
    which every server reads when it starts): CurveZMQ authentication, or
    plain with ``trusted`` (a laptop nobody else reaches; docs/operating.md).
    Returns what happened per server: "started" or "running" (idempotent).
    """
    declare(spec, root)
    security.write_switch(security.OFF if trusted else security.CURVE)
    if isinstance(launcher, LocalLauncher):
        launcher.supervise()  # also when everything runs: a supervisor that died comes back and adopts them
    db = tango.Database()
    outcome: dict[str, str] = {}
    here = set(hosts) if hosts is not None else {short_hostname()}
    for level in spec.levels:
        servers = [s for s in spec.at_level(level) if s.host in here]
        for server in spec.at_level(level):
            if server.host not in here:
                outcome[server.name] = f"on {server.host} (start it there)"
        for server in servers:
            if admin_answers(server):
                outcome[server.name] = "running"
                continue
            launcher.start(server)
            outcome[server.name] = "started"
        wait_registered(spec, [d for s in servers for d in s.devices], root, timeout)
        for server in servers:
            put_server_info(db, server)
    if isinstance(launcher, StarterLauncher):
        launcher.proxy.command_inout("UpdateServersInfo")
    return outcome


def down(spec: MeshSpec, launchers: list[Launcher], hosts: Collection[str] | None = None) -> list[str]:
    """Stop every server of the mesh on ``hosts`` (default: this host),
    highest level first, including workers that ``tangomesh scale`` added to
    its pipelines; returns those stopped."""
    stopped = []
    db = tango.Database()
    here = set(hosts) if hosts is not None else {short_hostname()}
    declared = {s.name for s in spec.servers}
    scaled = [s for p in sorted(worker_pipelines(spec)) for s in worker_servers(db, p) if s.name not in declared]
    for launcher in launchers:
        launcher.stop_supervising()
    for level in sorted({*spec.levels, *(s.level for s in scaled)}, reverse=True):
        for server in [*spec.at_level(level), *(s for s in scaled if s.level == level)]:
            if server.host not in here:
                continue
            was_running = admin_answers(server, 500) or exported_pid(db, server) is not None
            for launcher in launchers:
                launcher.stop(server)
            if was_running:
                stopped.append(server.name)
    for launcher in launchers:
        launcher.shutdown()
    return stopped


# --------------------------------------------------------------------------- status

STATUS_ATTRIBUTES = ("State", "EventsIn", "EventsOut", "Errors", "QueueDepth")


def status(spec: MeshSpec | None, topology_device: str, root: Path | None = None) -> list[dict[str, Any]]:
    """One row per service: registration facts plus live state and counters,
    and what the home's supervisor recorded of its server (``restarts``,
    ``last_exit``; both None for a server it does not supervise)."""
    try:
        services = TangoManagerLink(topology_device, 1500).lookup({})
    except ManagerUnavailable:
        services = []
    rows = []
    for svc in services:
        row = {k: svc[k] for k in ("name", "kind", "pipeline", "server", "host", "pid", "endpoints")}
        row.update(_read_live(svc["name"]))
        if svc["kind"] == "autoscaler":
            row["decision"] = _last_decision(svc["name"])
        rows.append(row)
    if spec is not None:
        known = {r["name"] for r in rows}
        for server in spec.servers:
            for device in server.devices:
                if device not in known:  # declared but not registered: not running, or failed to start
                    live = _read_live(device)
                    if live["state"] == "UNREACHABLE":
                        live = {"state": "NOT RUNNING", "counters": {}}
                    rows.append({
                        "name": device, "kind": "", "pipeline": "", "server": server.name,
                        "host": server.host, "pid": None, "endpoints": {}, **live,
                    })
    add_restarts(rows, supervise.read_state(root) if root is not None else {})
    return sorted(rows, key=lambda r: r["name"])


def add_restarts(rows: list[dict[str, Any]], supervised: dict[str, dict[str, Any]]) -> None:
    """``restarts`` and ``last_exit`` of each row's server: from the home's
    supervisor, else from the Starter of the row's host; None from neither."""
    supervised = {k.lower(): v for k, v in supervised.items()}
    by_host: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        server = (row.get("server") or "").lower()
        record = supervised.get(server)
        if record is None and server and row.get("host"):
            if row["host"] not in by_host:
                by_host[row["host"]] = {k.lower(): v for k, v in starter_stats.read_statistics(row["host"]).items()}
            record = by_host[row["host"]].get(server)
        row["restarts"] = record["restarts"] if record else None
        row["last_exit"] = record["last_exit"] if record else None


def _read_live(device: str) -> dict[str, Any]:
    try:
        proxy = tango.DeviceProxy(device)
        proxy.set_timeout_millis(1500)
        values = proxy.read_attributes(list(STATUS_ATTRIBUTES))
    except tango.DevFailed as exc:
        return {"state": "UNREACHABLE", "counters": {}, "problem": exc.args[0].desc if exc.args else str(exc)}
    state, *counts = values
    names = ("events_in", "events_out", "errors", "queue_depth")
    return {
        "state": str(state.value),
        "counters": {n: (v.value if not v.has_failed else None) for n, v in zip(names, counts)},
    }


def _last_decision(device: str) -> dict[str, Any] | None:
    """An autoscaler's latest decision ({} before its first, None if it cannot be read)."""
    try:
        proxy = tango.DeviceProxy(device)
        proxy.set_timeout_millis(1500)
        return json.loads(proxy.read_attribute("LastDecision").value)
    except (tango.DevFailed, ValueError):
        return None


# --------------------------------------------------------------------------- scaling

WORKER_CLASS = "PipelineWorker"
WORKER_LEVEL = 4


def worker_servers(db: tango.Database, pipeline: str) -> list[ServerSpec]:
    """Declared PipelineWorker servers whose devices serve ``pipeline``, by name."""
    found = []
    for name in db.get_server_list(f"{WORKER_CLASS}/*"):
        pairs = list(db.get_device_class_list(name))
        devices = tuple(d for d, c in zip(pairs[::2], pairs[1::2]) if c == WORKER_CLASS)
        if any(list(db.get_device_property(d, "Pipeline")["Pipeline"]) == [pipeline] for d in devices):
            found.append(ServerSpec(name, WORKER_LEVEL, short_hostname(), devices))
    return sorted(found, key=lambda s: s.name)


def worker_pipelines(spec: MeshSpec) -> set[str]:
    """Pipelines served by the mesh file's PipelineWorker devices."""
    pipelines = set()
    for instance in spec.config.get("servers", {}).get(WORKER_CLASS, {}).values():
        for device in instance.get(WORKER_CLASS, {}).values():
            pipelines.update(device.get("properties", {}).get("Pipeline", []))
    return pipelines


def scale_workers(spec: MeshSpec, pipeline: str, workers: int, launcher: Launcher, root: Path,
                  timeout: float = 60.0) -> list[str]:
    """Run exactly ``workers`` worker servers for ``pipeline`` on this host:
    declare more (named ``PipelineWorker/<pipeline>-NN``, properties copied
    from an existing worker of the pipeline) and start them, or stop the last
    ones. Returns the devices running afterwards."""
    if workers < 0:
        raise ValueError("the number of workers must be >= 0")
    db = tango.Database()
    servers = worker_servers(db, pipeline)
    template: dict[str, list[str]] = {"Pipeline": [pipeline]}
    if servers:
        device = servers[0].devices[0]
        names = list(db.get_device_property_list(device, "*"))
        template = {k: list(v) for k, v in db.get_device_property(device, names).items()}
    k = 0
    while len(servers) < workers:
        k += 1
        name = f"{WORKER_CLASS}/{pipeline}-{k:02d}"
        if any(s.name == name for s in servers):
            continue
        info = tango.DbDevInfo()
        info.name, info._class, info.server = f"tangomesh/{pipeline}-worker/{k:02d}", WORKER_CLASS, name
        db.add_device(info)
        db.put_device_property(info.name, template)
        servers.append(ServerSpec(name, WORKER_LEVEL, short_hostname(), (info.name,)))
        servers.sort(key=lambda s: s.name)
    started = []
    for server in servers[:workers]:
        if not admin_answers(server, 500):
            launcher.start(server)
            started.append(server)
    for server in reversed(servers[workers:]):
        if admin_answers(server, 500) or exported_pid(db, server) is not None:
            launcher.stop(server)
            log.info("stopped %s", server.name)
    wait_registered(spec, [d for s in started for d in s.devices], root, timeout)
    for server in started:
        put_server_info(db, server)
    return [d for s in servers[:workers] for d in s.devices]
