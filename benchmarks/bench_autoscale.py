#!/usr/bin/env python
"""How fast the Autoscaler answers a step in load, on this host (local backend).

A real mesh (embedded Tango DB, one process per server): a pipeline whose
worker is slowed to about 200 points/s (50 ms per unit of at most 10 points),
a small burst queue, and an Autoscaler (MinWorkers 1, MaxWorkers 4,
UpAfterSeconds 1, CooldownSeconds 2, IdleDownSeconds 3) that starts local
worker servers. First a scan the one worker keeps up with (100 points/s), then
a step to 700 points/s. Measured: when each decision came after the step,
when the added workers took their first units, the pipeline's throughput
before and after, and how long after the scan the pipeline was back to one
worker; every scan checked lossless.

    python benchmarks/bench_autoscale.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import report  # noqa: E402 - beside this script

import tango  # noqa: E402

from services.ops import mesh, simulate  # noqa: E402
from services.ops.home import EmbeddedDatabase, home  # noqa: E402
from services.registration import TangoManagerLink  # noqa: E402

PIPELINE = "bench"
LOOP = "127.0.0.1"
AUTOSCALER = "bench/pipeline/autoscaler"
MASTER = "bench/pipeline/master"


def mesh_file(root: Path) -> Path:
    path = root / "autoscale-mesh.json"
    host = {"DataHost": [LOOP]}
    config = {
        "_tangomesh": {"servers": {"TopologyManager/bench": {"level": 1}, "Sorter/bench": {"level": 3},
                                   "PipelineWorker/bench-01": {"level": 4}, "PipelineMaster/bench": {"level": 5},
                                   "Autoscaler/bench": {"level": 6}}},
        "servers": {
            "TopologyManager": {"bench": {"TopologyManager": {"tangomesh/topology/manager": {"properties": {}}}}},
            "Sorter": {"bench": {"Sorter": {"bench/pipeline/sorter": {"properties": {
                **host, "Pipeline": [PIPELINE]}}}}},
            "PipelineWorker": {"bench-01": {"PipelineWorker": {"tangomesh/bench-worker/01": {"properties": {
                "Pipeline": [PIPELINE], "ProcessingDelaySeconds": ["0.05"]}}}}},
            "PipelineMaster": {"bench": {"PipelineMaster": {MASTER: {"properties": {
                **host, "Pipeline": [PIPELINE], "MaxQueueBytes": ["32768"], "MaxUnitPoints": ["10"]}}}}},
            "Autoscaler": {"bench": {"Autoscaler": {AUTOSCALER: {"properties": {
                "Pipeline": [PIPELINE], "MinWorkers": ["1"], "MaxWorkers": ["4"], "UpAfterSeconds": ["1"],
                "CooldownSeconds": ["2"], "IdleDownSeconds": ["3"], "MeshFile": [str(path)]}}}}},
        },
    }
    path.write_text(json.dumps(config))
    return path


def watch_workers(stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    master = tango.DeviceProxy(MASTER)
    while not stop.is_set():
        try:
            samples.append((time.time(), int(master.Workers)))
        except tango.DevFailed:
            pass
        stop.wait(0.2)


def run() -> dict[str, Any]:
    os.environ["TANGOMESH_HOME"] = tempfile.mkdtemp(prefix="tangomesh-bench-")
    root = home()
    os.environ.pop("TANGO_HOST", None)
    db = EmbeddedDatabase(root)
    os.environ["TANGO_HOST"] = db.start()
    spec = mesh.MeshSpec.load(mesh_file(root))
    launcher = mesh.LocalLauncher(root)
    out: dict[str, Any] = {"config": {"cpus": os.cpu_count(), "worker_points_per_s": 200}}
    beamline = None
    try:
        mesh.up(spec, launcher, root, trusted=True)
        link = TangoManagerLink(spec.topology_device)
        beamline = simulate.SimBeamline(PIPELINE, "counters", link)
        scans = []
        for name, rate, points in (("keeps up", 100.0, 500), ("step", 700.0, 4200)):
            samples: list[tuple[float, int]] = []
            stop = threading.Event()
            watcher = threading.Thread(target=watch_workers, args=(stop, samples), daemon=True)
            watcher.start()
            t0 = time.time()
            summary, _ = beamline.scan(points, rate=rate, block=1, timeout=300)
            stop.set()
            watcher.join(2)
            decisions = [d for d in json.loads(tango.DeviceProxy(AUTOSCALER).Decisions) if d["at"] >= t0]
            lossless = summary["missing"] == 0 and summary["duplicates"] == 0 and summary["out_of_order"] == 0
            scans.append({"scan": name, "rate": rate, "points": points, "events_per_s": summary["events_per_s"],
                          "wall_s": summary["wall_s"], "lossless": lossless,
                          "decisions": [{"after_s": round(d["at"] - t0, 2), "to": d["workers_to"],
                                         "reason": d["reason"]} for d in decisions],
                          "workers_seen": sorted({n for _, n in samples}),
                          "first_seen_s": {n: round(min(t for t, k in samples if k == n) - t0, 2)
                                           for n in {k for _, k in samples}}})
        t_end = time.time()
        back = None
        while time.time() - t_end < 60:
            if int(tango.DeviceProxy(MASTER).Workers) == 1:
                back = round(time.time() - t_end, 2)
                break
            time.sleep(0.2)
        out.update(scans=scans, back_to_one_worker_after_s=back)
    finally:
        if beamline is not None:
            beamline.close()
        mesh.down(spec, [launcher])
        db.stop()
    return out


def print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Autoscaler (local backend): a step from 100 to 700 points/s, one worker does 200")
    for col in ("scan", "points/s sent", "events/s through", "lossless", "decisions (s after start -> workers)",
                "workers first seen (s)"):
        table.add_column(col)
    for s in results["scans"]:
        table.add_row(s["scan"], f"{s['rate']:.0f}", f"{s['events_per_s']:,.0f}", str(s["lossless"]),
                      ", ".join(f"{d['after_s']} -> {d['to']}" for d in s["decisions"]) or "-",
                      ", ".join(f"{n}: {t}" for n, t in sorted(s["first_seen_s"].items())))
    console = Console()
    console.print(table)
    console.print(f"back to one worker {results['back_to_one_worker_after_s']} s after the step scan ended")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = run()
    return report(args, results, print_tables, ok=all(s["lossless"] for s in results["scans"]))


if __name__ == "__main__":
    sys.exit(main())
