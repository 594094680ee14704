"""XspressComponent without Tango: a recorded stream in over a real SUB, blocks out over the real source socket.

The scan lookup is a plain function (what the device reads from the masters'
``OpenScans``); the topology is the real registry behind an in-process link.
Data-plane authentication is off here: the reader is a bare PULL, not a
registered master.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import zmq

from ingesters.xspress_component import XspressComponent, XspressConfig
from services import codec, security
from support.recordings import messages
from support.xspress_replay import XspressReplay
from topology_manager.component import TopologyComponent, TopologyConfig
from topology_manager.local import LocalManagerLink


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.setattr(security, "_mode", security.OFF)


def run(config_fields: dict, recording: list[list[bytes]], points: int) -> tuple[list[codec.Message], XspressComponent]:
    replay = XspressReplay()
    topology = TopologyComponent("test/topology/manager", TopologyConfig(lease_seconds=30, heartbeat_seconds=5))
    topology.start()
    scans = [{"scan": "scan-c", "points": points, "streams": ["xspress3"], "started": 1.0, "ending": False,
              "first_index": {}}]
    config = XspressConfig(replay.endpoint, "xspress3", ("p",), **config_fields)
    component = XspressComponent("test/xspress/c", config, LocalManagerLink(topology.registry), "127.0.0.1",
                                 lambda pipeline: scans)
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.rcvtimeo = 20_000
    try:
        component.start()
        pull.connect(component.sources["p"].endpoint)
        replay.wait_subscribed(10)  # subscribed at start-up, before any series
        replay.play(recording)
        out = []
        while not out or out[-1].type != codec.SCAN_END:
            out.append(codec.recv(pull))
        return out, component
    finally:
        pull.close(0)
        component.stop()
        topology.stop()
        replay.close()


def test_channels_kept_travel_in_blocks_with_their_dead_time(plain) -> None:
    recording = messages("xspress3-multipart.cbors")
    want = [(np.frombuffer(m[1], np.uint32).reshape(4, 4096), pickle.loads(m[2])) for m in recording if len(m) == 3]
    out, component = run({"channels": (3, 0), "block_frames": 2}, recording, 5)
    data = [m for m in out if m.type == codec.DATA]
    # blocks of at most 2 (fewer when the replay has sent nothing more yet), back to back
    assert all(1 <= m.count <= 2 for m in data) and [m.index for m in data] == list(np.cumsum([0] + [
        m.count for m in data])[:-1])
    assert out[-1].count == 5 and component.counters.errors == 0 and component.mapper.frames == 5
    mca = np.concatenate([m.arrays["mca"] for m in data])
    dtc = np.concatenate([m.arrays["dtc"] for m in data])
    np.testing.assert_array_equal(mca, np.stack([w[0][[3, 0]] for w in want]))
    np.testing.assert_allclose(dtc, np.stack([w[1][7][[3, 0]] for w in want]), rtol=1e-12)
    assert data[0].arrays["window_counts"].shape == (data[0].count, 2, 2)
    assert json.loads(json.dumps(component.capabilities))["protocol"] == "xspress3-zmq"


def test_a_cut_series_declares_its_unreceived_rest_at_its_end(plain) -> None:
    """The streamer does not say a series' length: it is taken to cover the scan, so frames
    3 and 4 that never came are declared at the series end, not left to a master's timeout."""
    recording = [m for m in messages("xspress3-multipart.cbors")
                 if not (len(m) == 3 and json.loads(m[0])["frame"] >= 3)]
    out, component = run({}, recording, 5)
    gaps = [(m.index, m.count) for m in out if m.type == codec.GAP]
    assert gaps == [(3, 2)] and out[-1].count == 5 and component.mapper.gap_points == 2
