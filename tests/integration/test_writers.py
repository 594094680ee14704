"""The writers end to end: real TopologyManager, pipeline, Sink and writer
processes; files compared with the sink's arrays, a writer killed with
SIGKILL mid-scan, a second writer aimed at the same files, and paths that try
to leave the beamtime root."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Callable

import h5py
import hdf5plugin  # noqa: F401  (readers need the Bitshuffle filter registered, as users do)
import numpy as np
import pytest
import tango
import zmq
from matplotlib.image import imread

from support import ServerHandle, ServerPool, topology_props, wait_for
from services import protocol
from services import codec
from services.ops import simulate
from services.sim.profiles import PROFILES, ProfileScan
from services.registration import TangoManagerLink
from sink.queries import QUERY, SinkClient
from writers.fio import read_fio
from writers.layout import FileClaim, read_checksums

MANAGER = "tangomesh/topology/manager"
PIPE = "w1"
LOOP = "127.0.0.1"
NEXUS, FIO, IMAGES = "test/writer/nexus", "test/writer/fio", "test/writer/images"
SINK = "test/sink/writers"


def raster(rows: int, cols: int, snake: bool = True) -> dict:
    return {"type": "raster", "snake": snake, "axes": [
        {"name": "samx", "units": "um", "start": 0.0, "stop": (cols - 1) * 0.5, "points": cols},
        {"name": "samy", "units": "um", "start": 5.0, "stop": 5.0 + (rows - 1) * 0.25, "points": rows}]}


def in_acquisition_order(grid: np.ndarray) -> np.ndarray:
    """A snake map back into measurement order (odd rows ran backwards)."""
    rows = grid.copy()
    rows[1::2] = rows[1::2, ::-1]
    return rows.reshape(-1)


def writer_props(root: Path, **more) -> dict:
    return {"DataHost": LOOP, "Pipeline": PIPE, "BeamtimeRoot": str(root), **more}


def files_of(device: tango.DeviceProxy, scan: str) -> list[dict]:
    return [f for f in json.loads(device.ListFiles(0)) if f["scan"] == scan]


def manager_server() -> tuple[str, dict]:
    return "TopologyManager/writers", {"TopologyManager": {MANAGER: topology_props(heartbeat=0.5, lease=3.0)}}


def sink_server() -> tuple[str, dict]:
    return "Sink/writers", {"Sink": {SINK: {"DataHost": LOOP, "Pipeline": PIPE}}}


def nexus_server(root: Path) -> tuple[str, dict]:
    return "NexusWriter/main", {"NexusWriter": {NEXUS: writer_props(root, FlushSeconds=0.5)}}


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("writer-logs"))
    root = tmp_path_factory.mktemp("beamtime")
    try:
        pool.start(*manager_server())
        pool.start(*sink_server())
        pool.start(*nexus_server(root))
        pool.start("FioWriter/main", {"FioWriter": {FIO: writer_props(root)}})
        pool.start("ImageWriter/main", {"ImageWriter": {IMAGES: writer_props(root)}})
        pool.start("Sorter/w1", {"Sorter": {"test/w1/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/w1-0", {"PipelineWorker": {"test/w1-worker/0": {"Pipeline": PIPE}}})
        pool.start("PipelineMaster/w1", {"PipelineMaster": {"test/w1/master": {"DataHost": LOOP, "Pipeline": PIPE}}})
        link = TangoManagerLink(MANAGER)
        master = tango.DeviceProxy("test/w1/master")
        wait_for(lambda: len(json.loads(master.WorkerTable)) == 1, 20, "the worker to join the master")
        wanted = {"test/w1/sorter", SINK, NEXUS, FIO, IMAGES}
        wait_for(lambda: wanted <= {s["name"] for s in link.lookup({})}, 20, "sorter, sink and writers")
        beamline = simulate.SimBeamline(PIPE, "counters", link)
        client = SinkClient(json.loads(tango.DeviceProxy(SINK).Endpoints)[QUERY])
        yield pool, root, link, beamline, client
        client.close()
        beamline.close()
    finally:
        pool.stop_all()


def test_files_equal_the_sinks_arrays_and_carry_the_metadata(mesh) -> None:
    _, root, _, beamline, client = mesh
    nexus, fio, images = (tango.DeviceProxy(d) for d in (NEXUS, FIO, IMAGES))
    events: list[str] = []
    subscription = nexus.subscribe_event("LastFile", tango.EventType.CHANGE_EVENT,
                                         lambda e: e.err or events.append(e.attr_value.value))
    try:
        geometry = raster(20, 25)
        settings = {"counters": ["i1", "diode"], "normalise_by": "i0"}
        summary, _ = beamline.scan(500, block=25, geometry=geometry, analysis={"settings": settings})
        scan = summary["scan"]
        wait_for(lambda: files_of(nexus, scan) and files_of(fio, scan) and files_of(images, scan), 20,
                 "the three writers to finish the scan")
        wait_for(lambda: client.info(scan)["status"] == "complete", 10, "the sink to complete the scan")
        [nx] = files_of(nexus, scan)
        wait_for(lambda: nx["path"] in events, 5, "the LastFile change event")
    finally:
        nexus.unsubscribe_event(subscription)
    path = Path(nx["path"])
    assert path == root / "processed" / scan / f"{scan}_{PIPE}.nxs" and nexus.LastFile == str(path)
    assert read_checksums(path.parent)[path.name] == nx["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    info = client.info(scan)
    sent = info["metadata"]  # what StartScan delivered, as the sink holds it
    products = {name.split("/", 1)[1]: client.get(scan, name) for name in info["products"]}
    assert len(products) >= 4
    with h5py.File(path, "r") as f:
        entry = f["entry"]
        assert json.loads(entry["scan_document/data"][()]) == sent
        assert sent["scan"]["geometry"] == geometry and sent["analysis"][PIPE]["settings"] == settings
        assert entry["process/processor"][()].decode() == "counters"
        assert json.loads(entry["process/settings/data"][()]) == settings
        assert entry["process/points_received"][()] == 500 and entry["process/points_missing"][()] == 0
        assert entry["sample/name"][()].decode() == sent["sample"]["name"]
        assert entry.attrs["default"] in products
        for name, grid in products.items():
            data = entry[name]
            assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == name
            assert list(data.attrs["axes"]) == ["samy", "samx"]
            ds = data[name]
            assert "32008" in ds._filters  # Bitshuffle/LZ4 from hdf5plugin
            np.testing.assert_array_equal(ds[()], grid, err_msg=name)

    [fio_file] = files_of(fio, scan)
    table = read_fio(fio_file["path"])
    assert table.columns == ["samx", "samy", *products]
    for k, name in enumerate(products, 2):
        np.testing.assert_array_equal(table.data[:, k], in_acquisition_order(products[name]), err_msg=name)

    pngs = files_of(images, scan)
    assert sorted(Path(p["path"]).name for p in pngs) == sorted(f"{scan}_{PIPE}_{n}.png" for n in products)
    for png in pngs:
        assert imread(png["path"]).shape == (600, 800, 4)


def test_a_killed_writer_leaves_earlier_files_whole(mesh, tmp_path) -> None:
    pool, _, link, beamline, client = mesh
    root = tmp_path / "crash-root"
    root.mkdir()
    server, classes = "NexusWriter/crash", {"NexusWriter": {"test/writer/crash": writer_props(root)}}
    handle = pool.start(server, classes)
    crash = tango.DeviceProxy("test/writer/crash")
    wait_for(lambda: crash.Registered, 10, "the writer to register")

    first, _ = beamline.scan(300, block=20, geometry=raster(12, 25))
    wait_for(lambda: files_of(crash, first["scan"]), 10, "the first scan's file")
    [done] = files_of(crash, first["scan"])

    running: dict = {}
    scan_thread = threading.Thread(target=lambda: running.update(beamline.scan(
        3000, rate=1000, block=20, geometry=raster(60, 50), timeout=60)[0]), daemon=True)
    scan_thread.start()
    wait_for(lambda: crash.OpenScans == 1 and crash.EventsIn > 10, 10, "the second scan to be written")
    partial = next(root.rglob("*.nxs.part"))
    handle.kill(hard=True)
    scan_thread.join(60)
    second = running["scan"]

    # the earlier scan's file is whole: the checksum recorded at close, its data
    path = Path(done["path"])
    assert read_checksums(path.parent)[path.name] == done["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["entry/i0/i0"][()], client.get(first["scan"], f"{PIPE}/i0"))
    # the scan in progress never appears under its final name; its part file stays for inspection
    final = partial.with_name(partial.name.removesuffix(".part"))
    assert second in final.name and not final.exists() and partial.exists()
    assert client.info(second)["received"] == 3000  # the other consumers got everything

    # a restarted writer writes the next scan; the dead writer's claim is gone with it
    pool.start(server, classes)
    wait_for(lambda: tango.DeviceProxy("test/writer/crash").Registered, 10, "the restarted writer")
    third, _ = beamline.scan(200, block=20, geometry=raster(8, 25))
    restarted = tango.DeviceProxy("test/writer/crash")
    wait_for(lambda: files_of(restarted, third["scan"]), 10, "the file of the scan after the restart")
    FileClaim(final, {"owner": "test"}).release()  # the lock died with the writer
    assert len(read_checksums(path.parent.parent / third["scan"])) == 1


def test_a_second_writer_on_the_same_files_is_refused(mesh) -> None:
    pool, root, _, beamline, _ = mesh
    twin_handle = pool.start("NexusWriter/twin", {"NexusWriter": {"test/writer/twin": writer_props(root)}})
    try:
        nexus, twin = tango.DeviceProxy(NEXUS), tango.DeviceProxy("test/writer/twin")
        wait_for(lambda: twin.Registered, 10, "the twin to register")
        errors = {NEXUS: nexus.Errors, "twin": twin.Errors}
        summary, _ = beamline.scan(200, block=20, geometry=raster(8, 25))
        scan = summary["scan"]
        wait_for(lambda: len(files_of(nexus, scan)) + len(files_of(twin, scan)) == 1
                 and nexus.Errors + twin.Errors == sum(errors.values()) + 1, 10, "one file and one refusal")
        loser = twin if files_of(nexus, scan) else nexus
        assert loser.SkippedMessages > 0 and loser.state() == tango.DevState.ON
        status = loser.Status()
        assert "being written by" in status or "exists already" in status, status
    finally:
        twin_handle.kill(hard=False)


def test_paths_outside_the_beamtime_root_are_refused(mesh, tmp_path) -> None:
    _, root, _, beamline, _ = mesh
    doc = ProfileScan(PROFILES["counters"], PIPE, 20).document("evil-1", 1)
    doc["beamtime"]["paths"]["processed"] = "../../etc"
    with pytest.raises(tango.DevFailed, match="contains '..'"):
        beamline.master().StartScan(json.dumps(doc))  # refused where it enters the mesh

    nexus = tango.DeviceProxy(NEXUS)
    errors, skipped = nexus.Errors, nexus.SkippedMessages
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    escape = ProfileScan(PROFILES["counters"], PIPE, 20).document("evil-2", 2)
    escape["beamtime"]["paths"]["processed"] = "escape"
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 2000
    push.connect(json.loads(nexus.Endpoints)[protocol.DATA_IN])
    # as if a bad document reached the writer without the master's check
    codec.send(push, codec.Message(codec.SCAN_START, scan="evil-1", stream=PIPE, meta={protocol.META_SCAN: doc}))
    codec.send(push, codec.Message(codec.SCAN_START, scan="evil-2", stream=PIPE, meta={protocol.META_SCAN: escape}))
    for scan in ("evil-1", "evil-2"):
        codec.send(push, codec.Message(codec.RESULT, scan=scan, stream=PIPE, index=0, count=2,
                                       arrays={"i0": np.ones(2)}))
    push.close()
    wait_for(lambda: nexus.Errors == errors + 2 and nexus.SkippedMessages == skipped + 2, 5, "two refusals")
    assert "outside the beamtime root" in nexus.Status()
    assert not list(outside.iterdir()) and not (root.parent / "etc").exists()
    assert nexus.state() == tango.DevState.ON


# ------------------------------------------------------------ kill -9 mid-scan, restarted (these run last:
# they restart the module's servers; the sink's, last of all, leaves the module's SinkClient pointing nowhere)

def handle_of(pool: ServerPool, server: str) -> ServerHandle:
    return next(h for h in reversed(pool.started) if h.name == server)


def files_verify(files: list[dict]) -> None:
    """Every file listed is whole: its bytes hash to what SHA256SUMS and the writer recorded."""
    for f in files:
        path = Path(f["path"])
        assert read_checksums(path.parent)[path.name] == f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def long_scan(beamline: simulate.SimBeamline, during: Callable[[], None]) -> tuple[str, int]:
    """A scan of several seconds (so a restart lands inside it), ``during`` run beside it; (scan id, points)."""
    rows, cols = 80, 100
    summary, _ = beamline.scan(rows * cols, rate=1000, block=20, geometry=raster(rows, cols), during=during,
                               timeout=180)
    assert summary["points_delivered"] == rows * cols and summary["missing"] == 0, summary  # the driver's probe
    return summary["scan"], rows * cols


def test_kill_minus_9_topology_manager_mid_scan_the_scan_completes_everywhere(mesh) -> None:
    """The manager dies mid-scan and is started again: the stages go on with what they know, every service
    registers again within a few heartbeats, and every consumer ends the scan complete."""
    pool, _, link, beamline, client = mesh
    nexus, fio = tango.DeviceProxy(NEXUS), tango.DeviceProxy(FIO)
    earlier = json.loads(nexus.ListFiles(0)) + json.loads(fio.ListFiles(0))
    before = {s["name"] for s in link.lookup({})}
    restarted: list[float] = []

    def kill_and_restart_the_manager() -> None:
        wait_for(lambda: nexus.OpenScans == 1 and nexus.EventsIn > 10, 60, "the scan under way")
        handle_of(pool, "TopologyManager/writers").kill(hard=True)
        pool.start(*manager_server())
        restarted.append(time.monotonic())

    scan, points = long_scan(beamline, kill_and_restart_the_manager)
    assert restarted, "the manager was restarted during the scan"
    wait_for(lambda: client.info(scan)["status"] != "running", 30, "the sink to end the scan")
    info = client.info(scan)
    assert info["status"] == "complete" and info["received"] == points and info["duplicates"] == 0, info
    wait_for(lambda: files_of(nexus, scan) and files_of(fio, scan), 30, "the scan's files")
    for f in files_of(nexus, scan) + files_of(fio, scan):
        assert f["status"] == "complete", f
    with h5py.File(files_of(nexus, scan)[0]["path"], "r") as h5:
        assert h5["entry/process/points_received"][()] == points and h5["entry/process/points_missing"][()] == 0
    files_verify(earlier + files_of(nexus, scan))
    assert before <= {s["name"] for s in link.lookup({})}  # repopulated by the services themselves


def test_kill_minus_9_nexus_writer_mid_scan_its_restart_writes_the_rest_and_says_incomplete(mesh) -> None:
    """The NeXus writer dies mid-scan and is started again. The sorter gives the new process the scan from
    where delivery stands: its file holds those points, says ``incomplete`` and where it joined; the dead
    process's part file is kept aside, earlier files are whole, and the other consumers have every point."""
    pool, root, _, beamline, client = mesh
    nexus, fio = tango.DeviceProxy(NEXUS), tango.DeviceProxy(FIO)
    earlier = json.loads(nexus.ListFiles(0)) + json.loads(fio.ListFiles(0))

    def kill_and_restart_the_writer() -> None:
        wait_for(lambda: nexus.OpenScans == 1 and nexus.EventsIn > 10, 60, "the scan under way")
        handle_of(pool, "NexusWriter/main").kill(hard=True)
        pool.start(*nexus_server(root))

    scan, points = long_scan(beamline, kill_and_restart_the_writer)
    wait_for(lambda: files_of(nexus, scan), 30, "the restarted writer's file")
    [nx] = files_of(nexus, scan)
    assert nx["status"] == "incomplete", nx
    path = Path(nx["path"])
    with h5py.File(path, "r") as h5:
        process = h5["entry/process"]
        joined = int(process["points_joined_at"][()])
        assert 0 < joined < points, joined
        assert process["status"][()].decode() == "incomplete"
        assert process["points_received"][()] == points - joined and process["points_missing"][()] == joined
        assert process["points_duplicates"][()] == 0
        assert (process["point_status"][()] == 1).sum() == points - joined
        grid = h5["entry/i0/i0"][()]
    truth = client.get(scan, f"{PIPE}/i0")  # the sink had every point
    order = in_acquisition_order(grid)
    np.testing.assert_array_equal(order[joined:], in_acquisition_order(truth)[joined:])
    assert np.isnan(order[:joined]).all()
    assert len(list(path.parent.glob(f"{path.name}.part.crashed-*"))) == 1  # the dead writer's part, kept aside
    assert client.info(scan)["status"] == "complete" and client.info(scan)["received"] == points
    [table] = files_of(fio, scan)
    assert table["status"] == "complete"
    files_verify(earlier + [nx, table])


def test_kill_minus_9_sink_mid_scan_its_restart_holds_the_rest_and_says_incomplete(mesh) -> None:
    """The sink dies mid-scan and is started again: it is given the scan from where delivery stands and says
    so (``incomplete``, ``joined_at``); the writers' files are complete. Runs last: the module's client
    knew the old sink."""
    pool, _, _, beamline, _ = mesh
    nexus = tango.DeviceProxy(NEXUS)
    sink = tango.DeviceProxy(SINK)

    def kill_and_restart_the_sink() -> None:
        wait_for(lambda: nexus.OpenScans == 1 and sink.EventsIn > 10, 60, "the scan under way")
        handle_of(pool, "Sink/writers").kill(hard=True)
        pool.start(*sink_server())

    scan, points = long_scan(beamline, kill_and_restart_the_sink)
    client = SinkClient(json.loads(tango.DeviceProxy(SINK).Endpoints)[QUERY])
    try:
        wait_for(lambda: client.info(scan)["status"] != "running", 30, "the restarted sink to end the scan")
        info = client.info(scan)
        joined = info["runs"][PIPE]["joined_at"]
        assert 0 < joined < points and info["status"] == "incomplete", info
        assert info["received"] == points - joined and info["missing"] == joined and info["duplicates"] == 0, info
        wait_for(lambda: files_of(nexus, scan), 30, "the NeXus file")
        [nx] = files_of(nexus, scan)
        assert nx["status"] == "complete", nx
        with h5py.File(nx["path"], "r") as h5:
            truth = in_acquisition_order(h5["entry/i0/i0"][()])  # the writer had every point
        held = in_acquisition_order(client.get(scan, f"{PIPE}/i0"))
        np.testing.assert_array_equal(held[joined:], truth[joined:])
        assert np.isnan(held[:joined]).all() and not np.isnan(truth).any()
    finally:
        client.close()
