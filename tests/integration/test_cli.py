"""`tangomesh up / status --json / down` as a user runs them, from a fresh state directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the writers' compressed datasets)
import numpy as np
import pytest

from support import wait_for
from support.compare import same_product
from services.ops.home import bin_dir, pid_alive
from services.ops.mesh import DEFAULT_MESH
from sink.queries import SinkClient
from writers.layout import read_checksums

EXPECTED = {
    "tangomesh/topology/manager": "topology",
    "tangomesh/sink/beamline": "sink",
    "tangomesh/writer/nexus": "writer",
    "tangomesh/writer/images": "writer",
    "tangomesh/writer/fio": "writer",
    "tangomesh/recorder/tap": "recorder",
    "tangomesh/counters/sorter": "sorter",
    "tangomesh/counters-worker/01": "worker",
    "tangomesh/counters-worker/02": "worker",
    "tangomesh/counters/master": "master",
    "tangomesh/position/sorter": "sorter",
    "tangomesh/position-worker/01": "worker",
    "tangomesh/position/master": "master",
    **{name: kind for pipeline in ("xrf", "xrd", "dpc") for name, kind in (
        (f"tangomesh/{pipeline}/sorter", "sorter"), (f"tangomesh/{pipeline}-worker/01", "worker"),
        (f"tangomesh/{pipeline}/master", "master"))},
}
STATUS_KEYS = {"name", "kind", "pipeline", "server", "host", "pid", "state", "endpoints", "counters", "restarts",
               "last_exit"}


def tangomesh(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    env["TANGOMESH_HOME"] = str(home)
    result = subprocess.run([str(bin_dir() / "tangomesh"), *args], env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"tangomesh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def status(home: Path) -> list[dict]:
    return json.loads(tangomesh(home, "status", "--json").stdout)


def sink_holds(home: Path, scan: str) -> dict | None:
    """``tangomesh query SCAN --json`` once the sink has the scan's end."""
    info = json.loads(tangomesh(home, "query", scan, "--json").stdout)
    return info if info["status"] == "complete" else None


def assert_all_gone(pids: list[int]) -> None:
    alive = [pid for pid in pids if pid_alive(pid)]
    assert not alive, f"processes left behind: {alive}"


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    yield path
    if (path / "run").exists():  # a failed test must not leave a mesh running
        env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
        subprocess.run([str(bin_dir() / "tangomesh"), "down"], env={**env, "TANGOMESH_HOME": str(path)},
                       capture_output=True, timeout=120)


@pytest.mark.slow
def test_up_status_down_round_trip(home) -> None:
    first = tangomesh(home, "up")
    assert "TopologyManager/mesh" in first.stdout and "started" in first.stdout
    rows = status(home)
    assert {r["name"]: r["kind"] for r in rows} == EXPECTED
    for row in rows:
        assert STATUS_KEYS <= row.keys()
        assert row["state"] == "ON", row
        assert pid_alive(row["pid"])
        assert set(row["counters"]) == {"events_in", "events_out", "errors", "queue_depth"}
        assert row["restarts"] == 0 and row["last_exit"] is None, row  # supervised, never restarted
    supervisor_pid = int((home / "run" / "supervisor.pid").read_text())
    assert pid_alive(supervisor_pid) and f"pid {supervisor_pid}" in first.stdout
    recorder = next(r for r in rows if r["kind"] == "recorder")
    assert recorder["endpoints"]["data_in"].startswith("tcp://127.0.0.1:")

    again = tangomesh(home, "up")  # idempotent: nothing restarted
    assert again.stdout.count("running") == len(EXPECTED) and "started" not in again.stdout
    assert {r["name"]: r["pid"] for r in status(home)} == {r["name"]: r["pid"] for r in rows}

    # a simulated scan through the counters and position pipelines, as a user runs it
    outcome = json.loads(tangomesh(home, "scan", "--sim", "counters", "--shape", "50x40", "--block", "20",
                                   "--json").stdout)
    assert outcome["points"] == 2000 and outcome["lossless"] and set(outcome["pipelines"]) == {"counters", "position"}
    # lossless includes the consumers' word: the sink holds it complete, every writer wrote every pipeline
    assert outcome["consumers"]["ok"] and outcome["consumers"]["sink"]["missing"] == 0
    assert {(f["writer"], f["pipeline"]) for f in outcome["consumers"]["files"]} == {
        (w, p) for w in ("tangomesh/writer/nexus", "tangomesh/writer/images", "tangomesh/writer/fio")
        for p in ("counters", "position")}
    for summary in outcome["pipelines"].values():
        assert summary["points_sent"] == summary["points_delivered"] == 2000
        assert summary["missing"] == summary["duplicates"] == summary["out_of_order"] == 0
        assert summary["events_per_s"] > 0 and set(summary["latency_ms"]) == {"p50", "p90", "p99", "max"}
    held = wait_for(lambda: sink_holds(home, outcome["scan"]), 10, "the sink to hold the whole scan")
    assert held["received"] == 2000 and held["missing"] == 0 and held["map_shape"] == [40, 50]
    counters = sorted(p.split("/")[1] for p in held["products"] if p.startswith("counters/"))
    assert counters == sorted(["i0", "it", "xbic", "xeol", "xbiv", "it_norm", "xbic_norm", "xeol_norm",
                               "transmission"])
    # BeamtimeRoot ${TANGOMESH_HOME}/beamtime, PathTemplate {processed}/{scan_name}/{scan}_{pipeline}
    scan_dir = home / "beamtime" / "processed" / held["metadata"]["scan"]["name"]
    expected_files = {f"{outcome['scan']}_{p.replace('/', '_')}.png" for p in held["products"]}
    expected_files |= {f"{outcome['scan']}_{pipeline}.{ext}" for pipeline in ("counters", "position")
                       for ext in ("nxs", "fio")}
    wait_for(lambda: set(read_checksums(scan_dir)) == expected_files, 40, "the scan's NeXus, FIO and PNG files")
    tap = next(r for r in status(home) if r["kind"] == "recorder")
    assert tap["counters"]["events_in"] >= 3  # the tap (pipeline "") is a consumer of every pipeline

    # a killed server comes back by itself: the supervisor restarts it and it registers again
    victims = {r["name"]: r["pid"] for r in rows if r["name"] in ("tangomesh/counters-worker/02",
                                                                   "tangomesh/sink/beamline")}
    killed = time.monotonic()
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)

    def restarted() -> dict | None:
        now = {r["name"]: r for r in status(home)}
        back = all(now[n]["pid"] not in (None, pid) and pid_alive(now[n]["pid"]) and now[n]["state"] == "ON"
                   for n, pid in victims.items())
        return now if back else None

    now = wait_for(restarted, 30, f"{sorted(victims)} to be restarted, ON and registered again", interval=0.2)
    print(f"killed servers back, ON and registered after {time.monotonic() - killed:.1f} s")
    for name, row in now.items():
        if name in victims:
            assert row["restarts"] == 1 and row["last_exit"]["signal"] == signal.SIGKILL, row
            assert row["last_exit"]["how"] == "killed by SIGKILL"
        else:
            assert row["restarts"] == 0 and row["pid"] == next(r["pid"] for r in rows if r["name"] == name), row
    restarted_pids = [now[n]["pid"] for n in victims]

    # scaling declares and starts a third worker, then stops the extra ones
    assert "3 worker(s)" in tangomesh(home, "scale", "counters", "3").stdout
    workers = [r for r in status(home) if r["kind"] == "worker" and r["pipeline"] == "counters"]
    assert len(workers) == 3 and all(r["state"] == "ON" for r in workers)
    third_pid = next(r["pid"] for r in workers if r["name"] == "tangomesh/counters-worker/03")
    assert "1 worker(s)" in tangomesh(home, "scale", "counters", "1").stdout
    time.sleep(2.5)  # longer than the supervisor's first restart delay: workers stopped on purpose stay stopped
    running = [r for r in status(home) if r["kind"] == "worker" and r["pipeline"] == "counters"]
    assert [r["name"] for r in running] == ["tangomesh/counters-worker/01"]
    assert not pid_alive(third_pid)
    tangomesh(home, "scale", "counters", "3")
    scaled_pids = [r["pid"] for r in status(home) if r["kind"] == "worker" and r["pipeline"] == "counters"]
    assert len(scaled_pids) == 3

    # a topology manager that does not answer: one line, never a traceback; `scan --json` still prints a summary
    absent = home / "absent-manager.json"
    absent.write_text(DEFAULT_MESH.read_text().replace("tangomesh/topology/manager", "test/absent/manager"))
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"} | {"TANGOMESH_HOME": str(home)}
    query = subprocess.run([str(bin_dir() / "tangomesh"), "query", "--mesh", str(absent)], env=env,
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert query.returncode == 1 and "Traceback" not in query.stderr, query.stderr
    assert len(query.stderr.strip().splitlines()) == 1 and "topology manager does not answer" in query.stderr
    failed = subprocess.run([str(bin_dir() / "tangomesh"), "scan", "--sim", "counters", "--shape", "4x4", "--json",
                             "--mesh", str(absent)], env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    summary = json.loads(failed.stdout)
    assert failed.returncode == 2 and not summary["lossless"] and "not registered" in summary["error"], failed.stdout

    db_pid = int((home / "run" / "databaseds.pid").read_text())
    tangomesh(home, "down")
    assert_all_gone([r["pid"] for r in rows] + scaled_pids + restarted_pids + [supervisor_pid, db_pid])
    assert not (home / "run" / "supervisor.pid").exists()
    assert status(home) == []
    assert "mesh is down" in tangomesh(home, "down").stdout  # down twice is harmless


@pytest.mark.slow
def test_up_via_starter_and_down(home) -> None:
    tangomesh(home, "up", "--via-starter")
    rows = status(home)
    assert {r["name"]: r["state"] for r in rows} == {name: "ON" for name in EXPECTED}
    starter_pid = int((home / "run" / "Starter.pid").read_text())
    assert pid_alive(starter_pid)
    db_pid = int((home / "run" / "databaseds.pid").read_text())
    tangomesh(home, "down")
    assert_all_gone([r["pid"] for r in rows] + [starter_pid, db_pid])


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_agrees_with_the_phantom(home) -> None:
    """`tangomesh demo` as `make demo` runs it (the `full` simulation through
    every pipeline), on a smaller raster: up, scan, files, summary, down."""
    result = tangomesh(home, "demo", "--shape", "30x20", "--rate", "0", "--json", timeout=300)
    report = json.loads(result.stdout)
    pipelines = {"counters", "position", "xrf", "xrd", "dpc"}
    assert report["lossless"] and report["points"] == 600 and set(report["pipelines"]) == pipelines
    for summary in report["pipelines"].values():
        assert summary["points_delivered"] == 600 and summary["failed_points"] == 0
    assert report["sink"] == {"status": "complete", "expected": 600, "received": 600, "missing": 0, "failed": 0}
    products = set(report["products"])
    assert {p.split("/")[0] for p in products} == pipelines
    assert {"counters/transmission", "position/samx", "xrf/Fe", "xrf/Pb_roi", "xrd/pattern", "xrd/Si_norm",
            "dpc/gradient_x", "dpc/phase"} <= products
    assert not report["missing_files"]
    for pipeline in pipelines:
        written = {Path(f["path"]).suffix for f in report["files"] if f["pipeline"] == pipeline}
        assert written == {".nxs", ".fio", ".png"}, pipeline
    assert all(Path(f["path"]).is_file() for f in report["files"])
    checks = {(c["product"], c["regrid"]): c for c in report["agreement"]}
    assert checks[("counters/transmission", None)]["value"] >= 0.99
    assert checks[("counters/transmission", "position")]["value"] >= 0.99
    assert checks[("position/samx", None)]["value"] >= 10 and checks[("position/samy", None)]["value"] >= 10
    failed = [c for c in report["agreement"] if not c["passed"]]
    assert not failed and report["ok"], failed
    assert status(home) == []  # taken down


def small_mesh(home: Path) -> Path:
    """The default mesh cut to the counters and position pipelines (the
    `counters` simulation's two) with the sink and one writer: a scan with
    two pipelines on a third of the processes."""
    spec = json.loads(DEFAULT_MESH.read_text())
    keep = {"TopologyManager/mesh", "Sink/beamline", "NexusWriter/beamline", "Sorter/counters", "Sorter/position",
            "PipelineWorker/counters-01", "PipelineWorker/position-01", "PipelineMaster/counters",
            "PipelineMaster/position"}
    spec["_tangomesh"]["servers"] = {k: v for k, v in spec["_tangomesh"]["servers"].items() if k in keep}
    spec["servers"] = {server: {i: v for i, v in instances.items() if f"{server}/{i}" in keep}
                       for server, instances in spec["servers"].items()}
    spec["servers"] = {k: v for k, v in spec["servers"].items() if v}
    home.mkdir(parents=True, exist_ok=True)
    path = home / "two-pipelines.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_scan_with_a_dead_master_gives_up_on_its_pipeline_alone_within_the_timeout(home) -> None:
    """`tangomesh scan --timeout T --json` while one pipeline's master is
    stopped (SIGSTOP: hung, Tango calls to it hang until their timeout), then
    killed (SIGKILL: the supervisor restarts it, without the scan): the
    command gives up on that pipeline alone, the other delivers every point,
    and a JSON summary with the consumers' verdict comes out within T."""
    mesh_file = small_mesh(home)
    tangomesh(home, "up", "--mesh", str(mesh_file))
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"} | {"TANGOMESH_HOME": str(home)}
    timeout, slack, points = 40.0, 10.0, 30 * 30
    master = next(r for r in status(home) if r["name"] == "tangomesh/position/master")

    def events_in(name: str) -> int:
        return next(r for r in status(home) if r["name"] == name)["counters"]["events_in"]

    for how in (signal.SIGSTOP, signal.SIGKILL):
        before = events_in("tangomesh/position/master")
        t0 = time.monotonic()
        scan = subprocess.Popen([str(bin_dir() / "tangomesh"), "scan", "--sim", "counters", "--shape", "30x30",
                                 "--rate", "100", "--timeout", str(timeout), "--json", "--mesh", str(mesh_file)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: events_in("tangomesh/position/master") > before + 50, 30,
                     "the position master to take the scan's first points")
            os.kill(master["pid"], how)
            out, errors = scan.communicate(timeout=timeout + slack)
        finally:
            if scan.poll() is None:
                scan.kill()
                scan.communicate()
            if how == signal.SIGSTOP:
                os.kill(master["pid"], signal.SIGCONT)
        took = time.monotonic() - t0
        print(f"{how.name}: tangomesh scan gave up on the position pipeline after {took:.1f} s (timeout {timeout} s)")
        assert took < timeout + slack
        assert scan.returncode == 2, (out, errors)
        summary = json.loads(out)  # stdout is one JSON document
        assert not summary["lossless"] and set(summary["failed"]) == {"position"}, summary
        reason = summary["failed"]["position"]
        assert ("does not answer" if how == signal.SIGSTOP else "no longer holds the scan") in reason, reason
        assert summary["pipelines"]["position"]["error"] == reason
        assert summary["pipelines"]["position"]["points_delivered"] < points
        counters = summary["pipelines"]["counters"]  # not stalled by the dead master
        assert counters["points_delivered"] == points and counters["missing"] == 0 and not counters["aborted"]
        consumers = summary["consumers"]  # every consumer's word, also on failure
        assert consumers["ok"] is False and consumers["sink"] is not None and consumers["errors"] == []
        assert "tangomesh/writer/nexus:position" in consumers["missing_files"] or any(
            f["pipeline"] == "position" and f["status"] != "complete" for f in consumers["files"]), consumers
        assert {(f["pipeline"], f["status"]) for f in consumers["files"] if f["pipeline"] == "counters"} == {
            ("counters", "complete")}, consumers
        if how == signal.SIGKILL:
            master = wait_for(lambda: next((r for r in status(home) if r["name"] == "tangomesh/position/master"
                                            and r["state"] == "ON" and r["pid"] != master["pid"]), None),
                              30, "the killed master to be restarted")
            assert master["restarts"] == 1

    # a master hung before the scan: StartScan to it is bounded by the timeout too, and the others aborted
    os.kill(master["pid"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        hung = subprocess.run([str(bin_dir() / "tangomesh"), "scan", "--sim", "counters", "--shape", "30x30",
                               "--timeout", "6", "--json", "--mesh", str(mesh_file)],
                              env=env, capture_output=True, text=True, timeout=6 + slack, stdin=subprocess.DEVNULL)
        took = time.monotonic() - t0
    finally:
        os.kill(master["pid"], signal.SIGCONT)
    print(f"StartScan to a hung master with --timeout 6 gave up after {took:.1f} s")
    summary = json.loads(hung.stdout)
    assert hung.returncode == 2 and "pipeline position: no answer within" in summary["error"], summary

    t0 = time.monotonic()
    short = subprocess.run([str(bin_dir() / "tangomesh"), "scan", "--sim", "counters", "--shape", "30x30",
                            "--rate", "100", "--timeout", "3", "--json", "--mesh", str(mesh_file)],
                           env=env, capture_output=True, text=True, timeout=3 + slack, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    print(f"a 9 s scan with --timeout 3 gave up after {took:.1f} s")
    summary = json.loads(short.stdout)
    assert short.returncode == 2 and not summary["lossless"] and "within the timeout" in summary["error"], summary
    assert set(summary["pipelines"]) == {"counters", "position"} and "sink" in summary["consumers"], summary
    tangomesh(home, "down", "--mesh", str(mesh_file))


@pytest.mark.slow
def test_a_killed_supervisor_comes_back_with_up_adopts_the_servers_and_carries_on_counting(home) -> None:
    mesh_file = small_mesh(home)
    mesh = ("--mesh", str(mesh_file))
    tangomesh(home, "up", *mesh)
    worker = "tangomesh/counters-worker/01"

    def rows() -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(tangomesh(home, "status", "--json", *mesh).stdout)}

    def back(old_pid: int, restarts: int) -> dict | None:
        row = rows()[worker]
        ok = row["pid"] not in (None, old_pid) and row["state"] == "ON" and row["restarts"] == restarts
        return row if ok else None

    first = rows()[worker]
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(lambda: back(first["pid"], 1), 30, "the worker restarted once")
    before = rows()
    state_file = home / "run" / "supervisor.json"
    assert json.loads(state_file.read_text())["servers"]["PipelineWorker/counters-01"]["restarts"] == 1

    old_supervisor = int((home / "run" / "supervisor.pid").read_text())
    os.kill(old_supervisor, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old_supervisor), 10, "the supervisor to die")
    table = tangomesh(home, "status", *mesh).stdout
    assert "supervisor: not running" in table and "tangomesh up" in table
    assert all(r["restarts"] is None for r in rows().values())  # nothing restarts them now: said so
    assert state_file.exists()  # what the next supervisor carries on from

    again = tangomesh(home, "up", *mesh)  # how the product gets its supervisor back
    assert "started" not in again.stdout.replace("pid", "")  # every server adopted, none started twice
    new_supervisor = int((home / "run" / "supervisor.pid").read_text())
    assert new_supervisor != old_supervisor and f"pid {new_supervisor}" in again.stdout
    after = rows()
    assert {n: r["pid"] for n, r in after.items()} == {n: r["pid"] for n, r in before.items()}
    assert after[worker]["restarts"] == 1 and after[worker]["last_exit"]["how"] == "killed by SIGKILL"
    assert all(r["restarts"] == 0 for n, r in after.items() if n != worker and r["server"]), after

    os.kill(after[worker]["pid"], signal.SIGKILL)  # supervised by the new one, adopted: counted on from 1
    row = wait_for(lambda: back(after[worker]["pid"], 2), 30, "the adopted worker restarted, counted on")
    assert row["last_exit"]["how"].startswith("gone (exit status unknown")  # not the new supervisor's child
    tangomesh(home, "down", *mesh)


def recording_mesh(home: Path, root: Path) -> Path:
    """The default mesh with every master recording its scans under ``root``."""
    spec = json.loads(DEFAULT_MESH.read_text())
    for instance in spec["servers"]["PipelineMaster"].values():
        for device in instance["PipelineMaster"].values():
            device["properties"]["RecordDirectory"] = [str(root)]
    home.mkdir(parents=True, exist_ok=True)
    path = home / "recording.json"
    path.write_text(json.dumps(spec))
    return path


def nexus_datasets(path: Path) -> dict[str, np.ndarray]:
    """Every numeric dataset of a NeXus file, by path below its entry (the
    entry's name carries the scan id, which a replay changes)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        for entry in f.values():
            entry.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                             and obj.dtype.kind in "biufc" else None)
    return out


#: NeXus datasets that say when or how long, not what was measured, and the
#: scan's number: a replay is a new scan and differs there.
TIMING = ("time", "duration", "latency", "wall")
IDENTITY = {"scan/number"}


@pytest.mark.slow
def test_a_recorded_full_scan_replays_into_identical_products_and_nexus_datasets(home) -> None:
    """Masters with a RecordDirectory record the `full` simulated scan (all
    five pipelines, their source streams as they came); `tangomesh replay`
    of each pipeline's recording gives the same sink products, every one,
    and the same NeXus datasets (integers bit for bit, floating point to
    the rounding of batched products)."""
    root = home / "recordings"
    mesh_file = recording_mesh(home, root)
    mesh = ("--mesh", str(mesh_file))
    tangomesh(home, "up", *mesh)
    original = json.loads(tangomesh(home, "scan", "--sim", "full", "--shape", "12x8", "--block", "5", "--json",
                                    *mesh, timeout=300).stdout)
    scan = original["scan"]
    assert original["lossless"] and original["consumers"]["ok"], original
    pipelines = sorted(original["pipelines"])
    assert pipelines == ["counters", "dpc", "position", "xrd", "xrf"]
    sink_row = next(r for r in status(home) if r["kind"] == "sink")
    client = SinkClient(sink_row["endpoints"]["query"])
    try:
        before = client.info(scan)
        for pipeline in pipelines:
            recording = root / scan / pipeline
            assert (recording / "scan.json").is_file() and list(recording.glob("*.tmrec")), recording
            replay = json.loads(tangomesh(home, "replay", str(recording), "--fast", "--json", *mesh,
                                          timeout=300).stdout)
            assert replay["lossless"] and replay["consumers"]["ok"], replay
            again = client.info(replay["scan"])
            assert again["status"] == "complete" and again["received"] == before["received"] == 96
            products = sorted(p for p in before["products"] if p.startswith(f"{pipeline}/"))
            assert products and products == sorted(again["products"]), (products, again["products"])
            for product in products:
                a, b = client.get(scan, product), client.get(replay["scan"], product)
                assert same_product(a, b), f"{product} differs after the replay"
            files = {f["pipeline"]: Path(f["path"]) for f in original["consumers"]["files"]
                     if f["path"].endswith(".nxs")}
            replayed = [Path(f["path"]) for f in replay["consumers"]["files"] if f["path"].endswith(".nxs")]
            assert len(replayed) == 1, replay["consumers"]["files"]
            first, second = nexus_datasets(files[pipeline]), nexus_datasets(replayed[0])
            measured = {k for k in first if k not in IDENTITY and not any(t in k.rsplit("/", 1)[-1] for t in TIMING)}
            assert measured and measured <= set(second), sorted(measured - set(second))
            differing = [k for k in sorted(measured) if not same_product(first[k], second[k])]
            assert not differing, f"{pipeline}: NeXus datasets differ after the replay: {differing}"
    finally:
        client.close()
    tangomesh(home, "down", *mesh)
