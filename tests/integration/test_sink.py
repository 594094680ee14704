"""The Sink end to end: real TopologyManager, pipeline and Sink processes,
simulated sources; maps checked point by point against the simulation's truth,
Lavue's own client on the ZMQ stream, Tango change events, the LRU budget
against the process RSS, and queries good and bad."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import psutil
import pytest
import tango
import zmq

from support import ServerPool, topology_props, wait_for
from support.peers import RegisteredPeer
from services import codec, protocol
from services.ops import cli, simulate
from services.sim import profiles
from services.registration import TangoManagerLink
from sink.queries import QUERY, QueryError, SinkClient

MANAGER = "tangomesh/topology/manager"
PIPE = "s1"
SINK = "test/sink/main"
LOOP = "127.0.0.1"
SPECTRA = profiles.Profile({"xspress3": {"mca": ("<u4", (4096,))}}, "passthrough", {"arrays": ["xspress3/mca"]},
                           profiles.noise_values({"xspress3": {"mca": ("<u4", (4096,))}}))


def raster(rows: int, cols: int, snake: bool = False) -> dict:
    return {"type": "raster", "snake": snake, "axes": [
        {"name": "samx", "units": "um", "start": 0.0, "stop": (cols - 1) * 0.5, "points": cols},
        {"name": "samy", "units": "um", "start": 5.0, "stop": 5.0 + (rows - 1) * 0.25, "points": rows}]}


def truth_map(geometry: dict, values: np.ndarray) -> np.ndarray:
    if geometry["type"] == "line":
        return values
    cols, rows = (a["points"] for a in geometry["axes"])
    grid = values.reshape(rows, cols).copy()
    if geometry["snake"]:
        grid[1::2] = grid[1::2, ::-1]
    return grid


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("sink-logs"))
    try:
        pool.start("TopologyManager/sink", {"TopologyManager": {MANAGER: topology_props(heartbeat=0.5, lease=3.0)}})
        pool.start("Sink/main", {"Sink": {SINK: {"DataHost": LOOP, "MemoryBudgetBytes": 512 * 2**20,
                                                 "ViewerRateHz": 10.0, "DatasourcesSeconds": 0.5}}})
        pool.start("Sorter/s1", {"Sorter": {"test/s1/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        for k in range(2):
            pool.start(f"PipelineWorker/s1-{k}", {"PipelineWorker": {f"test/s1-worker/{k}": {"Pipeline": PIPE}}})
        pool.start("PipelineMaster/s1", {"PipelineMaster": {"test/s1/master": {"DataHost": LOOP, "Pipeline": PIPE}}})
        link = TangoManagerLink(MANAGER)
        master = tango.DeviceProxy("test/s1/master")
        wait_for(lambda: len(json.loads(master.WorkerTable)) == 2, 20, "two workers to join the master")
        wait_for(lambda: {"test/s1/sorter", SINK} <= {s["name"] for s in link.lookup({})}, 20, "sorter and sink")
        beamline = simulate.SimBeamline(PIPE, "counters", link)
        sink = tango.DeviceProxy(SINK)
        client = SinkClient(json.loads(sink.Endpoints)[QUERY])
        yield pool, link, beamline, sink, client
        client.close()
        beamline.close()
    finally:
        pool.stop_all()


@pytest.mark.parametrize("geometry", [raster(20, 30), raster(25, 24, snake=True),
                                      {"type": "line", "axes": [{"name": "samx", "units": "mm", "start": 0.0,
                                                                 "stop": 1.0, "points": 700}]}],
                         ids=["raster", "snake", "line"])
def test_maps_equal_the_simulated_truth_point_by_point(mesh, geometry, capsys) -> None:
    _, _, beamline, sink, client = mesh
    points = int(np.prod([a["points"] for a in geometry["axes"]]))
    summary, _ = beamline.scan(points, block=50, geometry=geometry)
    scan = summary["scan"]
    wait_for(lambda: client.info(scan)["status"] == "complete", 10, "the sink to see the scan's end")
    info = client.info(scan)
    assert (info["expected"], info["received"], info["missing"], info["duplicates"]) == (points, points, 0, 0)
    assert info["metadata"]["scan"]["geometry"] == geometry
    truth = profiles.expected_counters(np.arange(points))
    assert sorted(info["products"]) == sorted(f"{PIPE}/{n}" for n in truth)
    for name, values in truth.items():
        np.testing.assert_allclose(client.get(scan, f"{PIPE}/{name}"), truth_map(geometry, values), rtol=1e-13,
                                   err_msg=name)
    if geometry["type"] == "raster":  # a slice is the same cells of the map
        part = client.get(scan, f"{PIPE}/i0", rows=(3, 7), cols=(2, 9))
        np.testing.assert_array_equal(part, truth_map(geometry, truth["i0"])[3:7, 2:9])

    assert cli.main(["query", scan, "--product", f"{PIPE}/sum_norm", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["received"] == points and printed["products"][f"{PIPE}/i0"]["dtype"] == "<f8"
    assert printed["statistics"]["nan"] == 0 and printed["statistics"]["max"] == pytest.approx(truth["sum_norm"].max())
    assert cli.main(["query", scan]) == 0
    table = capsys.readouterr().out
    assert "points received" in table and f"{PIPE}/i1_norm" in table
    assert json.loads(sink.ScanInfo(scan))["received"] == points
    assert scan in [s["scan"] for s in json.loads(sink.ListScans())]


def test_lavue_client_shows_the_maps_and_follows_the_product_list(mesh) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from lavuelib.imageSource import ZMQSource

    _, _, beamline, sink, client = mesh
    topic = f"{PIPE}/i1_norm"
    source = ZMQSource()
    source.setConfiguration(f"{sink.LavueAddress}:{topic}")  # the colon form: topics contain "/"
    assert source.connect()
    images: list[tuple[np.ndarray, str, dict]] = []
    announced: list[list[str]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            data, name, meta = source.getData()
            if name == "__ERROR__":
                images.append((None, data, {}))
            elif isinstance(data, np.ndarray):
                images.append((data.copy(), name, json.loads(meta) if meta else {}))
            elif data == "" and meta:
                announced.append(json.loads(meta)["datasources"])
            else:
                time.sleep(0.01)

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    try:
        geometry = raster(30, 40)
        summary, _ = beamline.scan(1200, rate=1500, block=20, geometry=geometry)
        scan = summary["scan"]
        final = client.get(scan, topic)
        wait_for(lambda: any(np.array_equal(img, final.T, equal_nan=True) for img, _, _ in images if img is not None),
                 10, "Lavue to receive the finished map")
        assert not [m for img, m, _ in images if img is None], "lavue reported decode errors"
        live = [(img, name, meta) for img, name, meta in images if meta.get("scan") == scan]
        assert len(live) >= 3, "pictures arrive while the scan runs, not only at its end"
        assert len({name for _, name, _ in live}) == len(live)  # each picture a new name, so lavue shows it
        partial = [img for img, _, _ in live if np.isnan(img).any()]
        assert partial, "a map in progress, unmeasured points NaN"
        img, _, meta = live[-1]
        assert img.shape == (40, 30) and meta["axisscales"] == [0.0, 5.0, 0.5, 0.25]
        assert meta["axislabels"] == ["samx", "samy", "um", "um"]
        first_products = set(json.loads(sink.ScanInfo(scan))["products"])
        wait_for(lambda: any(set(a) == first_products for a in announced), 5, "the datasources announcement")

        # the next scan is configured differently: fewer counters, so other products
        settings = {"counters": ["i1"], "normalise_by": "i0"}
        summary2, _ = beamline.scan(1200, block=100, geometry=geometry, analysis={"settings": settings})
        second_products = set(json.loads(sink.ScanInfo(summary2["scan"]))["products"])
        assert second_products != first_products and f"{PIPE}/diode" not in second_products
        wait_for(lambda: any(set(a) == second_products for a in announced), 5, "the new datasources announcement")
    finally:
        stop.set()
        reader.join(2)
        source.disconnect()


def test_tango_clients_get_preview_and_progress_events_during_a_scan(mesh) -> None:
    _, _, beamline, sink, client = mesh
    sink.PreviewProduct = f"{PIPE}/sum_norm"
    with pytest.raises(tango.DevFailed, match="no live product"):
        sink.PreviewProduct = f"{PIPE}/nothing"
    observer = tango.DeviceProxy(SINK)
    received: list[int] = []
    previews: list[np.ndarray] = []
    ids = [observer.subscribe_event("PointsReceived", tango.EventType.CHANGE_EVENT,
                                    lambda e: e.err or received.append(e.attr_value.value)),
           observer.subscribe_event("Preview", tango.EventType.CHANGE_EVENT,
                                    lambda e: e.err or previews.append(np.array(e.attr_value.value)))]
    try:
        time.sleep(0.3)
        n_before = (len(received), len(previews))
        summary, _ = beamline.scan(1500, rate=1000, block=25, geometry=raster(30, 50))
        final = client.get(summary["scan"], f"{PIPE}/sum_norm")
        wait_for(lambda: received and received[-1] == 1500, 5, "the last progress event")
        wait_for(lambda: previews and np.array_equal(previews[-1], final, equal_nan=True), 5, "the final preview")
    finally:
        for i in ids:
            observer.unsubscribe_event(i)
    during = received[n_before[0]:]
    assert len([v for v in during if 0 < v < 1500]) >= 3, during  # progress while the scan ran
    assert during == sorted(during)
    assert len(previews) - n_before[1] >= 3 and any(np.isnan(p).any() for p in previews[n_before[1]:])
    assert sink.PointsExpected == 1500 and sink.Progress == 1.0


def test_lru_budget_holds_in_accounting_and_in_rss(mesh, tmp_path) -> None:
    pool, link, _, _, _ = mesh
    budget = 40 * 2**20
    handle = pool.start("Sink/lru", {"Sink": {"test/sink/lru": {"DataHost": LOOP, "MemoryBudgetBytes": budget,
                                                                 "Pipeline": PIPE}}})
    spectra = None
    try:
        lru = tango.DeviceProxy("test/sink/lru")
        wait_for(lambda: lru.Registered, 10, "the small sink to register")
        client = SinkClient(json.loads(lru.Endpoints)[QUERY])
        spectra = simulate.SimBeamline(PIPE, SPECTRA, link)
        process = psutil.Process(handle.pid)
        baseline = process.memory_info().rss
        peak_rss = [baseline]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak_rss[0] = max(peak_rss[0], process.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        points = 500  # 500 x 4096 float64 = 16 MB a scan: two fit in 40 MiB, three do not
        scans = []

        def run(name: str) -> str:
            summary, _ = spectra.scan(points, block=10, scan_id=f"lru-{name}-{time.time_ns()}")
            scan = summary["scan"]
            wait_for(lambda: client.info(scan)["status"] == "complete", 10, f"scan {name} complete in the sink")
            info = client.info(scan)  # the scan just written is whole, whatever it had to evict
            assert info["received"] == points and not info["refused"], info
            scans.append(scan)
            return scan

        a, b = run("a"), run("b")
        assert lru.Evictions == 0
        client.get(a, f"{PIPE}/xspress3/mca")  # reading A makes B the least recently used
        c = run("c")
        assert [s["scan"] for s in client.list()["scans"]] == [a, c]
        d = run("d")
        e = run("e")
        f = run("f")
        g = run("g")
        evicted = client.list()["evicted"]
        assert evicted == [b, a, c, d, e], evicted
        assert [s["scan"] for s in json.loads(lru.ListScans())] == [f, g]
        with pytest.raises(QueryError, match="evicted") as caught:
            client.get(b, f"{PIPE}/xspress3/mca")
        assert caught.value.evicted
        with pytest.raises(tango.DevFailed, match="evicted"):
            lru.ScanInfo(a)
        sampling.set()
        sampler.join()
        assert lru.PeakBytes <= budget and lru.ResidentBytes <= budget and lru.Evictions == 5
        through = len(scans) * points * 4096 * 8
        margin = 48 * 2**20  # interpreter heap, ZeroMQ buffers, chunks in flight
        growth = peak_rss[0] - baseline
        print(f"RSS growth {growth / 2**20:.1f} MiB for {through / 2**20:.0f} MiB through a {budget / 2**20:.0f} MiB budget")
        assert growth <= budget + margin < through
        client.close()
    finally:
        if spectra is not None:
            spectra.close()
        handle.kill(hard=False)


def test_bad_queries_and_bad_data_get_errors_and_the_sink_stays_up(mesh) -> None:
    _, link, _, sink, client = mesh
    errors0 = sink.Errors
    endpoints = json.loads(sink.Endpoints)
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(endpoints[QUERY])
    for frames, why in [([b"\xc1garbage"], "not valid msgpack"),
                        (codec.encode(codec.Message(codec.DATA, count=0)), "takes 'query' messages"),
                        (codec.encode(codec.Message(codec.QUERY, meta={"op": "get", "scan": 3})), "sink-query")]:
        req.send_multipart(frames)
        assert req.poll(5000), "no reply"
        reply = codec.recv(req)
        assert reply.type == codec.REPLY and not reply.meta["ok"] and why in reply.meta["error"], reply.meta
    req.close()
    with pytest.raises(QueryError, match="no scan 'nope'"):
        client.info("nope")
    with pytest.raises(tango.DevFailed, match="no scan 'nope'"):
        sink.ScanInfo("nope")

    # bad data from a registered sorter of the pipeline (the only peer whose results a sink takes)
    sorter = RegisteredPeer(link, "test/s1-forged/sorter", protocol.Kind.SORTER, PIPE)
    push = sorter.socket(zmq.PUSH, endpoints["data_in"])  # linger: close() must not discard what is queued
    push.send_multipart([b"not a header"])
    codec.send(push, codec.Message(codec.RESULT, scan="unknown", stream=PIPE, index=0, count=1,
                                   arrays={"x": np.zeros(1)}))
    codec.send(push, codec.Message(codec.SCAN_START, scan="x", stream=PIPE, meta={"scan": {"bad": 1}}))
    push.close()
    # 3 bad queries, the query and the ScanInfo for "nope", 3 bad data messages
    try:
        wait_for(lambda: sink.Errors >= errors0 + 5 + 3, 5, "the refusals to be counted")
    finally:
        sorter.close()
    assert "scan_start refused" in sink.Status()
    assert sink.state() == tango.DevState.ON and client.stats()["budget"] == 512 * 2**20
