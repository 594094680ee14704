"""FileIngester end to end: an EIGER master + data files replayed into a real pipeline.

Real processes: the embedded Tango DB, TopologyManager, PipelineMaster, one
PipelineWorker (``passthrough``: the worker decompresses the frames, so
they come back as pixels), Sorter, the FileIngester server, a probe. The
files are laid out as DECTRIS's file writer lays them out, written with
hdf5plugin's bitshuffle-LZ4 filter; the oracle is h5py reading them back.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tango

from services.ops.masters import ScanMasters
from services.ops.probe import Probe
from services.registration import TangoManagerLink
from support import ServerPool, topology_props, wait_for
from support.documents import minimal
from support.scripts import on_path

pytestmark = pytest.mark.slow

MANAGER = "tangomesh/topology/manager"
PIPE = "replay"
DEVICE = "test/replay/file"
LOOP = "127.0.0.1"
Y, X, FRAMES = 32, 48, 12
FRAME_TIME = 0.05


def write_files(directory):
    import h5py
    import hdf5plugin

    rng = np.random.default_rng(11)
    pixels = rng.poisson(rng.uniform(1, 30, size=(1, Y, X)), size=(FRAMES, Y, X)).astype("<u2")
    master = directory / "series_7_master.h5"
    with h5py.File(master, "w") as m:
        m["/entry/instrument/detector/frame_time"] = FRAME_TIME
        for k, (lo, hi) in enumerate(((0, 8), (8, FRAMES)), start=1):
            name = f"series_7_data_{k:06d}.h5"
            with h5py.File(directory / name, "w") as d:
                d.create_dataset("/entry/data/data", data=pixels[lo:hi], chunks=(1, Y, X),
                                 **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
            m[f"/entry/data/data_{k:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
    with h5py.File(master) as m:  # the oracle: the files read through the HDF5 filters
        assert np.array_equal(np.concatenate([m["/entry/data/data_000001"][()], m["/entry/data/data_000002"][()]]),
                              pixels)
    return master, pixels


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory):
    logs = tmp_path_factory.mktemp("replay-logs")
    master, pixels = write_files(tmp_path_factory.mktemp("replay-data"))
    pool = ServerPool(logs)
    with on_path(tmp_path_factory.mktemp("bin"), {"FileIngester": "ingesters.devices:file_main"}):
        try:
            pool.start("TopologyManager/replay", {"TopologyManager": {MANAGER: topology_props()}})
            pool.start("Sorter/replay", {"Sorter": {"test/replay/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
            pool.start("PipelineWorker/replay", {"PipelineWorker": {"test/replay-worker/1": {
                "Pipeline": PIPE, "HeartbeatSeconds": 0.2}}})
            pool.start("PipelineMaster/replay", {"PipelineMaster": {"test/replay/master": {
                "DataHost": LOOP, "Pipeline": PIPE, "IncompleteTimeoutSeconds": 60.0}}})
            server = pool.start("FileIngester/test", {"FileIngester": {DEVICE: {
                "DataHost": LOOP, "Pipeline": PIPE, "MasterFile": str(master), "Stream": "eiger",
                "BlockFrames": 4, "ScanWaitSeconds": 3.0}}})
            link = TangoManagerLink(MANAGER)
            probe = Probe(PIPE, link, LOOP, keep=True, name="test/replay/probe")
            wait_for(lambda: {"source", "sorter", "recorder", "master"} <= {
                s["kind"] for s in link.lookup({"pipeline": PIPE})}, 30, "the pipeline and the ingester's source")
            wait_for(lambda: len(json.loads(tango.DeviceProxy("test/replay/master").WorkerTable)) == 1, 30,
                     "the worker")
            yield {"probe": probe, "link": link, "server": server, "device": tango.DeviceProxy(DEVICE),
                   "pixels": pixels, "master": master}
            probe.close()
        finally:
            pool.stop_all()


def document(scan_id: str, points: int) -> dict:
    doc = minimal({"type": "points", "points": points})
    doc["scan"]["id"] = scan_id
    doc["analysis"] = {PIPE: {"processor": "passthrough", "streams": ["eiger"]}}
    doc["streams"] = {"eiger": {"arrays": {"image": {"dtype": "<u2", "shape": [Y, X]}}}}
    return doc


def replay(mesh, scan_id: str, points: int, request: dict, timeout: float = 30):
    masters = ScanMasters(mesh["link"], [PIPE])
    masters.start(document(scan_id, points))
    try:
        t0 = time.monotonic()
        mesh["device"].Replay(json.dumps(request))
        wait_for(lambda: mesh["probe"].ended(scan_id) is not None, timeout,
                 f"scan {scan_id} to end\n{mesh['server'].log_text()[-3000:]}")
        return mesh["probe"].ended(scan_id), time.monotonic() - t0
    except BaseException:
        masters.abort(scan_id)
        raise


def test_the_file_replays_at_its_recorded_pace_frame_for_frame(mesh) -> None:
    """{} replays the whole file at its frame_time (0.05 s): 12 frames take at least 0.55 s,
    and every frame comes back as the pixels h5py reads from the file."""
    dev = mesh["device"]
    errors0 = dev.Errors
    tally, elapsed = replay(mesh, f"replay-all-{time.time_ns()}", FRAMES, {})
    assert elapsed >= (FRAMES - 1) * FRAME_TIME
    assert tally.incomplete_points == 0 and not tally.aborted
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(FRAMES))
    np.testing.assert_array_equal(tally.arrays()["eiger/image"], mesh["pixels"])
    assert dev.Errors == errors0 and not dev.Playing


def test_part_of_the_file_at_a_chosen_pace_and_the_rest_declared_missing(mesh) -> None:
    """Frames 3..8 at max pace into a 10-point scan: indices 0..5 hold frames 3..8, the replay
    planned 6, and 6..9 are declared missing at its end (not waited for 60 s)."""
    tally, elapsed = replay(mesh, f"replay-part-{time.time_ns()}", 10, {"pace": "max", "first": 3, "count": 6})
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(6))
    np.testing.assert_array_equal(tally.arrays()["eiger/image"], mesh["pixels"][3:9])
    assert tally.incomplete_points == 4 and elapsed < 30


@pytest.mark.parametrize("request_text, reason", [
    ("not json", "not JSON"),
    ('{"pace": "soon"}', "pace"),
    ('{"first": -1}', "first"),
    ('{"count": 100}', "the file has 12"),
    ('{"file": "/nonexistent_master.h5"}', "not an HDF5 file"),
    ('{"speed": 1}', "Additional properties"),
])
def test_a_bad_replay_request_is_refused_saying_why(mesh, request_text, reason) -> None:
    dev = mesh["device"]
    errors0 = dev.Errors
    with pytest.raises(tango.DevFailed) as info:
        dev.Replay(request_text)
    assert reason in info.value.args[0].desc
    assert dev.Errors == errors0 + 1 and dev.State() == tango.DevState.ON


def test_a_replay_with_no_scan_open_is_refused_then_the_next_works(mesh) -> None:
    dev = mesh["device"]
    refused0 = dev.RefusedReplays
    dev.Replay('{"pace": "max"}')
    wait_for(lambda: dev.RefusedReplays == refused0 + 1 and not dev.Playing, 20, "the replay to be refused")
    tally, _ = replay(mesh, f"replay-after-{time.time_ns()}", FRAMES, {"pace": 200})
    np.testing.assert_array_equal(tally.arrays()["eiger/image"], mesh["pixels"])


def test_a_master_file_that_cannot_be_read_leaves_the_device_in_fault_saying_why(mesh, tmp_path) -> None:
    pool = ServerPool(tmp_path)
    try:
        with on_path(tmp_path, {"FileIngester": "ingesters.devices:file_main"}):
            pool.start("FileIngester/bad", {"FileIngester": {"test/replay/bad": {
                "Pipeline": PIPE, "MasterFile": str(tmp_path / "none_master.h5")}}})
        bad = tango.DeviceProxy("test/replay/bad")
        assert bad.State() == tango.DevState.FAULT
        assert "not an HDF5 file" in bad.Status()
        with pytest.raises(tango.DevFailed, match="TANGOMESH_Fault"):
            bad.Replay("{}")
    finally:
        pool.stop_all()
