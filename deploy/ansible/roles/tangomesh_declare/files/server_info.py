"""Put the Starter server info of a tangomesh mesh file (idempotent).

json2tango declares servers, devices and properties; it ignores the mesh
file's ``_tangomesh`` section, which holds what Starter and Astor need per
server: its host and startup level. This script writes that as server info
(host, mode 1 = controlled, level). Run it with the tangomesh virtualenv's
python (it has PyTango), TANGO_HOST set:

    python server_info.py MESH.json [--default-host H] [--first-start] [--timeout S]

A host's Starter only lists the servers whose admin device was exported from
that host at least once. ``--first-start`` therefore also starts, level by
level, every server that is not running yet through ``tango/admin/<host>``
(DevStart, as Astor does), waits for its admin device to answer, writes its
server info again and finally asks each Starter to re-read its list
(UpdateServersInfo). Prints one JSON line: {"changed": ..., "actions": [...]}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import tango


def short(host: str) -> str:
    return host.split(".")[0]


def load(path: Path, default_host: str) -> list[tuple[str, str, int]]:
    mesh = json.loads(path.read_text())
    declared = {f"{srv}/{inst}".lower() for srv, insts in mesh.get("servers", {}).items() for inst in insts}
    servers = []
    for name, spec in mesh["_tangomesh"]["servers"].items():
        if name.lower() not in declared:
            raise SystemExit(f"{path}: _tangomesh.servers names {name}, which 'servers' does not declare")
        servers.append((name, spec.get("host") or default_host, int(spec["level"])))
    return sorted(servers, key=lambda s: (s[2], s[0]))


def current_info(db: tango.Database, name: str) -> tuple[str, int, int] | None:
    try:
        info = db.get_server_info(name)
        return short(info.host), int(info.mode), int(info.level)
    except Exception:  # no info yet: PyTango 10.3.1 raises a parse error, not DevFailed
        return None


def put_info(db: tango.Database, name: str, host: str, level: int) -> None:
    info = tango.DbServerInfo()
    info.name, info.host, info.mode, info.level = name, host, 1, level
    db.put_server_info(info)


def admin_answers(name: str) -> bool:
    try:
        proxy = tango.DeviceProxy(f"dserver/{name}")
        proxy.set_timeout_millis(1000)
        proxy.ping()
        return True
    except tango.DevFailed:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mesh", type=Path, help="mesh file: dsconfig JSON plus _tangomesh.servers")
    parser.add_argument("--default-host", default=short(socket.gethostname()),
                        help="host of servers without one in the file (default: this host)")
    parser.add_argument("--first-start", action="store_true",
                        help="start servers not running yet through their host's Starter, level by level")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each level")
    args = parser.parse_args(argv)

    servers = load(args.mesh, args.default_host)
    db = tango.Database()
    actions = []
    for name, host, level in servers:
        if current_info(db, name) != (short(host), 1, level):
            put_info(db, name, host, level)
            actions.append(f"{name}: host {host}, level {level}, controlled")

    if args.first_start:
        hosts = set()
        for level in sorted({lvl for _, _, lvl in servers}):
            started = []
            for name, host, lvl in servers:
                if lvl == level and not admin_answers(name):
                    starter = tango.DeviceProxy(f"tango/admin/{host}")
                    starter.command_inout("DevStart", name)
                    started.append((name, host))
                    actions.append(f"{name}: started through tango/admin/{host}")
            deadline = time.monotonic() + args.timeout
            while started and not all(admin_answers(name) for name, _ in started):
                if time.monotonic() > deadline:
                    late = [name for name, _ in started if not admin_answers(name)]
                    raise SystemExit(f"level {level}: not running after {args.timeout:.0f} s: {late} "
                                     "(see the Starter's LogFileHome/ds.log/)")
                time.sleep(0.5)
            for name, host in started:  # now exported from its host: it joins that host's controlled list
                put_info(db, name, host, level)
                hosts.add(host)
        for host in sorted(hosts):
            tango.DeviceProxy(f"tango/admin/{host}").command_inout("UpdateServersInfo")

    print(json.dumps({"changed": bool(actions), "actions": actions}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
