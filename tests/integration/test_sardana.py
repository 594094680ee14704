"""Sardana drives the mesh: a real Pool and MacroServer (``sar_demo`` motors
and counters) on the session's embedded database, the tangomesh recorder on
the MacroServer's RecorderPath, and a real pipeline, sink and NeXus writer.
Macros run through the Door as spock runs them; what arrives in the sink and
the files is checked against what Sardana itself reports."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import tango

from services.registration import TangoManagerLink, wait_registered
from services.sim.counters import Counters
from services.sim.detector import Acquisition
from services.sim.phantom import make_phantom
from services.source import SourceClient
from sink.queries import QUERY, SinkClient
from support import ServerPool, topology_props, wait_for
from support.sardana import start_sardana

MANAGER = "tangomesh/topology/manager"
PIPE = "sar"
SINK = "test/sink/sardana"
NEXUS = "test/writer/sardana"
LOOP = "127.0.0.1"
#: What the scientist sets with senv: the counters processor over channels every scan over mot01 has.
ANALYSIS = {PIPE: {"processor": "counters", "settings": {"counters": ["ct01", "mot01"]}}}
#: ... and for a mesh, over both motors and two counters.
MESH_ANALYSIS = {PIPE: {"processor": "counters", "settings": {"counters": ["ct01", "ct02", "mot01", "mot02"]}}}


@pytest.fixture(scope="module")
def beamline(tango_db, tmp_path_factory):
    """The mesh (one pipeline, sink, NeXus writer) and Sardana, once for the module."""
    root = tmp_path_factory.mktemp("sardana-beamtime")
    pool = ServerPool(tmp_path_factory.mktemp("sardana-logs"))
    try:
        pool.start("TopologyManager/sar", {"TopologyManager": {MANAGER: topology_props(heartbeat=0.5, lease=3.0)}})
        pool.start("Sink/sar", {"Sink": {SINK: {"DataHost": LOOP}}})
        pool.start("NexusWriter/sar", {"NexusWriter": {NEXUS: {"DataHost": LOOP, "Pipeline": PIPE,
                                                              "BeamtimeRoot": str(root), "FlushSeconds": 0.5}}})
        pool.start("Sorter/sar", {"Sorter": {"test/sar/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/sar", {"PipelineWorker": {"test/sar-worker/1": {"Pipeline": PIPE}}})
        pool.start("PipelineMaster/sar", {"PipelineMaster": {"test/sar/master": {"DataHost": LOOP,
                                                                                 "Pipeline": PIPE}}})
        master = tango.DeviceProxy("test/sar/master")
        wait_for(lambda: len(json.loads(master.WorkerTable)) == 1, 20, "the worker to join the master")
        link = TangoManagerLink(MANAGER)
        wait_for(lambda: {"test/sar/sorter", SINK, NEXUS} <= {s["name"] for s in link.lookup({})}, 20,
                 "sorter, sink and writer to register")
        door = start_sardana(pool, tmp_path_factory.mktemp("sardana-env"))
        door.senv("TangoMeshAnalysis", ANALYSIS)
        door.senv("TangoMeshBeamtime", {"id": "11020001", "beamline": "P06",
                                        "paths": {"raw": "raw", "processed": "processed"}})
        # as at a beamline: Sardana's own HDF5 file and the mesh, side by side (ScanFile and ScanRecorder pair up)
        door.senv("ScanDir", str(tmp_path_factory.mktemp("sardana-raw")))
        door.senv("ScanFile", ["scans.h5", "scans.tangomesh"])
        door.senv("ScanRecorder", ["NXscanH5_FileRecorder", "TangoMeshRecorder"])
        door.run("defsnap", "mot03")  # what a scientist types: the pre-scan snapshot holds mot03
        door.senv("SampleInfo", {"name": "cell7", "description": "NMC cathode"})
        client = SinkClient(json.loads(tango.DeviceProxy(SINK).Endpoints)[QUERY])
        yield door, client, root, master
        client.close()
    finally:
        pool.stop_all()


def started_scan(door) -> str:
    """The scan id the recorder reported for the last macro (its Info line)."""
    found = [m.group(1) for line in door.lines("Info") for m in [re.search(r"tangomesh: scan (\S+) started", line)]
             if m]
    assert found, f"no scan started; Error: {door.lines('Error')}; Warning: {door.lines('Warning')}"
    return found[-1]


def scan_number(door) -> int:
    """Sardana's own ScanID (the serial number of its last scan), as ``genv`` prints it."""
    door.run("genv", "ScanID")
    return int(re.search(r"ScanID =\s*(\d+)", "\n".join(door.lines("Output"))).group(1))


def last_title(door) -> str:
    """The command line of Sardana's last scan as its own ScanHistory keeps it."""
    door.run("genv", "ScanHistory")
    return re.findall(r"'title': '([^']*)'", "\n".join(door.lines("Output")))[-1]


def finished(client, scan: str) -> dict:
    return wait_for(lambda: (lambda i: i if i["status"] != "running" else None)(client.info(scan)), 60,
                    f"the sink to finish scan {scan}")


def nexus_file(scan: str) -> Path:
    """The finished NeXus file of ``scan``, as the writer lists it."""
    writer = tango.DeviceProxy(NEXUS)
    files = wait_for(lambda: [f for f in json.loads(writer.ListFiles(0)) if f["scan"] == scan], 30,
                     f"the writer to finish the file of {scan}")
    return Path(files[0]["path"])


def test_a_mesh_macro_gives_a_complete_map_and_a_file_with_the_macro_snapshot_and_serial(beamline) -> None:
    door, client, root, _ = beamline
    door.run("mv", "mot03", "1.25")
    door.senv("TangoMeshAnalysis", MESH_ANALYSIS)
    try:
        assert door.run("mesh", "mot01", "0", "1", "4", "mot02", "0", "2", "3", "0.01", "True") == tango.DevState.ON, \
            door.lines("Error")
        scan = started_scan(door)
    finally:
        door.senv("TangoMeshAnalysis", ANALYSIS)
    serial, title = scan_number(door), last_title(door)
    words = title.split()
    assert [words[i] for i in (0, 1, 4, 5, 8)] == ["mesh", "mot01", "4", "mot02", "3"]
    info = finished(client, scan)
    assert info["status"] == "complete" and info["expected"] == info["received"] == 20 and info["missing"] == 0
    assert info["map_shape"] == [4, 5]  # rows: mot02 (slow, 4 positions); columns: mot01 (fast, 5)
    doc = info["metadata"]
    geometry = doc["scan"]["geometry"]
    assert geometry["type"] == "raster" and geometry["snake"] is True
    assert [(a["name"], a["start"], a["stop"], a["points"]) for a in geometry["axes"]] == \
        [("mot01", 0.0, 1.0, 5), ("mot02", 0.0, 2.0, 4)]
    assert doc["scan"]["number"] == serial and doc["scan"]["command"] == title
    assert doc["sample"] == {"name": "cell7", "description": "NMC cathode"}
    assert doc["beamtime"]["id"] == "11020001" and doc["acquisition"]["dwell_s"] == 0.01
    assert set(doc["streams"]["sardana"]["arrays"]) >= {"mot01", "mot02", "ct01", "ct02", "timestamp"}

    # the measured motor positions land where the map says, snake rows included (Sardana ran odd rows backwards)
    fast, slow = client.get(scan, f"{PIPE}/mot01"), client.get(scan, f"{PIPE}/mot02")
    np.testing.assert_allclose(fast, np.tile(np.linspace(0, 1, 5), (4, 1)), atol=1e-6)
    np.testing.assert_allclose(slow, np.tile(np.linspace(0, 2, 4)[:, None], (1, 5)), atol=1e-6)
    counts = client.get(scan, f"{PIPE}/ct01")
    assert counts.shape == (4, 5) and np.all(np.isfinite(counts))

    with h5py.File(nexus_file(scan), "r") as f:
        entry = f["entry"]
        assert entry["scan/command"][()].decode() == title
        assert int(entry["scan/number"][()]) == serial
        assert float(entry["instrument/devices/mot03"][()]) == pytest.approx(1.25)
        assert json.loads(entry["scan_document/data"][()])["user"]["sardana"]["serialno"] == serial


def test_an_ascan_gives_a_trace_and_status_shows_the_mesh(beamline) -> None:
    door, client, _, master = beamline
    assert door.run("ascan", "mot01", "0", "2", "9", "0.01") == tango.DevState.ON, door.lines("Error")
    scan = started_scan(door)
    info = finished(client, scan)
    assert info["status"] == "complete" and info["received"] == 10 and info["map_shape"] == [10]
    assert info["failed"] == 0, info
    doc = info["metadata"]
    assert doc["scan"]["geometry"]["type"] == "line"
    trace = client.get(scan, f"{PIPE}/mot01")
    np.testing.assert_allclose(trace, np.linspace(0, 2, 10), atol=1e-6)
    # Sardana's own file of the same scan holds the same motor positions and counts
    with h5py.File(Path(doc["user"]["sardana"]["scan_dir"]) / "scans.h5", "r") as f:
        measured = f[f"entry{doc['scan']['number']}/measurement"]
        np.testing.assert_allclose(trace, measured["mot01"][()])
        np.testing.assert_allclose(client.get(scan, f"{PIPE}/ct01"), measured["ct01"][()])

    wait_for(lambda: json.loads(master.OpenScans) == [], 20, "the master to close the scan")
    door.run("tangomesh_status")
    status = "\n".join(door.lines("Output"))
    assert f"pipeline {PIPE}: up" in status and "test/sar/master: 0 open scan(s)" in status and "1 worker(s)" in status


@pytest.mark.parametrize("how, ended, word", [("StopMacro", "stop", "stopped"), ("AbortMacro", "abort", "aborted")])
def test_a_stopped_macro_aborts_the_scan_everywhere_with_the_reason(beamline, how, ended, word) -> None:
    door, client, root, master = beamline
    door.start("ascan", "mot01", "0", "10", "200", "0.05")
    wait_for(lambda: door.lines("Info") and started_scan(door), 30, "the scan to start")
    scan = started_scan(door)
    wait_for(lambda: client.info(scan)["received"] >= 3, 30, "the first points in the sink")
    door.proxy.command_inout(how)
    door.wait(60)
    assert door.ended_as() == ended
    info = finished(client, scan)
    assert info["status"] == "aborted" and 3 <= info["received"] < 201
    reason = info["runs"][PIPE]["summary"]["reason"]
    assert re.search(rf"'ascan mot01 0(\.0)? 10(\.0)? 200 0\.05' {word} after \d+ of 201 points", reason), reason
    assert master.CurrentScan == scan and scan not in [s["scan"] for s in json.loads(master.OpenScans)]
    with h5py.File(nexus_file(scan), "r") as f:
        assert f["entry/process/status"][()].decode() == "aborted"
        assert word in json.loads(f["entry/process/summary/data"][()])["reason"]


def test_abort_scan_refuses_a_malformed_reason_and_keeps_running(beamline) -> None:
    master = beamline[3]
    errors = master.Errors
    for bad, why in (('{"scan": 7}', "invalid abort: at scan"), ('{"scan": "s", "because": "x"}', "invalid abort"),
                     ("{broken", "not JSON")):
        with pytest.raises(tango.DevFailed, match=why):
            master.AbortScan(bad)
    assert master.Errors == errors + 3 and master.state() != tango.DevState.FAULT


class SimulatedDetector(threading.Thread):
    """A detector streaming to the mesh by itself, as an ingester does: it
    learns the scan from the master's OpenScans, then sends one block per row
    of the simulated beamline's counters (services/sim) where the beam is at
    each point of a snake mesh over ``fast`` x ``slow``; the master joins it
    with the Sardana stream by acquisition index."""

    def __init__(self, link: TangoManagerLink, before: set[str], fast: np.ndarray, slow: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.source = SourceClient("counters", PIPE, link, LOOP, prefix="simdet")
        wait_registered(self.source.registration)
        self.before, self.fast, self.slow = before, fast, slow
        self.detector = Counters(make_phantom(seed=3, size_um=10.0))
        self.sent: dict[str, list[np.ndarray]] = {}
        self.scan = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            master = tango.DeviceProxy("test/sar/master")
            self.scan = wait_for(lambda: next((s["scan"] for s in json.loads(master.OpenScans)
                                               if s["scan"] not in self.before), None), 60, "the Sardana scan to open")
            cols = len(self.fast)
            for row, y in enumerate(self.slow):
                x = self.fast[::-1] if row % 2 else self.fast  # Sardana runs the odd rows of a bidirectional mesh back
                index = np.arange(row * cols, (row + 1) * cols)
                acq = Acquisition(index, index * 0.01, x, np.full(cols, y), np.ones(cols), np.full(cols, 1e6), 0.01)
                arrays = self.detector.acquire(acq, np.random.default_rng(row))
                for name, values in arrays.items():
                    self.sent.setdefault(name, []).append(values)
                self.source.block(self.scan, row * cols, arrays, timeout=30)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc


def test_a_mesh_with_a_detector_streaming_itself_gives_maps_of_both(beamline) -> None:
    """Scans that span tools: Sardana's motors and a detector that streams to
    the mesh on its own are joined by acquisition index into one map."""
    door, client, _, _ = beamline
    fast, slow = np.linspace(0, 8, 5), np.linspace(0, 6, 4)
    detector = SimulatedDetector(TangoManagerLink(MANAGER), {s["scan"] for s in client.list()["scans"]}, fast, slow)
    door.senv("TangoMeshAnalysis", {PIPE: {"processor": "counters", "streams": ["sardana", "counters"],
                                           "settings": {"counters": ["sardana/mot01", "counters/i0", "counters/xbic"],
                                                        "not_normalised": ["mot01"]}}})
    try:
        detector.start()
        assert door.run("mesh", "mot01", "0", "8", "4", "mot02", "0", "6", "3", "0.01", "True") == tango.DevState.ON, \
            door.lines("Error")
        scan = started_scan(door)
        detector.join(30)
    finally:
        door.senv("TangoMeshAnalysis", ANALYSIS)
        detector.source.close()  # a source left registered would join every later scan of the pipeline
    assert detector.error is None and detector.scan == scan
    info = finished(client, scan)
    assert info["status"] == "complete" and info["received"] == 20 and info["map_shape"] == [4, 5]
    expected = np.stack(detector.sent["xbic"])  # rows in acquisition order
    expected[1::2] = expected[1::2, ::-1]  # snake rows back into map orientation
    np.testing.assert_allclose(client.get(scan, f"{PIPE}/xbic"), expected)
    np.testing.assert_allclose(client.get(scan, f"{PIPE}/mot01"), np.tile(fast, (4, 1)), atol=1e-6)
    assert np.ptp(expected) > 0  # the phantom's structure, not a constant


def test_a_scan_with_a_pipeline_down_fails_at_start_naming_it(beamline) -> None:
    door, client, _, _ = beamline
    before = {s["scan"] for s in client.list()["scans"]}
    down = {"processor": "counters", "settings": {"counters": ["ct01"]}}
    door.senv("TangoMeshAnalysis", {**ANALYSIS, "xrfdown": down})
    try:
        door.run("ascan", "mot01", "0", "1", "3", "0.01")
        errors = "\n".join(door.lines("Error"))
        assert "pipeline xrfdown is down" in errors and "no master" in errors
        assert not any("tangomesh: scan" in line and "started" in line for line in door.lines("Info"))
        assert {s["scan"] for s in client.list()["scans"]} == before  # nothing started anywhere
    finally:
        door.senv("TangoMeshAnalysis", ANALYSIS)
