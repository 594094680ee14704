"""The mesh across hosts: four network namespaces stand for a beamline's machines.

``ctrl`` holds the topology manager, the sink, the writers, the masters and
sorters; ``comp1`` and ``comp2`` the workers (every pipeline has one on each);
``det`` the detectors (the simulated beamline's sources and the command that
drives the scan). The Tango database listens on the bridge, the address of
the root namespace every host reaches. Every server runs in its host with
``DataHost`` set to the host's address: an endpoint that names 127.0.0.1 would
be the wrong machine's loopback, so nothing here works unless every
advertised endpoint is routable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from services.ops.home import EmbeddedDatabase, bin_dir
from services.ops.mesh import DEFAULT_MESH
from sink.queries import SinkClient
from support import wait_for
from support.compare import same_product
from support.hosts import NamespaceHosts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHAPE = "12x8"
POINTS = 96
SINGLE_WORKER_PIPELINES = ("position", "xrf", "xrd", "dpc")  # given a second worker, on the other compute host


def spread_mesh(hosts: NamespaceHosts) -> dict:
    """deploy/mesh.json on the hosts: workers alternate between comp1 and comp2, a
    second worker for each pipeline that has one, so that every pipeline runs on both."""
    spec = json.loads(DEFAULT_MESH.read_text())
    servers = spec["_tangomesh"]["servers"]
    workers = spec["servers"]["PipelineWorker"]
    for pipeline in SINGLE_WORKER_PIPELINES:
        first = workers[f"{pipeline}-01"]["PipelineWorker"]
        (device, entry), = first.items()
        workers[f"{pipeline}-02"] = {"PipelineWorker": {device[:-2] + "02": json.loads(json.dumps(entry))}}
        servers[f"PipelineWorker/{pipeline}-02"] = dict(servers[f"PipelineWorker/{pipeline}-01"])
    k = 0
    for name in sorted(servers):
        if name.startswith("PipelineWorker/"):
            servers[name]["host"] = "comp1" if k % 2 == 0 else "comp2"
            k += 1
        else:
            servers[name]["host"] = "ctrl"
    for server, instances in spec["servers"].items():
        for instance, classes in instances.items():
            host = hosts[servers[f"{server}/{instance}"]["host"]]
            for devices in classes.values():
                for device in devices.values():
                    if "DataHost" in device.get("properties", {}):
                        device["properties"]["DataHost"] = [host.address]
    return spec


def run(argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def tangomesh_env(home: Path, tango_host: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    env.update(TANGOMESH_HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    if tango_host:
        env["TANGO_HOST"] = tango_host
    return env


def sink_products(env: dict[str, str], scan: str) -> dict[str, np.ndarray]:
    rows = json.loads(run([str(bin_dir() / "tangomesh"), "status", "--json"], env).stdout)
    sink = next(r for r in rows if r["kind"] == "sink")
    client = SinkClient(sink["endpoints"]["query"])
    try:
        info = client.info(scan)
        assert info["status"] == "complete" and info["received"] == POINTS, info
        return {p: client.get(scan, p) for p in info["products"]}
    finally:
        client.close()


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    hosts = NamespaceHosts(("ctrl", "comp1", "comp2", "det"))
    home = tmp_path_factory.mktemp("hosts-home")
    for sub in ("logs", "run"):
        (home / sub).mkdir()
    db = EmbeddedDatabase(home, address=hosts.gateway)
    try:
        tango_host = db.start()
        mesh_file = home / "hosts.json"
        mesh_file.write_text(json.dumps(spread_mesh(hosts)))
        env = tangomesh_env(home, tango_host)
        t0 = time.monotonic()
        run([sys.executable, "-m", "support.hosts", "up", str(mesh_file), json.dumps(hosts.namespaces())], env)
        print(f"mesh up on 3 hosts in {time.monotonic() - t0:.1f} s")
        yield {"hosts": hosts, "env": env, "mesh": mesh_file, "home": home}
        subprocess.run([sys.executable, "-m", "support.hosts", "down", str(mesh_file),
                        json.dumps(hosts.namespaces())], env=env, capture_output=True, timeout=120)
    finally:
        hosts.close()
        db.stop()


def scan_from_detector_host(network, *args: str, timeout: float = 300) -> dict:
    hosts = network["hosts"]
    argv = hosts.command("det", [str(bin_dir() / "tangomesh"), "scan", "--data-host", hosts["det"].address,
                                 "--json", "--mesh", str(network["mesh"]), *args])
    return json.loads(run(argv, network["env"], timeout).stdout)


def test_a_full_scan_across_four_hosts_is_lossless_and_maps_as_on_one_host(network, tmp_path) -> None:
    across = scan_from_detector_host(network, "--sim", "full", "--shape", SHAPE, timeout=300)
    assert across["lossless"] and across["consumers"]["ok"], across
    assert sorted(across["pipelines"]) == ["counters", "dpc", "position", "xrd", "xrf"]
    spread = sink_products(network["env"], across["scan"])
    rows = json.loads(run([str(bin_dir() / "tangomesh"), "status", "--json"], network["env"]).stdout)
    # every namespace has the machine's hostname: a service's host is where its process runs
    worked = {name for name, h in network["hosts"].hosts.items() for r in rows
              if r["kind"] == "worker" and r["pid"] in h.pids() and r["counters"]["events_in"]}
    assert worked == {"comp1", "comp2"}, rows  # both compute hosts took units

    home = tmp_path / "single"  # the reference: the same scan on one host, over loopback
    env = tangomesh_env(home, None)
    tangomesh = str(bin_dir() / "tangomesh")
    run([tangomesh, "up"], env, timeout=180)
    try:
        single = json.loads(run([tangomesh, "scan", "--sim", "full", "--shape", SHAPE, "--json"], env).stdout)
        assert single["lossless"], single
        alone = sink_products(env, single["scan"])
    finally:
        run([tangomesh, "down"], env, timeout=180)
    assert sorted(alone) == sorted(spread)
    differing = [p for p in sorted(alone) if not same_product(alone[p], spread[p])]
    assert not differing, f"products that differ between one host and four: {differing}"


def test_a_compute_host_lost_mid_scan_leaves_the_topology_and_the_scan_completes_on_the_other(network) -> None:
    hosts, env = network["hosts"], network["env"]
    comp2 = hosts["comp2"]
    tangomesh = str(bin_dir() / "tangomesh")
    argv = hosts.command("det", [tangomesh, "scan", "--data-host", hosts["det"].address, "--json",
                                 "--mesh", str(network["mesh"]), "--sim", "counters", "--shape", "40x30",
                                 "--rate", "150"])
    scan = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        def busy_on_comp2() -> bool:
            rows = json.loads(run([tangomesh, "status", "--json"], env).stdout)
            on_comp2 = comp2.pids()
            return any(r["pid"] in on_comp2 and r["kind"] == "worker" and r["counters"]["events_in"] > 0
                       for r in rows)

        wait_for(busy_on_comp2, 30, "comp2's workers to take units")
        killed = comp2.kill_all()
        comp2.link_down()
        lost_at = time.monotonic()
        assert killed
        out, errors = scan.communicate(timeout=240)
    finally:
        if scan.poll() is None:
            scan.kill()
            scan.communicate()
    summary = json.loads(out)
    assert scan.returncode == 0 and summary["lossless"], (summary, errors[-2000:])
    for pipeline in ("counters", "position"):
        assert summary["pipelines"][pipeline]["points_delivered"] == 1200 and \
            summary["pipelines"][pipeline]["missing"] == 0, summary["pipelines"][pipeline]
    gone = wait_for(lambda: not any(r["pid"] in killed for r in json.loads(
        run([tangomesh, "status", "--json"], env).stdout)), 60, "comp2's services to leave the topology")
    print(f"comp2 left the topology {time.monotonic() - lost_at:.1f} s after it was cut off")
    assert gone
