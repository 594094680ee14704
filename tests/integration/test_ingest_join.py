"""Three detectors' own streams feed one pipeline and join by acquisition index.

An EIGER (ALBA's eiger-simulator streaming 20 frames of an HDF5 file, stream
v1, bitshuffle-LZ4), an Xspress3 (MAX IV's recording of 20 frames, replayed
on a PUB as its streamer sent it) and a PandABox (a real capture of the
PandABlocks dumps, cut to 20 samples, served on a data port) go through their
ingesters into one `passthrough` pipeline. Their blocks differ in size (4, 5
and 3 points) and the Xspress3 lags: it starts only once the other two have
sent everything. Every event must hold the three detectors' data of its own
index, exactly, and none may be incomplete.
"""

from __future__ import annotations

import json
import time

import h5py
import numpy as np
import pytest
import tango

from services.ops.masters import ScanMasters
from services.ops.probe import Probe
from services.registration import TangoManagerLink
from support import ServerPool, topology_props, wait_for
from support.documents import minimal
from support.panda import Capture, PandaReplay, dump, oracle_columns
from support.recordings import messages
from support.simulators import ALBA, free_port, install_all, start_alba
from support.xspress_replay import XspressReplay

pytestmark = pytest.mark.slow

MANAGER = "tangomesh/topology/manager"
PIPE = "joined"
LOOP = "127.0.0.1"
POINTS = 20
Y, X = 32, 40
RECORDING = "xspress3-dump.cbors"  # NanoMAX 2023, old three-message form, 20 frames of 4 x 4096
PANDA_DUMP = "fast_dump"  # 58 samples of a real PandA, cut to 20
INGESTERS = {"eiger": "test/joined/eiger", "xspress3": "test/joined/xspress3", "panda": "test/joined/panda"}


def xspress_spectra() -> list[np.ndarray]:
    """Each recorded frame's spectra, read without our decoder (old form: header, spectra, scalers)."""
    parts = [p for m in messages(RECORDING) for p in m]
    out = []
    for k, part in enumerate(parts):
        if part[:1] == b"{" and json.loads(part).get("htype") == "image":
            out.append(np.frombuffer(parts[k + 1], np.uint32).reshape(json.loads(part)["shape"]))
    return out


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory):
    logs = tmp_path_factory.mktemp("joined-logs")
    data = tmp_path_factory.mktemp("joined-data")
    frames = np.random.default_rng(4).poisson(7, (POINTS, Y, X)).astype(np.uint16)
    with h5py.File(data / "frames.h5", "w") as f:
        f.create_dataset("entry/data/data_000001", data=frames)
    install_all(ALBA)
    zmq_port = free_port()
    sim = start_alba(data / "frames.h5", zmq_port, "bslz4", logs / "alba.log")
    replay = XspressReplay(LOOP)
    panda = PandaReplay()
    pool = ServerPool(logs)
    try:
        pool.start("TopologyManager/joined", {"TopologyManager": {MANAGER: topology_props()}})
        pool.start("Sorter/joined", {"Sorter": {"test/joined/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/joined", {"PipelineWorker": {"test/joined-worker/1": {
            "Pipeline": PIPE, "HeartbeatSeconds": 0.2}}})
        pool.start("PipelineMaster/joined", {"PipelineMaster": {"test/joined/master": {
            "DataHost": LOOP, "Pipeline": PIPE, "IncompleteTimeoutSeconds": 60.0}}})
        common = {"DataHost": LOOP, "Pipeline": PIPE, "ScanWaitSeconds": 10.0}
        pool.start("EigerIngester/joined", {"EigerIngester": {INGESTERS["eiger"]: {
            **common, "DetectorEndpoint": f"tcp://{LOOP}:{zmq_port}", "Stream": "eiger", "BlockFrames": 4}}})
        pool.start("XspressIngester/joined", {"XspressIngester": {INGESTERS["xspress3"]: {
            **common, "StreamerEndpoint": replay.endpoint, "Stream": "xspress3", "BlockFrames": 5}}})
        pool.start("PcapIngester/joined", {"PcapIngester": {INGESTERS["panda"]: {
            **common, "PandaHost": f"{LOOP}:{panda.port}", "Stream": "panda", "BlockPoints": 3}}})
        link = TangoManagerLink(MANAGER)
        probe = Probe(PIPE, link, LOOP, keep=True, name="test/joined/probe")
        wait_for(lambda: {"eiger", "xspress3", "panda"} <= {s.get("capabilities", {}).get("stream") for s in
                                                            link.lookup({"pipeline": PIPE, "kind": "source"})},
                 30, "the three ingesters' sources")
        wait_for(lambda: len(json.loads(tango.DeviceProxy("test/joined/master").WorkerTable)) == 1, 30, "the worker")
        replay.wait_subscribed(30)
        panda.wait_connected(30)
        yield {"sim": sim, "replay": replay, "panda": panda, "link": link, "probe": probe, "frames": frames}
        probe.close()
    finally:
        pool.stop_all()
        panda.close()
        replay.close()
        sim.stop()


def test_an_eiger_an_xspress3_and_a_pandabox_join_by_index_with_other_block_sizes_and_a_lagging_stream(
        mesh) -> None:
    scan = f"joined-{time.time_ns()}"
    doc = minimal({"type": "points", "points": POINTS})
    doc["scan"]["id"] = scan
    doc["analysis"] = {PIPE: {"processor": "passthrough", "streams": ["eiger", "xspress3", "panda"]}}
    masters = ScanMasters(mesh["link"], [PIPE])
    masters.start(doc)
    capture = Capture.of(dump(PANDA_DUMP)).cut(POINTS, "Ok")
    try:
        rest = mesh["sim"].rest
        for key, value in (("nimages", POINTS), ("count_time", 0.01), ("x_pixels_in_detector", X),
                           ("y_pixels_in_detector", Y), ("compression", "bslz4")):
            rest.config(key, value)
        rest.config("header_detail", "basic", subsystem="stream")
        rest.command("initialize", timeout=60)
        rest.command("arm")
        rest.command("trigger")
        mesh["panda"].arm(capture, chunk=1000)
        # the Xspress3 lags: it starts once the others' events are all waiting at the master
        eiger, pcap = (tango.DeviceProxy(INGESTERS[k]) for k in ("eiger", "panda"))
        wait_for(lambda: eiger.Frames >= POINTS and pcap.Samples >= POINTS, 30, "the EIGER's and the PandA's data sent")
        assert mesh["probe"].points_seen(scan) == 0  # nothing forms without the lagging stream
        mesh["replay"].play(messages(RECORDING), pace=0.002)
        tally = wait_for(lambda: mesh["probe"].ended(scan), 60, f"scan {scan} to end")
    except BaseException:
        masters.abort(scan)
        raise
    assert not tally.aborted and tally.incomplete_points == 0 and tally.gap_points == 0, tally.end
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(POINTS))
    got = tally.arrays()
    np.testing.assert_array_equal(got["eiger/image"], mesh["frames"])
    np.testing.assert_array_equal(got["xspress3/mca"], np.stack(xspress_spectra()))
    columns = oracle_columns(b"OK\n" + capture)  # the oracle reads from the handshake on
    assert len(columns) >= 2 and all(len(v) == POINTS for v in columns.values())
    for column, values in columns.items():
        name = column.replace(".", "_") if f"panda/{column}" not in got else column
        np.testing.assert_allclose(got[f"panda/{name}"], values, rtol=0, atol=0, err_msg=column)
