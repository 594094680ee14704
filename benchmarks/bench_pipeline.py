#!/usr/bin/env python
"""End-to-end benchmark of the pipeline core: sources -> master -> workers -> sorter -> consumer.

The whole mesh runs on this host as real device servers (embedded Tango DB,
``tangomesh up`` machinery, one process per server); the simulated sources and
the consumer that checks every index (services/ops/driver.py) run in this
process. Every case is paired with its baseline, measured in the same run: a
raw pyzmq PUSH/PULL hop between two processes carrying messages of the same
size as the case's source messages. The ratio compares events per second
end to end with the events per second that one bare hop carries.

Every case runs twice, with data-plane authentication (CurveZMQ, the
default) and without (``--trusted``), side by side: ``curve/off`` is the
cost of authentication. Cases: small events (a counter set of 9 float64, ~330 bytes on the wire),
XRF-sized events (a 4096-channel uint32 spectrum plus i0 and time, 16 KB),
large frames (1024x2048 uint16, 4 MB), plain and as the detector sends them
(bitshuffle-LZ4, decompressed in the worker only), passed through and
integrated by the xrd processor (pyFAI, 1000 bins); each with 1, 2 and 4 workers
(events/s against the worker count) and with one point per message as well as
blocks. Latency: source send to consumer receipt at a fixed rate of 1 kHz, one
point per message.

    python benchmarks/bench_pipeline.py            # ~3 min, rich table
    python benchmarks/bench_pipeline.py --quick --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import drain, report  # noqa: E402 - beside this script

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from services import codec, security  # noqa: E402
from services.ops import mesh, simulate  # noqa: E402
from services.ops.home import EmbeddedDatabase, home  # noqa: E402
from services.registration import TangoManagerLink  # noqa: E402
from services.sim import profiles  # noqa: E402

PIPELINE = "bench"
LOOP = "127.0.0.1"

# (case, profile, points per message, points per run (full / quick))
CASES = [
    ("small, 1 point/msg", "counterset", 1, 30_000, 10_000),
    ("small, 100 points/msg", "counterset", 100, 300_000, 100_000),
    ("XRF 16 KB, 1 point/msg", "spectra", 1, 10_000, 4_000),
    ("XRF 16 KB, 20 points/msg", "spectra", 20, 40_000, 10_000),
    ("frame 4 MB, 1 point/msg", "frames", 1, 600, 200),
    ("frame 4 MB bslz4, 1 point/msg", "frames-bslz4", 1, 600, 200),  # travels compressed, decoded in the worker
    ("XRD 4 MB frames, 1 point/msg", "frames-xrd", 1, 300, 100),  # pyFAI integration of each frame
    ("XRD 4 MB frames bslz4, 1 point/msg", "frames-xrd-bslz4", 1, 300, 100),
]
CASE_ORDER = {case[0]: k for k, case in enumerate(CASES)}


def mesh_file(root: Path) -> Path:
    """The benchmark mesh: manager, sorter, master, one worker (scaled later)."""
    host = {"DataHost": [LOOP]}
    config = {
        "_tangomesh": {"servers": {"TopologyManager/bench": {"level": 1}, "Sorter/bench": {"level": 3},
                                   "PipelineWorker/bench-01": {"level": 4}, "PipelineMaster/bench": {"level": 5}}},
        "servers": {
            "TopologyManager": {"bench": {"TopologyManager": {"tangomesh/topology/manager": {"properties": {}}}}},
            "Sorter": {"bench": {"Sorter": {"bench/pipeline/sorter": {"properties": {
                **host, "Pipeline": [PIPELINE]}}}}},
            "PipelineWorker": {"bench-01": {"PipelineWorker": {"tangomesh/bench-worker/01": {"properties": {
                "Pipeline": [PIPELINE], "Preload": ["xrd"]}}}}},
            "PipelineMaster": {"bench": {"PipelineMaster": {"bench/pipeline/master": {"properties": {
                **host, "Pipeline": [PIPELINE], "MaxQueueBytes": [str(512 * 2**20)], "Preload": ["xrd"]}}}}},
        },
    }
    path = root / "bench-mesh.json"
    path.write_text(json.dumps(config))
    return path


# --------------------------------------------------------------------------- raw baseline


def _raw_sender(endpoint: str, sizes: list[int], stop) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 5000
    push.sndtimeo = 50
    push.connect(endpoint)
    frames = [np.random.default_rng(0).bytes(n) for n in sizes]
    while not stop.is_set():
        try:
            push.send_multipart(frames, copy=False)
        except zmq.Again:
            pass
    push.close()
    ctx.term()


def raw_hop(sizes: list[int], seconds: float) -> float:
    """Messages per second of one PUSH/PULL tcp loopback hop between two
    processes, for multipart messages with these frame sizes; received the
    way raw pyzmq is fastest (copied when small, zero-copy when big)."""
    copy = sum(sizes) < 65536
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pull.rcvtimeo = 5000
    port = pull.bind_to_random_port(f"tcp://{LOOP}")
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    proc = spawn.Process(target=_raw_sender, args=(f"tcp://{LOOP}:{port}", sizes, stop), daemon=True)
    proc.start()
    try:
        t_warm = time.perf_counter() + min(0.5, seconds / 4)
        while time.perf_counter() < t_warm:
            pull.recv_multipart(copy=copy)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pull.recv_multipart(copy=copy)
            n += 1
        rate = n / (time.perf_counter() - t0)
    finally:
        stop.set()
        drain(pull)
        proc.join(10)
        pull.close(0)
    return rate


def wire_sizes(profile: profiles.Profile, block: int) -> list[list[int]]:
    """Frame sizes of one source message per stream, as the codec sends them."""
    out = []
    for stream in profile.streams:
        msg = codec.Message(codec.DATA, scan="sim-bench-0000000000000000", stream=stream, index=123456,
                            count=block, arrays=profile.values(stream, np.arange(block)))
        out.append([memoryview(f).nbytes for f in codec.encode(msg)])
    return out


# --------------------------------------------------------------------------- the run


def chosen(args: argparse.Namespace) -> list[tuple]:
    """The cases whose name contains ``--cases`` (all by default)."""
    return [c for c in CASES if not args.cases or args.cases.lower() in c[0].lower()]


def run_mode(args: argparse.Namespace, spec: mesh.MeshSpec, launcher: mesh.LocalLauncher, root: Path, auth: str,
             results: dict[str, Any]) -> None:
    """Every case with data-plane authentication ``auth`` (curve or off)."""
    security.configure(auth)  # this process's sources and probe, as the servers read it from the database
    beamlines: dict[str, simulate.SimBeamline] = {}
    try:
        mesh.up(spec, launcher, root, trusted=auth == security.OFF)
        link = TangoManagerLink(spec.topology_device)
        for workers in (1, 2, 4):
            mesh.scale_workers(spec, PIPELINE, workers, launcher, root)
            time.sleep(1.0)  # the new worker finds the master (lookup period)
            for name, profile_name, block, points_full, points_quick in chosen(args):
                if profile_name not in beamlines:
                    for other in beamlines.values():
                        other.close()
                    beamlines.clear()
                    beamlines[profile_name] = simulate.SimBeamline(PIPELINE, profile_name, link)
                beamline = beamlines[profile_name]
                points = points_quick if args.quick else points_full
                summary, _ = beamline.scan(points, block=block, timeout=600)
                lossless = summary["missing"] == 0 and summary["duplicates"] == 0 and summary["out_of_order"] == 0
                row = {"case": name, "workers": workers, "block": block, "points": points, "auth": auth,
                       "events_per_s": summary["events_per_s"], "wall_s": summary["wall_s"],
                       "lossless": lossless, "sources_blocked_s": summary["sources_blocked_s"]}
                results["throughput"].append(row)
                print(f"  [{auth}] {name:26s} workers={workers} {summary['events_per_s']:>10,.0f} events/s"
                      f" lossless={lossless}", file=sys.stderr)
        # latency at a fixed 1 kHz, one counter set per message, 2 workers
        beamline = beamlines.get("counterset") or simulate.SimBeamline(PIPELINE, "counterset", link)
        beamlines["counterset"] = beamline
        points = 3000 if args.quick else 10_000
        summary, _ = beamline.scan(points, rate=1000.0, block=1, timeout=600)
        results["latency"][auth] = {"rate_hz": 1000.0, "points": points, "workers": 2, **summary["latency_ms"],
                                    "lossless": summary["missing"] == 0 and summary["duplicates"] == 0}
        print(f"  [{auth}] latency at 1 kHz: {summary['latency_ms']}", file=sys.stderr)
    finally:
        for beamline in beamlines.values():
            beamline.close()
        mesh.down(spec, [launcher])


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["TANGOMESH_HOME"] = tempfile.mkdtemp(prefix="tangomesh-bench-")
    root = home()
    os.environ.pop("TANGO_HOST", None)
    db = EmbeddedDatabase(root)
    os.environ["TANGO_HOST"] = db.start()
    spec = mesh.MeshSpec.load(mesh_file(root))
    launcher = mesh.LocalLauncher(root)
    modes = [security.CURVE, security.OFF] if args.auth == "both" else [args.auth]
    results: dict[str, Any] = {"config": {
        "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        "cpus": os.cpu_count(), "quick": args.quick, "auth": modes}, "throughput": [], "latency": {}}
    try:
        for auth in modes:  # the whole mesh once per mode: servers read the switch when they start
            run_mode(args, spec, launcher, root, auth, results)
    finally:
        db.stop()

    # baselines, in the same run, once the mesh is down (the same CPUs, quiet)
    seconds = 1.0 if args.quick else 2.0
    baseline: dict[tuple[str, int], float] = {}
    wire_bytes: dict[str, int] = {}
    for name, profile_name, block, *_ in chosen(args):
        sizes = wire_sizes(profiles.PROFILES[profile_name], block)
        wire_bytes[name] = sum(map(sum, sizes))
        # one hop per stream message; the slowest stream bounds the events a bare hop carries
        per_stream = [raw_hop(s, seconds) for s in sizes]
        baseline[(name, block)] = min(per_stream) * block
        print(f"  raw pyzmq hop for {name}: {baseline[(name, block)]:,.0f} events/s "
              f"({[sum(s) for s in sizes]} bytes per message)", file=sys.stderr)
    for row in results["throughput"]:
        raw = baseline[(row["case"], row["block"])]
        plain = [r for r in results["throughput"] if r["auth"] == security.OFF and
                 (r["case"], r["workers"]) == (row["case"], row["workers"])]
        if row["auth"] == security.CURVE and plain:  # the cost of authentication, in the same run
            row["vs_plain"] = round(row["events_per_s"] / plain[0]["events_per_s"], 3)
        row["raw_events_per_s"] = round(raw, 1)
        row["wire_bytes_per_msg"] = wire_bytes[row["case"]]
        row["ratio"] = round(row["events_per_s"] / raw, 3)
    return results


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tangomesh pipeline, end to end (sources -> master -> workers -> sorter -> consumer)")
    for col in ("case", "workers", "auth", "events/s", "curve/off", "raw pyzmq hop events/s", "ratio",
                "wire bytes/msg", "lossless", "sources held s"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in sorted(results["throughput"], key=lambda r: (r["workers"], CASE_ORDER[r["case"]], r["auth"])):
        table.add_row(r["case"], str(r["workers"]), r["auth"], f"{r['events_per_s']:,.0f}",
                      f"{r['vs_plain']:.3f}" if "vs_plain" in r else "", f"{r['raw_events_per_s']:,.0f}",
                      f"{r['ratio']:.3f}", f"{r['wire_bytes_per_msg']:,}", str(r["lossless"]),
                      f"{r['sources_blocked_s']:.2f}")
    console = Console()
    console.print(table)
    for auth, lat in results["latency"].items():
        console.print(f"[{auth}] latency source -> consumer at {lat['rate_hz']:.0f} Hz, 1 point/msg, "
                      f"{lat['workers']} workers, {lat['points']} points: p50 {lat['p50']} ms, p90 {lat['p90']} ms, "
                      f"p99 {lat['p99']} ms, max {lat['max']} ms, lossless {lat['lossless']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points per case (~1 min)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this (e.g. XRD)")
    parser.add_argument("--auth", choices=("both", security.CURVE, security.OFF), default="both",
                        help="data-plane authentication: CurveZMQ, off, or both side by side (the default)")
    args = parser.parse_args()
    results = run(args)
    return report(args, results, print_table,
                  ok=all(r["lossless"] for r in results["throughput"])
                  and all(lat["lossless"] for lat in results["latency"].values()))


if __name__ == "__main__":
    sys.exit(main())
