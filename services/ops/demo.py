"""``tangomesh demo``: the whole system on one machine, one command.

Starts the embedded Tango database and the mesh (as ``tangomesh up``), runs a
simulated raster over the phantom through every pipeline with a live progress
display, says where to point Lavue, waits for the writers' files, prints a
summary (points, rates, latency, files, agreement with the phantom per
product) and takes the mesh down again, unless ``--keep``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.ops import mesh
from services.sim import agreement
from services.ops.driver import ScanDriver, ScanOutcome
from services.sim.sims import Simulation
from services.ops.home import EmbeddedDatabase, resolve_tango_host
from services.registration import TangoManagerLink
from services.ops.verdicts import ConsumerVerdict, sink_client, wait_for_files, wait_sink_complete

@dataclass
class DemoReport:
    outcome: ScanOutcome
    sink: dict[str, Any]  # the sink's info on the scan
    files: list[dict[str, Any]]  # the writers' records of this scan's files
    missing_files: list[str]  # writer/pipeline pairs that wrote nothing in time
    agreement: list[agreement.Result]
    lavue: str = ""

    @property
    def ok(self) -> bool:
        consumers = ConsumerVerdict(self.sink, self.files, self.missing_files)
        return self.outcome.lossless and consumers.ok and all(r.passed for r in self.agreement)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, **self.outcome.to_json(),
                "sink": {k: self.sink.get(k) for k in ("status", "expected", "received", "missing", "failed")},
                "products": sorted(self.sink.get("products", {})),
                "files": [{k: f[k] for k in ("path", "bytes", "pipeline")} for f in self.files],
                "missing_files": self.missing_files, "lavue": self.lavue,
                "agreement": [{"product": r.check.product, "truth": r.check.truth, "measure": r.check.measure,
                               "regrid": r.check.regrid, "value": r.value, "threshold": r.check.threshold,
                               "passed": r.passed} for r in self.agreement]}


def run_scan(sim: Simulation, link: TangoManagerLink, console: Console, rate: float, block: int = 1,
             timeout: float = 300.0, scan_id: str | None = None, quiet: bool = False,
             file_timeout: float = 60.0) -> DemoReport:
    """One simulated scan through the running mesh, checked against the phantom."""
    scan_id = scan_id or f"demo-{sim.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    client, lavue = sink_client(link)
    driver = ScanDriver.for_data(sim, link)
    try:
        if not quiet:
            console.print(f"[bold]scan {scan_id}[/]: {sim.name}, {' x '.join(map(str, sim.pattern.map_shape[::-1]))} "
                          f"points{' snake' if sim.pattern.snake else ''}, pipelines {', '.join(driver.pipelines)}")
            if lavue:
                console.print(f"Lavue: source [cyan]ZMQ Stream[/], address [cyan]{lavue}:<product>[/] "
                              f"(e.g. {lavue}:counters/transmission); products also as Tango image attributes "
                              "of the sink device")
        columns = (TextColumn("{task.description:>18}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:>8} pts/s"), TimeElapsedColumn())
        with Progress(*columns, console=console, disable=quiet, transient=False) as bar:
            points = sim.pattern.points
            sent = bar.add_task("sent", total=points, rate="-")
            tasks = {p: bar.add_task(f"{p} delivered", total=points, rate="-") for p in driver.pipelines}
            t0 = time.monotonic()

            def progress(n_sent: int, delivered: dict[str, int]) -> None:
                elapsed = max(time.monotonic() - t0, 1e-9)
                bar.update(sent, completed=n_sent, rate=f"{n_sent / elapsed:.0f}")
                for p, n in delivered.items():
                    bar.update(tasks[p], completed=n, rate=f"{n / elapsed:.0f}")

            number = int(time.time()) % 100_000
            outcome = driver.run(sim, scan_id, number, rate=rate, block=block, timeout=timeout, progress=progress)
            progress(points, driver.delivered(scan_id))
        info = wait_sink_complete(client, scan_id, 30.0)
        files, missing, unanswered = wait_for_files(link, scan_id, driver.pipelines, file_timeout)
        missing += unanswered  # a writer that did not answer made no file the demo can show

        def fetch(product: str, regrid: str | None) -> np.ndarray:
            return np.asarray(client.get(scan_id, product, regrid=regrid), dtype=np.float64)

        results = agreement.evaluate(sim, fetch)
    finally:
        driver.close()
        client.close()
    return DemoReport(outcome, info, files, missing, results, lavue)


def print_report(report: DemoReport, console: Console) -> None:
    o = report.outcome
    table = Table(title=f"scan {o.scan}: {o.points} points in {o.wall_s:.1f} s, "
                        f"{o.sent_bytes / 2**20:.0f} MiB sent, sources held back {o.blocked_s:.1f} s")
    for column in ("pipeline", "delivered", "missing", "failed", "pts/s", "latency p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for pipeline, s in o.per_pipeline.items():
        latency = s.get("latency_ms", {})
        table.add_row(pipeline, str(s["points_delivered"]), str(s["missing"]), str(s["failed_points"]),
                      f"{s['events_per_s']:.0f}",
                      *(f"{latency.get(q, float('nan')):.0f}" for q in ("p50", "p99", "max")))
    console.print(table)

    files = Table(title=f"files written ({len(report.files)})")
    for column in ("writer", "pipeline", "files", "MiB", "example"):
        files.add_column(column, justify="right" if column in ("files", "MiB") else "left")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in report.files:
        groups.setdefault((f["writer"].rsplit("/", 1)[-1], f["pipeline"]), []).append(f)
    for (writer, pipeline), group in sorted(groups.items()):
        files.add_row(writer, pipeline, str(len(group)), f"{sum(f['bytes'] for f in group) / 2**20:.2f}",
                      Path(group[0]["path"]).name)
    for pair in report.missing_files:
        files.add_row(pair.split(":")[0].rsplit("/", 1)[-1], pair.split(":")[1], "0", "-", "[red]nothing written[/]")
    console.print(files)

    truth = Table(title="agreement with the phantom")
    for column in ("product", "compared with", "measure", "value", "needed", ""):
        truth.add_column(column, justify="right" if column in ("value", "needed") else "left")
    for r in report.agreement:
        product = r.check.product + (f" (regridded on {r.check.regrid})" if r.check.regrid else "")
        measure = "Pearson r" if r.check.measure == "pearson" else "RMS error, x fewer"
        value = f"{r.value:.4f}" if r.check.measure == "pearson" else f"{r.value:.1f}"
        truth.add_row(product, r.check.truth, measure, value,
                      f"{r.check.threshold:g}", "[green]ok[/]" if r.passed else "[red]FAIL[/]")
    console.print(truth)
    sink = report.sink
    console.print(f"sink: scan {sink.get('status')}, {sink.get('received')}/{sink.get('expected')} points, "
                  f"{len(sink.get('products', {}))} products; "
                  + ("[green]nothing lost[/]" if report.ok else "[red]problems above[/]"))


def demo(sim: Simulation, mesh_file: Path, root: Path, console: Console, rate: float, keep: bool,
         as_json: bool = False, timeout: float = 300.0) -> int:
    spec = mesh.MeshSpec.load(mesh_file)
    tango_host, embedded = resolve_tango_host(root)
    started = time.monotonic()
    try:
        with console.status("starting the mesh (embedded Tango database, device servers)...", spinner="dots"):
            mesh.up(spec, mesh.LocalLauncher(root), root)
        if not as_json:
            console.print(f"mesh up on TANGO_HOST={tango_host}{' (embedded)' if embedded else ''} "
                          f"in {time.monotonic() - started:.1f} s")
        link = TangoManagerLink(spec.topology_device)
        report = run_scan(sim, link, console, rate, timeout=timeout, quiet=as_json)
        if as_json:
            print(json.dumps(report.to_json(), indent=1))
        else:
            print_report(report, console)
        if keep and not as_json:
            console.print(f"the mesh keeps running (--keep): export TANGO_HOST={tango_host}; "
                          "`tangomesh status`, `tangomesh query`, Lavue as above; `tangomesh down` to stop")
        return 0 if report.ok else 2
    finally:
        if not keep:
            with console.status("taking the mesh down...", spinner="dots"):
                mesh.down(spec, [mesh.StarterLauncher(root), mesh.LocalLauncher(root)])
                if embedded:
                    EmbeddedDatabase(root).stop()
