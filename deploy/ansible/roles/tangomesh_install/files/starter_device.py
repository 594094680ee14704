"""Declare this host's Starter for tangomesh (idempotent).

Run with the tangomesh virtualenv's python (it has PyTango), TANGO_HOST set:

    python starter_device.py HOST --start-ds-path DIR [--set NAME=VALUE ...]

Declares server ``Starter/HOST`` with device ``tango/admin/HOST`` (class
``Starter``) when missing, adds DIR to the device's ``StartDsPath`` (keeping
the directories already listed, so other servers of the host still start) and
sets each ``--set`` property to a single value. Prints one JSON line:
``{"changed": true|false, "actions": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys

import tango


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", help="short host name: the Starter instance and the member of tango/admin/<host>")
    parser.add_argument("--start-ds-path", required=True, help="directory added to StartDsPath")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="device property to set")
    args = parser.parse_args(argv)

    settings = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set {item!r}: expected NAME=VALUE")
        settings[name] = value

    db = tango.Database()
    server = f"Starter/{args.host}"
    device = f"tango/admin/{args.host}"
    actions = []

    declared = [name.lower() for name in list(db.get_device_class_list(server))[::2]]
    if device.lower() not in declared:
        info = tango.DbDevInfo()
        info.name, info._class, info.server = device, "Starter", server
        db.add_server(server, [info])
        actions.append(f"declared {server} with {device}")

    current = db.get_device_property(device, ["StartDsPath", *settings])
    wanted: dict[str, list[str]] = {}
    paths = [p for p in current["StartDsPath"] if p]
    if args.start_ds_path not in paths:
        wanted["StartDsPath"] = [*paths, args.start_ds_path]
    for name, value in settings.items():
        if list(current[name]) != [value]:
            wanted[name] = [value]
    if wanted:
        db.put_device_property(device, wanted)
        actions.extend(f"{device}/{name} = {values}" for name, values in wanted.items())

    print(json.dumps({"changed": bool(actions), "actions": actions}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
