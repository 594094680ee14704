"""Hosts for the tests: network namespaces joined by a bridge, each with its own address.

A :class:`NamespaceHosts` makes N "hosts" on this machine (as root): a Linux
bridge in the root namespace holding the network's first address (where the
test process, and the Tango database it starts, are reached), and per host a
network namespace with a veth pair into the bridge, its own address, its own
loopback and a default route over the bridge. A process started in a host
(:meth:`NamespaceHosts.spawn`) sees only that host's interfaces: what it
binds on 127.0.0.1 no other host reaches, so a service that advertises
loopback fails here as it would across real machines. omniORB publishes the
namespace's address in its IORs by itself, so Tango works across the hosts
with the database on the bridge address.

Names and the subnet are chosen per test session (from the pid), so that two
test runs on one machine do not meet; everything is removed on close, the
hosts' processes killed first.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.ops import supervise
from services.ops.home import executable, spawn, terminate
from services.ops.mesh import ServerSpec


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _used_subnets() -> set[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    nets = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    veth: str  # the root namespace's end of its link

    def link_down(self) -> None:
        """Cut the host off the network (its cable pulled)."""
        _ip("link", "set", self.veth, "down")

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.namespace, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> list[int]:
        """SIGKILL every process of the host (its power cut)."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


@dataclass
class NamespaceHosts:
    names: tuple[str, ...]
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""
    gateway: str = ""

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("network namespaces need root")
        used = _used_subnets()
        subnet = next(n for k in range(256) if (n := ipaddress.ip_network(f"10.{(int(self.tag) + k) % 200 + 50}.0.0/24"))
                      not in used)
        addresses = list(subnet.hosts())
        self.bridge = f"tmbr{self.tag}"[:15]
        self.gateway = str(addresses[0])
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for k, name in enumerate(self.names, start=1):
                ns, veth = f"tm{self.tag}-{name}", f"tmv{self.tag}{k}"[:15]
                address = str(addresses[10 + k])
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "route", "add", "default", "via", self.gateway)
                self.hosts[name] = Host(name, ns, address, veth)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run in ``host``'s network namespace."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *argv]

    def namespaces(self) -> dict[str, str]:
        return {name: host.namespace for name, host in self.hosts.items()}

    def close(self) -> None:
        for host in self.hosts.values():
            host.kill_all()
        time.sleep(0.2)
        for host in self.hosts.values():
            _ip("netns", "del", host.namespace, check=False)
            _ip("link", "del", host.veth, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        self.hosts.clear()


class NamespaceLauncher:
    """Starts a mesh's servers in the hosts their ``_tangomesh`` entries name
    (the launcher :func:`services.ops.mesh.up` uses, with ``hosts``): what
    each host's Starter would do. Not supervised: a killed server stays dead,
    as on a host that went down. ``namespaces``: host name -> its namespace."""

    def __init__(self, root: Path, namespaces: dict[str, str]) -> None:
        self.root = root
        self.namespaces = namespaces
        for sub in ("logs", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def start(self, server: ServerSpec) -> None:
        argv = ["ip", "netns", "exec", self.namespaces[server.host], executable(server.executable), server.instance]
        pid = spawn(argv, self.root / "logs" / f"{server.file_stem}.log", dict(os.environ))
        supervise.server_pid_file(self.root, server.name).write_text(str(pid))

    def stop(self, server: ServerSpec) -> None:
        pid_file = supervise.server_pid_file(self.root, server.name)
        try:
            terminate(int(pid_file.read_text()))
        except (OSError, ValueError):
            pass
        pid_file.unlink(missing_ok=True)

    def stop_supervising(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def main(argv: list[str]) -> int:
    """``python -m support.hosts up|down MESH NAMESPACES_JSON``, with
    ``TANGO_HOST`` and ``TANGOMESH_HOME`` set: the mesh's servers started in
    (stopped from) their hosts, level by level. A process of its own, since a
    process's default Tango database is fixed once it has made a proxy."""
    from services.ops import mesh
    from services.ops.home import home

    action, mesh_file, namespaces = argv[0], Path(argv[1]), json.loads(argv[2])
    spec = mesh.MeshSpec.load(mesh_file)
    launcher = NamespaceLauncher(home(), namespaces)
    if action == "up":
        print(json.dumps(mesh.up(spec, launcher, home(), timeout=120, hosts=list(namespaces))))
    else:
        print(json.dumps(mesh.down(spec, [launcher], hosts=list(namespaces))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
