"""Debian's Starter (what Astor drives) runs tangomesh servers from the embedded DB."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import tango

from support import topology_props, wait_for
from services.ops.home import pid_alive
from services.ops.starter_stats import read_statistics
from services.ops.mesh import STARTER_PATH, ServerSpec, StarterLauncher, exported_pid, put_server_info, short_hostname

TOPOLOGY = "test/starter/topology"
RECORDER = "test/starter/recorder"


@pytest.fixture
def starter(tango_db, tmp_path) -> StarterLauncher:
    assert Path(STARTER_PATH).exists(), "Debian's tango-starter must be installed (make system-deps)"
    db = tango.Database()
    for server, cls, device, props in (
        ("TopologyManager/starter", "TopologyManager", TOPOLOGY, topology_props(heartbeat=0.5, lease=3.0)),
        ("Recorder/starter", "Recorder", RECORDER, {"DataHost": "127.0.0.1", "TopologyDevice": TOPOLOGY}),
    ):
        info = tango.DbDevInfo()
        info.name, info._class, info.server = device, cls, server
        db.add_server(server, [info])
        db.put_device_property(device, {k: [str(v)] for k, v in props.items()})
    starter_device = f"tango/admin/{short_hostname()}"
    db.put_device_property(starter_device, {"StartDsPath": ["/opt/other-servers/bin"]})
    launcher = StarterLauncher(tmp_path)
    yield launcher
    for name in ("Recorder/starter", "TopologyManager/starter"):
        launcher.stop(ServerSpec(name, 1, launcher.host, ()))
    launcher.shutdown()


def running(proxy: tango.DeviceProxy) -> list[str]:
    return list(proxy.DevGetRunningServers(True))


def stopped(proxy: tango.DeviceProxy, name: str) -> bool:
    """Starter reports a stopped server MOVING until it has made sure it is gone,
    then FAULT; DevStartAll skips a server it still takes for running."""
    states = {line.split("\t")[0]: line.split("\t")[1] for line in proxy.read_attribute("Servers").value}
    return states.get(name) == "FAULT" and name in proxy.DevGetStopServers(True)


def test_starter_starts_stops_and_respects_levels(starter) -> None:
    db = tango.Database()
    proxy = starter.proxy  # declares tango/admin/<host> and runs /usr/lib/tango/Starter
    assert proxy.name() == f"tango/admin/{short_hostname()}"
    ds_path = list(db.get_device_property(proxy.name(), "StartDsPath")["StartDsPath"])
    assert ds_path[0] == "/opt/other-servers/bin" and len(ds_path) == 2  # added to, not replaced
    topology = ServerSpec("TopologyManager/starter", 1, starter.host, (TOPOLOGY,))
    recorder = ServerSpec("Recorder/starter", 2, starter.host, (RECORDER,))

    # DevStart / DevStop, as Astor's start and stop buttons do
    for server in (topology, recorder):
        proxy.DevStart(server.name)
        wait_for(lambda s=server: s.name in running(proxy), 30, f"Starter to report {server.name} running")
        put_server_info(db, server)  # a server exported once from this host becomes controlled
    proxy.UpdateServersInfo()
    manager = tango.DeviceProxy(TOPOLOGY)
    wait_for(lambda: RECORDER in [s["name"] for s in json.loads(manager.Lookup("{}"))], 15, "the recorder to register")

    def servers() -> dict[str, list[str]]:  # name -> [state, controlled, level, instances]
        return {line.split("\t")[0]: line.split("\t")[1:4] for line in proxy.read_attribute("Servers").value}

    expected = {"TopologyManager/starter": ["ON", "1", "1"], "Recorder/starter": ["ON", "1", "2"]}
    wait_for(lambda: all(servers().get(k) == v for k, v in expected.items()), 15,
             f"Starter's Servers attribute to show both controlled with their levels ({servers()})")

    pids = {s.name: exported_pid(db, s) for s in (topology, recorder)}
    assert all(pids.values())
    for server in (recorder, topology):
        proxy.DevStop(server.name)
        wait_for(lambda s=server: not pid_alive(pids[s.name]), 20, f"{server.name} to exit")
        wait_for(lambda s=server: stopped(proxy, s.name), 20, f"Starter to see {server.name} stopped")

    # DevStartAll(level) starts that level only
    proxy.DevStartAll(1)
    wait_for(lambda: "TopologyManager/starter" in running(proxy), 30, "level 1 to start")
    assert "Recorder/starter" not in running(proxy)
    assert stopped(proxy, "Recorder/starter")
    proxy.DevStartAll(2)
    wait_for(lambda: "Recorder/starter" in running(proxy), 30, "level 2 to start")
    wait_for(lambda: RECORDER in [s["name"] for s in json.loads(tango.DeviceProxy(TOPOLOGY).Lookup("{}"))],
             15, "the recorder started by level to register")

    # A server started by Starter stops cleanly on a plain SIGTERM (Starter
    # starts it with SIGTERM blocked) and deregisters on the way out; its log
    # is in Starter's LogFileHome.
    pid = wait_for(lambda: exported_pid(db, recorder), 10, "the recorder's pid")
    log_home = Path(db.get_device_property(proxy.name(), "LogFileHome")["LogFileHome"][0])
    log_file = log_home / "ds.log" / "Recorder_starter.log"
    wait_for(lambda: "registered" in log_file.read_text(), 10, f"the recorder's log in {log_file}")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 10, "the recorder to exit on SIGTERM")
    assert RECORDER not in [s["name"] for s in json.loads(tango.DeviceProxy(TOPOLOGY).Lookup("{}"))]


def test_starter_restarts_a_server_that_fails_after_auto_restart_duration(starter) -> None:
    """``AutoRestartDuration`` (minutes, tangomesh sets 1): Starter restarts a
    controlled server that fails after running longer than that, within a few
    seconds; one that fails sooner (a crash loop) it leaves stopped."""
    db = tango.Database()
    proxy = starter.proxy
    assert list(db.get_device_property(proxy.name(), "AutoRestartDuration")["AutoRestartDuration"]) == ["1"]
    topology = ServerSpec("TopologyManager/starter", 1, starter.host, (TOPOLOGY,))
    recorder = ServerSpec("Recorder/starter", 2, starter.host, (RECORDER,))
    for server in (topology, recorder):
        proxy.DevStart(server.name)
        wait_for(lambda s=server: s.name in running(proxy), 30, f"Starter to report {server.name} running")
        put_server_info(db, server)
    proxy.UpdateServersInfo()  # controlled, with a startup level: only those are restarted
    manager = tango.DeviceProxy(TOPOLOGY)

    def registered_pid() -> int | None:
        return next((s["pid"] for s in json.loads(manager.Lookup("{}")) if s["name"] == RECORDER), None)

    wait_for(lambda: registered_pid() == exported_pid(db, recorder), 15, "the recorder to register")
    states = lambda: {line.split("\t")[0]: line.split("\t")[1:3] for line in proxy.read_attribute("Servers").value}
    wait_for(lambda: states().get(recorder.name) == ["ON", "1"], 15, "Starter to see the recorder ON, controlled")
    time.sleep(65)  # Starter measures the run from when it saw the server ON; it must exceed 60 s
    pid = exported_pid(db, recorder)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    new_pid = wait_for(lambda: (p := exported_pid(db, recorder)) not in (None, pid) and p, 30,
                       "Starter to restart the killed recorder")
    wait_for(lambda: registered_pid() == new_pid, 15, "the restarted recorder to register again")
    print(f"Starter restarted the killed recorder; registered again after {time.monotonic() - killed:.1f} s")
    stats = wait_for(lambda: (r := read_statistics(starter.host).get(recorder.name)) and r["restarts"] == 1 and r,
                     10, "Starter's statistics to count the restart")  # what `tangomesh status` shows
    assert stats["last_exit"]["ran_s"] > 60

    # killed again at once: it ran less than AutoRestartDuration, Starter leaves it stopped
    os.kill(new_pid, signal.SIGKILL)
    wait_for(lambda: stopped(proxy, recorder.name), 20, "Starter to see the recorder failed")
    time.sleep(8)  # four of Starter's 2 s checks
    assert recorder.name not in running(proxy) and exported_pid(db, recorder) is None
    assert read_statistics(starter.host)[recorder.name]["restarts"] == 1
