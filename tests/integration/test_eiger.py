"""EigerIngester against ALBA's eiger-simulator (third-party code, installed at test time).

Real processes throughout: the embedded Tango DB, TopologyManager, PipelineMaster,
one PipelineWorker (``passthrough``: the worker decompresses, the images come
back as they were), Sorter, the EigerIngester server, and ALBA's simulator
streaming the frames of an HDF5 file we write. Between simulator and ingester
sits a forwarding proxy that passes the simulator's multipart messages on
unchanged and can drop chosen ones: that is how a lost frame and a lost series
end are made (the simulator itself never loses one).

The master's IncompleteTimeoutSeconds is long (60 s): a dropped frame's scan
ends within the test's 30 s only because the ingester declares the gap.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable

import h5py
import numpy as np
import pytest
import tango
import zmq

from services.ops.masters import ScanMasters
from services.ops.probe import Probe
from services.registration import TangoManagerLink
from support import ServerPool, topology_props, wait_for
from support.documents import minimal
from support.simulators import free_port, start_alba

pytestmark = pytest.mark.slow

MANAGER = "tangomesh/topology/manager"
PIPE = "eiger"
INGESTER = "test/eiger/ingester"
LOOP = "127.0.0.1"
Y, X, FRAMES = 64, 80, 12  # the dataset: 12 frames of 64 x 80 uint16 Poisson counts
SCAN_WAIT = 3.0


class DroppingProxy:
    """PULL from the simulator, PUSH to the ingester, the parts forwarded as
    received; a message whose first part's JSON matches ``drop`` is not forwarded."""

    def __init__(self, upstream: str) -> None:
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.connect(upstream)
        self.push = ctx.socket(zmq.PUSH)
        self.port = self.push.bind_to_random_port(f"tcp://{LOOP}")
        self.drop: Callable[[dict], bool] = lambda head: False
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.pull.poll(50):
                continue
            parts = self.pull.recv_multipart(copy=False)
            try:
                head = json.loads(bytes(parts[0].buffer))
            except ValueError:
                head = {}
            if self.drop(head):
                self.dropped += 1
                continue
            self.push.send_multipart(parts, copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.pull.close(0)
        self.push.close(0)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(20261203)
    return rng.poisson(rng.uniform(0.5, 40, size=(1, Y, X)), size=(FRAMES, Y, X)).astype(np.uint16)


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory, frames):
    logs = tmp_path_factory.mktemp("eiger-logs")
    data = tmp_path_factory.mktemp("eiger-data")
    with h5py.File(data / "frames.h5", "w") as f:
        f.create_dataset("entry/data/data_000001", data=frames)
    zmq_port = free_port()
    t0 = time.monotonic()
    sim = start_alba(data / "frames.h5", zmq_port, "bslz4", logs / "alba.log")
    print(f"ALBA simulator up in {time.monotonic() - t0:.1f} s")
    proxy = DroppingProxy(f"tcp://{LOOP}:{zmq_port}")
    pool = ServerPool(logs)
    try:
        pool.start("TopologyManager/eiger", {"TopologyManager": {MANAGER: topology_props()}})
        pool.start("Sorter/eiger", {"Sorter": {"test/eiger/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/eiger", {"PipelineWorker": {"test/eiger-worker/1": {
            "Pipeline": PIPE, "HeartbeatSeconds": 0.2}}})
        pool.start("PipelineMaster/eiger", {"PipelineMaster": {"test/eiger/master": {
            "DataHost": LOOP, "Pipeline": PIPE, "IncompleteTimeoutSeconds": 60.0}}})
        ingester = pool.start("EigerIngester/test", {"EigerIngester": {INGESTER: {
            "DataHost": LOOP, "Pipeline": PIPE, "DetectorEndpoint": f"tcp://{LOOP}:{proxy.port}",
            "Stream": "eiger", "BlockFrames": 4, "ScanWaitSeconds": SCAN_WAIT}}})
        link = TangoManagerLink(MANAGER)
        probe = Probe(PIPE, link, LOOP, keep=True, name="test/eiger/probe")
        wait_for(lambda: {"source", "sorter", "recorder", "master"} <= {
            s["kind"] for s in link.lookup({"pipeline": PIPE})}, 30, "the pipeline and the ingester's source")
        wait_for(lambda: len(json.loads(tango.DeviceProxy("test/eiger/master").WorkerTable)) == 1, 30, "the worker")
        yield {"sim": sim, "proxy": proxy, "probe": probe, "link": link, "ingester": ingester,
               "device": tango.DeviceProxy(INGESTER)}
        probe.close()
    finally:
        pool.stop_all()
        proxy.close()
        sim.stop()


def configure(sim, nimages: int, compression: str) -> None:
    rest = sim.rest
    for key, value in (("nimages", nimages), ("count_time", 0.01), ("x_pixels_in_detector", X),
                       ("y_pixels_in_detector", Y), ("compression", compression)):
        rest.config(key, value)
    rest.config("header_detail", "basic", subsystem="stream")
    rest.command("initialize", timeout=60)


def document(scan_id: str, points: int) -> dict:
    doc = minimal({"type": "points", "points": points})
    doc["scan"]["id"] = scan_id
    doc["analysis"] = {PIPE: {"processor": "passthrough", "streams": ["eiger"]}}
    doc["streams"] = {"eiger": {"arrays": {"image": {"dtype": "<u2", "shape": [Y, X]}}}}
    return doc


def run_series(mesh, scan_id: str, points: int, nimages: int, compression: str = "bslz4", timeout: float = 30):
    """StartScan, then arm and trigger the simulator; the probe's tally once the scan ended."""
    configure(mesh["sim"], nimages, compression)
    masters = ScanMasters(mesh["link"], [PIPE])
    masters.start(document(scan_id, points))
    try:
        mesh["sim"].rest.command("arm")
        mesh["sim"].rest.command("trigger")
        wait_for(lambda: mesh["probe"].ended(scan_id) is not None, timeout,
                 f"scan {scan_id} to end\n{mesh['ingester'].log_text()[-3000:]}")
    except BaseException:
        masters.abort(scan_id)
        raise
    return mesh["probe"].ended(scan_id)


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
def test_every_frame_arrives_equal_to_the_dataset(mesh, frames, compression) -> None:
    """ALBA streams dataset[i] as frame i (bslz4 without the 12-byte header, or a bare LZ4
    block); through ingester, master, worker and sorter each comes back pixel for pixel."""
    errors0 = mesh["device"].Errors
    scan = f"alba-{compression}-{time.time_ns()}"
    tally = run_series(mesh, scan, FRAMES, FRAMES, compression)
    assert not tally.aborted and tally.gap_points == 0 and tally.incomplete_points == 0
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(FRAMES))
    got = tally.arrays()["eiger/image"]
    assert got.shape == (FRAMES, Y, X) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, frames)
    assert mesh["device"].Errors == errors0
    assert mesh["device"].CurrentScan == ""  # the series ended with the scan


def test_a_dropped_frame_is_a_gap_not_a_shift(mesh, frames) -> None:
    """Frame 5 never reaches the ingester: index 5 is declared missing at once (the master
    would wait 60 s otherwise), every other index holds its own frame."""
    mesh["proxy"].drop = lambda head: head.get("htype") == "dimage-1.0" and head.get("frame") == 5
    dropped0, gaps0 = mesh["proxy"].dropped, mesh["device"].GapPoints
    try:
        t0 = time.monotonic()
        tally = run_series(mesh, f"alba-drop-{time.time_ns()}", FRAMES, FRAMES)
        elapsed = time.monotonic() - t0
    finally:
        mesh["proxy"].drop = lambda head: False
    assert mesh["proxy"].dropped == dropped0 + 1
    assert elapsed < 30
    assert mesh["device"].GapPoints == gaps0 + 1
    assert tally.incomplete_points == 1 and tally.gap_points == 0
    delivered = {i: c for i, c in tally.chunks}
    got = np.full((FRAMES, Y, X), -1, np.int64)
    for start, arrays in tally.chunks:
        if "eiger/image" in arrays:
            got[start:start + len(arrays["eiger/image"])] = arrays["eiger/image"]
    kept = [i for i in range(FRAMES) if i != 5]
    np.testing.assert_array_equal(got[kept], frames[kept])
    assert (got[5] == -1).all(), "index 5 must hold no frame"
    assert delivered


def test_a_series_without_an_open_scan_is_refused_then_the_next_one_works(mesh, frames) -> None:
    """No StartScan: the series waits ScanWaitSeconds, is refused and counted, its frames
    discarded; the ingester keeps running and the next scan gets all its frames."""
    dev = mesh["device"]
    refused0, discarded0 = dev.RefusedSeries, dev.DiscardedFrames
    configure(mesh["sim"], 6, "bslz4")
    mesh["sim"].rest.command("arm")
    mesh["sim"].rest.command("trigger")
    wait_for(lambda: dev.RefusedSeries == refused0 + 1 and dev.DiscardedFrames == discarded0 + 6,
             SCAN_WAIT + 20, "the series to be refused and drained")
    assert dev.State() == tango.DevState.ON
    tally = run_series(mesh, f"alba-after-refusal-{time.time_ns()}", FRAMES, FRAMES)
    np.testing.assert_array_equal(tally.arrays()["eiger/image"], frames)


def test_a_lost_series_end_then_a_new_series_ends_the_old_one_there(mesh, frames) -> None:
    """The detector's series end is lost and it is armed again (as after a restart): the
    open series ends at the new header, its unreceived rest declared missing; the new
    series joins the next scan from index 0, never numbered on from the old one."""
    dev = mesh["device"]
    restarts0 = dev.Restarts
    mesh["proxy"].drop = lambda head: head.get("htype") == "dseries_end-1.0" or (
        head.get("htype") == "dimage-1.0" and head.get("frame", 0) >= 8)
    first = f"alba-cut-{time.time_ns()}"
    masters = ScanMasters(mesh["link"], [PIPE])
    try:
        configure(mesh["sim"], FRAMES, "bslz4")
        masters.start(document(first, FRAMES))
        mesh["sim"].rest.command("arm")
        mesh["sim"].rest.command("trigger")
        wait_for(lambda: dev.Frames >= 1 and dev.CurrentScan == first, 20, "the first series to flow")
        time.sleep(0.5)  # ALBA sends 12 frames in 0.12 s: all sent, the last 4 and the end dropped
    finally:
        mesh["proxy"].drop = lambda head: False
    second = f"alba-next-{time.time_ns()}"
    tally = run_series(mesh, second, FRAMES, FRAMES)
    cut = mesh["probe"].ended(first)
    assert cut is not None and dev.Restarts == restarts0 + 1
    assert cut.incomplete_points == 4  # indices 8..11 declared missing at the restart
    np.testing.assert_array_equal(cut.arrays()["eiger/image"], frames[:8])
    np.testing.assert_array_equal(tally.arrays()["eiger/image"], frames)
