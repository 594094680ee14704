"""The Bluesky adapter: a real RunEngine running ``grid_scan`` over ophyd.sim
motors feeds a real pipeline and sink; the scan arrives complete, with the
raster shape, snake orientation and metadata the documents describe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tango
from bluesky import RunEngine
from bluesky.plans import grid_scan
from ophyd.sim import det4, motor1, motor2

from support import ServerPool, topology_props, wait_for
from services.ops.bluesky_feed import MeshFeed
from services.registration import TangoManagerLink
from sink.queries import QUERY, SinkClient

MANAGER = "tangomesh/topology/manager"
PIPE = "bs"
SINK = "test/sink/bluesky"
LOOP = "127.0.0.1"


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("bluesky-logs"))
    try:
        pool.start("TopologyManager/bs", {"TopologyManager": {MANAGER: topology_props(heartbeat=0.5, lease=3.0)}})
        pool.start("Sink/bs", {"Sink": {SINK: {"DataHost": LOOP}}})
        pool.start("Sorter/bs", {"Sorter": {"test/bs/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/bs", {"PipelineWorker": {"test/bs-worker/1": {"Pipeline": PIPE}}})
        pool.start("PipelineMaster/bs", {"PipelineMaster": {"test/bs/master": {"DataHost": LOOP, "Pipeline": PIPE}}})
        link = TangoManagerLink(MANAGER)
        master = tango.DeviceProxy("test/bs/master")
        wait_for(lambda: len(json.loads(master.WorkerTable)) == 1, 20, "the worker to join the master")
        wait_for(lambda: {"test/bs/sorter", SINK} <= {s["name"] for s in link.lookup({})}, 20, "sorter and sink")
        client = SinkClient(json.loads(tango.DeviceProxy(SINK).Endpoints)[QUERY])
        yield link, client
        client.close()
    finally:
        pool.stop_all()


def test_a_runengine_grid_scan_becomes_a_complete_scan_in_the_sink(mesh) -> None:
    link, client = mesh
    feed = MeshFeed(link, {PIPE: {"processor": "counters", "settings": {"counters": ["det4", "motor1", "motor2"]},
                                  "streams": ["primary"]}},
                    streams={"primary": ["det4", "motor1", "motor2"]},
                    beamtime={"id": "11019999", "beamline": "P06", "paths": {"raw": "raw", "processed": "processed"}})
    events: list[dict] = []
    RE = RunEngine({})
    RE.subscribe(feed)
    RE.subscribe(lambda name, doc: events.append(doc["data"]) if name == "event" else None)
    try:
        (uid,) = RE(grid_scan([det4], motor1, -1, 1, 5, motor2, -2, 2, 7, snake_axes=True), sample="cell7",
                    proposal_id="I-20260001")
    finally:
        feed.close()
    (scan,) = feed.scans
    assert scan.startswith(f"bluesky-{RE.md['scan_id']}-{uid[:8]}")
    info = wait_for(lambda: (lambda i: i if i["status"] == "complete" else None)(client.info(scan)), 20,
                    "the sink to complete the Bluesky scan")
    assert info["expected"] == info["received"] == 35 and info["missing"] == 0
    assert info["map_shape"] == [5, 7]
    doc = info["metadata"]
    geometry = doc["scan"]["geometry"]
    assert geometry["type"] == "raster" and geometry["snake"] is True
    assert [(a["name"], a["start"], a["stop"], a["points"]) for a in geometry["axes"]] == \
        [("motor2", -2.0, 2.0, 7), ("motor1", -1.0, 1.0, 5)]  # fast first: Bluesky lists the slow motor first
    assert doc["scan"]["number"] == RE.md["scan_id"] and doc["scan"]["command"].startswith("grid_scan(")
    assert doc["sample"] == {"name": "cell7"} and doc["beamtime"]["proposal"] == "I-20260001"
    assert doc["beamtime"]["id"] == "11019999"
    assert "det4" in doc["acquisition"]["detectors"] and "motor1" in doc["devices"]
    assert doc["user"]["bluesky_start"]["uid"] == uid

    # every event at the map cell a beamline scientist expects: snake rows reversed
    det = client.get(scan, f"{PIPE}/det4")
    fast = client.get(scan, f"{PIPE}/motor2")
    slow = client.get(scan, f"{PIPE}/motor1")
    for i, data in enumerate(events):
        row, col = divmod(i, 7)
        if row % 2:
            col = 6 - col
        assert det[row, col] == data["det4"]
    np.testing.assert_allclose(fast, np.tile(np.linspace(-2, 2, 7), (5, 1)), atol=1e-9)
    np.testing.assert_allclose(slow, np.tile(np.linspace(-1, 1, 5)[:, None], (1, 7)), atol=1e-9)


def test_an_aborted_run_aborts_the_scan(mesh) -> None:
    link, client = mesh
    feed = MeshFeed(link, {PIPE: {"processor": "counters", "settings": {"counters": ["det4"]}}},
                    streams={"primary": ["det4"]})
    RE = RunEngine({})
    RE.subscribe(feed)

    def detector_fails(name, doc):  # an exception in a subscriber fails the run
        if name == "event" and doc["seq_num"] == 3:
            raise RuntimeError("simulated detector failure")

    RE.subscribe(detector_fails)
    try:
        with pytest.raises(RuntimeError, match="simulated detector failure"):
            RE(grid_scan([det4], motor1, -1, 1, 3, motor2, -2, 2, 3))
    finally:
        feed.close()
    (scan,) = feed.scans
    info = wait_for(lambda: (lambda i: i if i["status"] != "running" else None)(client.info(scan)), 20,
                    "the sink to see the abort")
    assert info["status"] == "aborted" and info["received"] < 9
