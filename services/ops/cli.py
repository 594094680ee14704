"""``tangomesh``: run the mesh from a shell.

    tangomesh db [start|stop|status]    the embedded Tango database
    tangomesh env                       the TANGO_HOST to export
    tangomesh up [--mesh F] [--via-starter] [--trusted]
    tangomesh status [--json]
    tangomesh down [--keep-db]
    tangomesh scan --sim NAME [--shape NXxNY] [--snake] [--rate HZ] [--json]
    tangomesh demo [--keep] [--sim NAME] [--shape NXxNY] [--rate HZ]
    tangomesh scale PIPELINE N
    tangomesh query [SCAN] [--product P] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tango
from rich.markup import escape
from rich.console import Console
from rich.table import Table

from services.ops import mesh, supervise
from services.ops.driver import ScanDriver
from services.ops.replay import Replay
from services.ops.slurm import SlurmLauncher, SlurmSettings
from services.ops.verdicts import consumer_verdict
from services.sim.sims import SIM_NAMES, Simulation, make_simulation, parse_shape
from services.ops.demo import demo
from services.ops.home import EmbeddedDatabase, home, resolve_tango_host
from services.component import brief
from services.registration import ManagerUnavailable, TangoManagerLink
from sink.queries import QUERY, QueryError, SinkClient, find_sinks

console = Console(stderr=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tangomesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("db", help="run the embedded sqlite Tango database")
    p.add_argument("action", nargs="?", choices=("start", "stop", "status"), default="start")
    sub.add_parser("env", help="print the TANGO_HOST to export")

    for name, text in (("up", "declare the mesh and start it"), ("down", "stop the mesh"),
                       ("status", "show every service")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--mesh", type=Path, default=mesh.DEFAULT_MESH, help="mesh file (dsconfig JSON)")
    sub.choices["up"].add_argument("--via-starter", action="store_true",
                                   help="start servers through this host's Starter (as Astor does)")
    sub.choices["up"].add_argument("--timeout", type=float, default=60.0, help="seconds per startup level")
    sub.choices["up"].add_argument("--trusted", action="store_true",
                                   help="data plane without authentication (a laptop nobody else reaches); "
                                        "sets the DataPlaneAuth property to off, see docs/operating.md")
    sub.choices["down"].add_argument("--keep-db", action="store_true", help="leave the embedded database running")
    sub.choices["status"].add_argument("--json", action="store_true", help="a JSON list instead of a table")

    for name, text in (("scan", "drive a simulated scan through the running mesh and check what arrives"),
                       ("demo", "start the mesh, run a simulated scan with live progress, summarise, take it down")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--sim", choices=SIM_NAMES, default="full" if name == "demo" else None,
                       required=name == "scan", help="simulated beamline: detectors and pipelines")
        p.add_argument("--shape", type=parse_shape, default=parse_shape("60x40" if name == "demo" else "50x40"),
                       help="NXxNY raster (fast x slow points) or N for a line scan")
        p.add_argument("--snake", action="store_true", default=name == "demo", help="odd rows run backwards")
        p.add_argument("--rate", type=float, default=100.0 if name == "demo" else 0.0,
                       help="points per second (0: as fast as the mesh takes them)")
        p.add_argument("--dwell", type=float, default=0.01, help="exposure per point, seconds (the physics)")
        p.add_argument("--seed", type=int, default=0, help="phantom and noise seed")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the scan's end")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        p.add_argument("--mesh", type=Path, default=mesh.DEFAULT_MESH, help="mesh file (dsconfig JSON)")
    sub.choices["scan"].add_argument("--block", type=int, default=1, help="points per source message")
    DATA_HOST_HELP = ("address this command's sources and checking consumers bind and advertise (default "
                      "127.0.0.1; on a mesh across hosts, this host's address the others reach)")
    sub.choices["scan"].add_argument("--data-host", default="127.0.0.1", help=DATA_HOST_HELP)
    sub.choices["scan"].add_argument("--pipelines", help="comma-separated subset of the simulation's pipelines")
    sub.choices["demo"].add_argument("--keep", action="store_true", help="leave the mesh running (for Lavue)")

    p = sub.add_parser("replay", help="send a recorded scan (a master's RecordDirectory) through the running mesh")
    p.add_argument("recording", type=Path, help="the recording of one scan and pipeline: <root>/<scan>/<pipeline>")
    p.add_argument("--rate", type=float, default=0.0, help="points per second (0: the recorded pace)")
    p.add_argument("--fast", action="store_true", help="as fast as the mesh takes it (overrides the recorded pace)")
    p.add_argument("--analysis", type=Path, help="JSON file: this pipeline's analysis entry to use instead")
    p.add_argument("--data-host", default="127.0.0.1", help=DATA_HOST_HELP)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the scan's end")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--mesh", type=Path, default=mesh.DEFAULT_MESH, help="mesh file (dsconfig JSON)")

    p = sub.add_parser("scale", help="start or stop worker servers of a pipeline until N run")
    p.add_argument("pipeline")
    p.add_argument("workers", type=int)
    p.add_argument("--mesh", type=Path, default=mesh.DEFAULT_MESH, help="mesh file (for the topology device)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--slurm", action="store_true", help="run the workers as Slurm batch jobs (a submit host)")
    p.add_argument("--beamtime-metadata", type=Path,
                   help="with --slurm: partition, reservation, account and nodes from this beamtime metadata "
                        "file's onlineAnalysis section")
    for option, text in (("--partition", "Slurm partition"), ("--reservation", "Slurm reservation"),
                         ("--account", "Slurm account"), ("--time", "Slurm time limit, e.g. 8:00:00")):
        p.add_argument(option, default=None, help=f"with --slurm: {text}")
    p.add_argument("--cpus", type=int, default=1, help="with --slurm: CPUs per worker job")
    p.add_argument("--mem", type=int, default=0, help="with --slurm: MB per worker job (0: the default)")

    p = sub.add_parser("query", help="what the sink holds: the scan list, or one scan's points and products")
    p.add_argument("scan", nargs="?", help="scan id (default: list the scans held)")
    p.add_argument("--product", help="also fetch this product (<pipeline>/<result>) and show its statistics")
    p.add_argument("--sink", help="sink device name (default: the first registered sink)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--mesh", type=Path, default=mesh.DEFAULT_MESH, help="mesh file (for the topology device)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        err.print(f"[bold red]tangomesh {args.command}:[/] interrupted")
        return 130
    except Exception as exc:  # one line for the user, never a traceback (-v logs it too)
        if args.verbose:
            logging.exception("tangomesh %s failed", args.command)
        err.print(f"[bold red]tangomesh {args.command}:[/] {escape(one_line(exc))}", highlight=False, soft_wrap=True)
    return 1


def one_line(exc: BaseException) -> str:
    """What went wrong, on one short line: a DevFailed's description, the
    topology manager named when it does not answer, else the exception's text."""
    if isinstance(exc, tango.DevFailed):
        text = exc.args[0].desc if exc.args else str(exc)
    elif isinstance(exc, ManagerUnavailable):
        text = f"the topology manager does not answer ({exc}); is the mesh up? (tangomesh status)"
    elif isinstance(exc, (RuntimeError, TimeoutError, FileNotFoundError, ValueError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return brief(" ".join(text.split()))


def cmd_db(args: argparse.Namespace) -> int:
    db = EmbeddedDatabase(home())
    if args.action == "start":
        console.print(db.start())
    elif args.action == "stop":
        console.print("stopped" if db.stop() else "not running")
    else:
        running = db.running()
        console.print(f"{db.tango_host() or '-'} {'running' if running else 'stopped'}")
        return 0 if running else 3
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    tango_host, _ = resolve_tango_host(home())
    print(f"export TANGO_HOST={tango_host}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    root = home()
    spec = mesh.MeshSpec.load(args.mesh)
    tango_host, embedded = resolve_tango_host(root)
    launcher = mesh.StarterLauncher(root) if args.via_starter else mesh.LocalLauncher(root)
    outcome = mesh.up(spec, launcher, root, timeout=args.timeout, trusted=args.trusted)
    for server, what in outcome.items():
        console.print(f"{server:32s} {what}")
    console.print(f"{'data plane':32s} " + ("plain: no authentication (--trusted)" if args.trusted else
                                           "CurveZMQ: registered peers only"))
    if any(what == "running" for what in outcome.values()):
        console.print(f"{'':32s} (servers that were up already keep their mode: restart the mesh to change it)")
    if not args.via_starter:
        pid = supervise.running_pid(root)
        console.print(f"{'supervisor':32s} {f'pid {pid}: restarts servers that exit' if pid else 'none: no restarts'}")
    console.print(f"mesh up on TANGO_HOST={tango_host}{' (embedded)' if embedded else ''}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    root = home()
    spec = mesh.MeshSpec.load(args.mesh)
    db = EmbeddedDatabase(root)
    tango_host, embedded = resolve_tango_host(root, start=False)
    if embedded and not db.running():
        console.print("mesh is down (no database running)")
        return 0
    stopped = mesh.down(spec, [mesh.StarterLauncher(root), mesh.LocalLauncher(root)])
    for server in stopped:
        console.print(f"{server:32s} stopped")
    if embedded and not args.keep_db:
        db.stop()
        console.print("embedded Tango database stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = home()
    spec = mesh.MeshSpec.load(args.mesh)
    tango_host, embedded = resolve_tango_host(root, start=False)
    if embedded and not EmbeddedDatabase(root).running():
        rows: list[dict[str, Any]] = []
    else:
        rows = mesh.status(spec, spec.topology_device, root)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title=f"tangomesh on {tango_host or '(no database)'}")
    for column in ("device", "kind", "pipeline", "host", "pid", "state", "restarts", "in", "out", "errors", "queue",
                   "endpoints"):
        table.add_column(column)
    for r in rows:
        c = r.get("counters", {})
        table.add_row(
            r["name"], r["kind"], r["pipeline"], r["host"], str(r["pid"] or "-"), r["state"], _restarts(r),
            *(str(c.get(k, "-")) for k in ("events_in", "events_out", "errors", "queue_depth")),
            " ".join(f"{k}={v}" for k, v in r["endpoints"].items()),
        )
    console.print(table)
    for r in rows:
        if r.get("decision"):
            d = r["decision"]
            console.print(f"autoscaler {r['name']} ({r['pipeline']}): {d['workers_from']} -> {d['workers_to']} "
                          f"workers at {time.strftime('%H:%M:%S', time.localtime(d['at']))}: {escape(d['reason'])}")
    if supervise.left_behind(root):
        console.print("[bold yellow]supervisor: not running[/] (killed?): nothing restarts the servers; "
                      "`tangomesh up` starts it again, carrying on its restart counts")
    return 0


def _restarts(row: dict[str, Any]) -> str:
    """Restarts by the supervisor and how the server last ended ("-": not supervised)."""
    if row.get("restarts") is None:
        return "-"
    last = row.get("last_exit")
    return f"{row['restarts']} ({last['how']})" if last else str(row["restarts"])


def _simulation(args: argparse.Namespace) -> Simulation:
    if args.rate < 0 or args.dwell <= 0:
        raise ValueError("--rate must be >= 0 and --dwell > 0")
    return make_simulation(args.sim, args.shape, args.snake, args.dwell, args.seed)


def cmd_scan(args: argparse.Namespace) -> int:
    pipelines = args.pipelines.split(",") if args.pipelines else None
    return _drive(args, _simulation(args), f"sim-{args.sim}-{time.time_ns() // 1000}", pipelines,
                  block=args.block, command=" ".join(["tangomesh scan", *sys.argv[2:]]))


def cmd_replay(args: argparse.Namespace) -> int:
    analysis = json.loads(args.analysis.read_text()) if args.analysis else None
    recording = Replay(args.recording, analysis)
    scan_id = f"replay-{recording.meta.scan_id}-{time.time_ns() // 1000}"[:200]
    return _drive(args, recording, scan_id, None, recorded_pace=args.rate == 0 and not args.fast,
                  command=" ".join(["tangomesh replay", *sys.argv[2:]]))


def _drive(args: argparse.Namespace, data: Any, scan_id: str, pipelines: list[str] | None, *, block: int = 1,
           command: str, recorded_pace: bool = False) -> int:
    """One scan of ``data`` through the running mesh, and the report: what
    every pipeline delivered and what the consumers hold (``tangomesh scan``
    and ``tangomesh replay``)."""
    spec = mesh.MeshSpec.load(args.mesh)
    resolve_tango_host(home(), start=False)
    link = TangoManagerLink(spec.topology_device)
    deadline = time.monotonic() + args.timeout  # the whole command's: sending, the pipelines' ends, the consumers
    driver: ScanDriver | None = None
    try:
        driver = ScanDriver.for_data(data, link, pipelines, host=args.data_host, max_block=max(1, block))
        outcome = driver.run(data, scan_id, int(time.time()) % 100_000, rate=args.rate, block=block,
                             timeout=args.timeout, command=command, deadline=deadline, recorded_pace=recorded_pace)
    except Exception as exc:
        if not args.json:
            raise
        # a script reading --json gets its summary on failure too: what failed, what each pipeline
        # delivered, and what the consumers hold of it (asked briefly: the time is up already)
        delivered = driver.delivered(scan_id) if driver is not None else {}
        summary: dict[str, Any] = {"scan": scan_id, "lossless": False, "error": one_line(exc),
                                   "pipelines": {p: {"points_delivered": n} for p, n in delivered.items()}}
        if driver is not None:
            summary["consumers"] = _consumers_json(link, scan_id, [], list(delivered), AFTER_FAILURE_S)
        print(json.dumps(summary, indent=1))
        return 2
    finally:
        if driver is not None:
            driver.close()
    healthy = [p for p in outcome.per_pipeline if p not in outcome.failed]
    consumers = consumer_verdict(link, scan_id, healthy, max(1.0, deadline - time.monotonic()),
                                 failed=list(outcome.failed))
    lossless = outcome.lossless and consumers.ok
    if args.json:
        print(json.dumps({**outcome.to_json(), "lossless": lossless, "consumers": consumers.to_json()}, indent=1))
    else:
        table = Table(title=f"scan {outcome.scan}: {outcome.points} points, {outcome.wall_s:.2f} s, "
                            f"{outcome.sent_bytes / 2**20:.1f} MiB sent")
        keys = ("points_delivered", "missing", "duplicates", "out_of_order", "failed_points", "events_per_s")
        table.add_column("pipeline")
        for key in (*keys, "latency p50/p99 ms"):
            table.add_column(key, justify="right")
        for pipeline, s in outcome.per_pipeline.items():
            latency = s.get("latency_ms", {})
            table.add_row(pipeline, *(str(s[k]) for k in keys), f"{latency.get('p50', '-')}/{latency.get('p99', '-')}")
        console.print(table)
        for pipeline, why in outcome.failed.items():
            console.print(f"[bold red]pipeline {pipeline} lost mid-scan:[/] {escape(why)}")
        sink = consumers.sink
        console.print(("sink: " + (f"{sink.get('status')}, {sink.get('received')}/{sink.get('expected')} points"
                                   if sink else "none in the mesh"))
                      + f"; {len(consumers.files)} files"
                      + (f"; [bold red]no files from {', '.join(consumers.missing_files)}[/]"
                         if consumers.missing_files else ""))
    return 0 if lossless else 2


#: How long a failed scan's summary asks the consumers for what they hold.
AFTER_FAILURE_S = 3.0


def _consumers_json(link: TangoManagerLink, scan_id: str, pipelines: list[str], failed: list[str],
                    timeout: float) -> dict[str, Any]:
    """The consumers' verdict as JSON, or why they could not be asked: a
    summary is printed whatever the consumers do."""
    try:
        return consumer_verdict(link, scan_id, pipelines, timeout, failed=failed).to_json()
    except Exception as exc:  # noqa: BLE001 - the summary reports it instead
        return {"ok": False, "error": one_line(exc)}


def cmd_demo(args: argparse.Namespace) -> int:
    return demo(_simulation(args), args.mesh, home(), console, args.rate, args.keep, args.json, args.timeout)


def cmd_scale(args: argparse.Namespace) -> int:
    spec = mesh.MeshSpec.load(args.mesh)
    resolve_tango_host(home(), start=False)
    root = home()
    launcher = SlurmLauncher(root, _slurm_settings(args)) if args.slurm else mesh.LocalLauncher(root)
    running = mesh.scale_workers(spec, args.pipeline, args.workers, launcher, root, args.timeout)
    console.print(f"pipeline {args.pipeline}: {len(running)} worker(s) running: {', '.join(running) or '-'}")
    return 0


def _slurm_settings(args: argparse.Namespace) -> SlurmSettings:
    """The job options: the beamtime's onlineAnalysis section, then what the command line says."""
    section: dict[str, Any] = {}
    if args.beamtime_metadata:
        section = json.loads(args.beamtime_metadata.read_text()).get("onlineAnalysis") or {}
    base = SlurmSettings.from_online_analysis(section, cpus_per_task=args.cpus, mem_mb=args.mem)
    given = {k: v for k, v in (("partition", args.partition), ("reservation", args.reservation),
                               ("account", args.account), ("time_limit", args.time)) if v is not None}
    return dataclasses.replace(base, **given)


def _sink_client(args: argparse.Namespace) -> SinkClient:
    spec = mesh.MeshSpec.load(args.mesh)
    resolve_tango_host(home(), start=False)
    sinks = find_sinks(TangoManagerLink(spec.topology_device))
    if args.sink:
        sinks = [s for s in sinks if s["name"] == args.sink.lower()]
    if not sinks:
        raise RuntimeError(f"no sink {args.sink!r} registered" if args.sink else "no sink registered")
    return SinkClient(sinks[0]["endpoints"][QUERY])


def cmd_query(args: argparse.Namespace) -> int:
    if args.product and not args.scan:
        raise ValueError("--product needs a SCAN")
    client = _sink_client(args)
    try:
        if not args.scan:
            listing = client.list()
            if args.json:
                print(json.dumps(listing, indent=1))
                return 0
            table = Table(title=f"scans in the sink at {client.endpoint}")
            for column in ("scan", "status", "geometry", "expected", "received", "missing", "products", "MiB"):
                table.add_column(column, justify="left" if column in ("scan", "status", "geometry") else "right")
            for s in listing["scans"]:
                table.add_row(s["scan"], s["status"], "x".join(map(str, s["map_shape"])), str(s["expected"]),
                              str(s["received"]), str(s["missing"]), str(s["products"]), f"{s['bytes'] / 2**20:.2f}")
            console.print(table)
            return 0
        info = client.info(args.scan)
        stats = None
        if args.product:
            data = client.get(args.scan, args.product)
            finite = data[np.isfinite(data)] if data.dtype.kind in "fc" else data
            stats = {"product": args.product, "shape": list(data.shape), "dtype": data.dtype.str,
                     "finite": int(finite.size), "nan": int(data.size - finite.size),
                     **({"min": float(finite.real.min()), "max": float(finite.real.max()),
                         "mean": float(finite.real.mean())} if finite.size else {})}
    except QueryError as exc:
        raise RuntimeError(str(exc)) from None
    finally:
        client.close()
    if args.json:
        print(json.dumps({**info, **({"statistics": stats} if stats else {})}, indent=1))
        return 0
    table = Table(title=f"scan {info['scan']} ({info['status']}, {info['geometry']} {info['map_shape']})")
    table.add_column("")
    table.add_column("", justify="right")
    for key in ("expected", "received", "missing", "failed", "gaps", "duplicates"):
        table.add_row(f"points {key}", str(info[key]))
    table.add_row("pipelines", ", ".join(info["pipelines"]))
    console.print(table)
    products = Table(title="products")
    for column in ("product", "shape", "dtype", "MiB"):
        products.add_column(column)
    for name, p in info["products"].items():
        products.add_row(name, "x".join(map(str, p["shape"])), f"{p['dtype']} (from {p['source_dtype']})",
                         f"{p['bytes'] / 2**20:.2f}")
    for name, why in info["refused"].items():
        products.add_row(name, "refused", why, "")
    console.print(products)
    if stats:
        console.print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


COMMANDS = {"db": cmd_db, "env": cmd_env, "up": cmd_up, "down": cmd_down, "status": cmd_status,
            "scan": cmd_scan, "replay": cmd_replay, "demo": cmd_demo, "scale": cmd_scale, "query": cmd_query}

if __name__ == "__main__":
    sys.exit(main())
