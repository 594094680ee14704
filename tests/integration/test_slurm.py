"""Workers as Slurm jobs, against a real single-node Slurm (Debian's slurmctld, slurmd, munge).

A small mesh (the counters pipeline and the sink) runs on this host; ``tangomesh
scale counters 3 --slurm`` adds two workers as batch jobs. They register from
their node and take units like the local one; a ``scancel`` of a busy job
loses no point (the master re-dispatches what it held); scaling down cancels
the jobs and Slurm forgets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import tango

from services.ops.home import bin_dir, pid_alive
from services.ops.mesh import DEFAULT_MESH
from support import wait_for
from support.slurm import SlurmCluster

pytestmark = pytest.mark.slow

KEEP = {"TopologyManager/mesh", "Sink/beamline", "Sorter/counters", "PipelineWorker/counters-01",
        "PipelineMaster/counters"}
JOBS = "tangomesh-counters-"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    t0 = time.monotonic()
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    print(f"Slurm up in {time.monotonic() - t0:.1f} s")
    yield slurm
    slurm.close()


def counters_mesh(home: Path, autoscaled: bool = False) -> Path:
    """The counters pipeline and the sink of deploy/mesh.json; ``autoscaled``: with a
    slow worker (50 ms per unit of at most 10 points), a small burst queue, and
    an Autoscaler submitting Slurm workers."""
    spec = json.loads(DEFAULT_MESH.read_text())
    spec["_tangomesh"]["servers"] = {k: v for k, v in spec["_tangomesh"]["servers"].items() if k in KEEP}
    spec["servers"] = {server: {i: v for i, v in instances.items() if f"{server}/{i}" in KEEP}
                       for server, instances in spec["servers"].items()}
    spec["servers"] = {k: v for k, v in spec["servers"].items() if v}
    home.mkdir(parents=True, exist_ok=True)
    path = home / "counters.json"
    if autoscaled:
        master = spec["servers"]["PipelineMaster"]["counters"]["PipelineMaster"]["tangomesh/counters/master"]
        master["properties"].update(MaxQueueBytes=["32768"], MaxUnitPoints=["10"])
        worker = spec["servers"]["PipelineWorker"]["counters-01"]["PipelineWorker"]["tangomesh/counters-worker/01"]
        worker["properties"]["ProcessingDelaySeconds"] = ["0.05"]
        spec["servers"]["Autoscaler"] = {"counters": {"Autoscaler": {"tangomesh/counters/autoscaler": {"properties": {
            "Pipeline": ["counters"], "MinWorkers": ["1"], "MaxWorkers": ["3"], "UpAfterSeconds": ["1"],
            "CooldownSeconds": ["2"], "IdleDownSeconds": ["8"], "Backend": ["slurm"], "MeshFile": [str(path)],
            "SlurmTimeLimit": ["30"], "SlurmMemMB": ["500"]}}}}}
        spec["_tangomesh"]["servers"]["Autoscaler/counters"] = {"level": 6}
    path.write_text(json.dumps(spec))
    return path


class Mesh:
    """``tangomesh`` commands on one home and mesh file, as a user runs them."""

    def __init__(self, home: Path, mesh_file: Path) -> None:
        self.mesh_file = mesh_file
        self.env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"} | {"TANGOMESH_HOME": str(home)}

    def run(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run([str(bin_dir() / "tangomesh"), *args, "--mesh", str(self.mesh_file)], env=self.env,
                                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"tangomesh {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def rows(self) -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(self.run("status", "--json"))}


def test_slurm_workers_join_do_work_survive_a_scancel_without_loss_and_leave_when_scaled_down(cluster,
                                                                                             tmp_path) -> None:
    home = tmp_path / "home"
    mesh_file = counters_mesh(home)
    mesh = Mesh(home, mesh_file)
    run, rows, env, tangomesh = mesh.run, mesh.rows, mesh.env, str(bin_dir() / "tangomesh")

    run("up")
    try:
        t0 = time.monotonic()
        run("scale", "counters", "3", "--slurm", "--time", "30", "--cpus", "1", "--mem", "500")
        print(f"two Slurm workers submitted and registered in {time.monotonic() - t0:.1f} s")
        jobs = cluster.jobs(JOBS)
        assert sorted(jobs.values()) == ["RUNNING", "RUNNING"], jobs
        slurm_workers = ["tangomesh/counters-worker/02", "tangomesh/counters-worker/03"]
        assert all(rows()[w]["state"] == "ON" for w in slurm_workers)
        job_of = {w: (home / "run" / f"PipelineWorker_counters-{w[-2:]}.slurm").read_text().strip()
                  for w in slurm_workers}
        assert set(job_of.values()) == set(jobs)
        for log in (home / "logs").glob("PipelineWorker_counters-0[23]-*.log"):
            assert log.stat().st_size > 0  # the jobs' output is kept beside the other servers' logs

        scan = subprocess.Popen([tangomesh, "scan", "--sim", "counters", "--pipelines", "counters", "--shape",
                                 "40x30", "--rate", "150", "--json", "--mesh", str(mesh_file)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            busy = wait_for(lambda: next((w for w in slurm_workers if rows()[w]["counters"]["events_in"] > 0), None),
                            30, "a Slurm worker to take units")
            pid = rows()[busy]["pid"]
            subprocess.run(["scancel", job_of[busy]], check=True, timeout=20)
            out, errors = scan.communicate(timeout=180)
        finally:
            if scan.poll() is None:
                scan.kill()
                scan.communicate()
        summary = json.loads(out)
        assert scan.returncode == 0 and summary["lossless"], (summary, errors[-2000:])
        counters = summary["pipelines"]["counters"]
        assert counters["points_delivered"] == 1200 and counters["missing"] == 0 and counters["duplicates"] == 0
        assert not pid_alive(pid)
        assert job_of[busy] not in cluster.jobs(JOBS) or cluster.jobs(JOBS)[job_of[busy]] != "RUNNING"
        other = next(w for w in slurm_workers if w != busy)
        assert rows()[other]["counters"]["events_in"] > 0  # the remaining Slurm worker took units too

        run("scale", "counters", "1", "--slurm")
        wait_for(lambda: not cluster.jobs(JOBS), 30, "Slurm to let the scaled-down jobs go")
        assert not any(w in rows() for w in slurm_workers)
        assert rows()["tangomesh/counters-worker/01"]["state"] == "ON"
    finally:
        run("down", timeout=180)


def test_the_autoscaler_submits_slurm_workers_for_a_burst_and_cancels_them_after_it_losing_nothing(
        cluster, tmp_path) -> None:
    """One slow worker (200 points/s) and a scan sent at 600 points/s: the
    master holds its sources back, the Autoscaler adds Slurm workers (up to 3),
    they take units; once the pipeline has been idle for 8 s it cancels them again."""
    home = tmp_path / "home"
    mesh_file = counters_mesh(home, autoscaled=True)
    mesh = Mesh(home, mesh_file)
    run, rows = mesh.run, mesh.rows

    run("up")
    try:
        t0 = time.monotonic()
        out = run("scan", "--sim", "counters", "--pipelines", "counters", "--shape", "60x40", "--rate", "600",
                  "--json", timeout=300)
        took = time.monotonic() - t0
        summary = json.loads(out)
        assert summary["lossless"], summary
        counters = summary["pipelines"]["counters"]
        assert counters["points_delivered"] == 2400 and counters["missing"] == 0 and counters["duplicates"] == 0
        tango_host = (home / "tango_host").read_text().strip()  # the mesh's own database, named in full
        autoscaler = tango.DeviceProxy(f"tango://{tango_host}/tangomesh/counters/autoscaler")
        ups = [d for d in json.loads(autoscaler.Decisions) if d["workers_to"] > d["workers_from"]]
        assert ups and all("sources held back" in d["reason"] or "queue" in d["reason"] for d in ups), ups
        assert max(d["workers_to"] for d in ups) >= 2
        snapshot = rows()  # once: IdleDownSeconds after the scan the autoscaler lets the added workers go
        scaler = snapshot["tangomesh/counters/autoscaler"]
        assert scaler["kind"] == "autoscaler" and scaler["state"] == "ON"
        added = [w for w in snapshot if w.startswith("tangomesh/counters-worker/") and w != "tangomesh/counters-worker/01"]
        worked = [w for w in added if snapshot[w]["counters"]["events_in"] > 0]
        print(f"scan of 2400 points in {took:.1f} s; decisions {[(d['workers_to'], d['reason']) for d in ups]}; "
              f"Slurm workers {added}, {len(worked)} took units")
        assert worked, "the Slurm workers the autoscaler added took no units"
        assert cluster.jobs(JOBS), "no Slurm job for the added workers"

        # idle: back to the one local worker, the Slurm jobs cancelled
        wait_for(lambda: not cluster.jobs(JOBS), 60, "the autoscaler to cancel the Slurm workers")
        last = wait_for(lambda: (d := rows()["tangomesh/counters/autoscaler"]["decision"]) and d["workers_to"] == 1
                        and d, 30, "the scale-down decision")
        assert "idle" in last["reason"] and last["workers_from"] > 1, last
        assert [w for w in rows() if w.startswith("tangomesh/counters-worker/")] == ["tangomesh/counters-worker/01"]
    finally:
        run("down", timeout=180)
