"""PcapIngester end to end on real PandA captures, through the ``position`` processor.

Real processes: the embedded Tango DB, TopologyManager, PipelineMaster, one
PipelineWorker running ``position``, Sorter, the Sink, the PcapIngester
server, and a probe consuming the sorter's output as the writers do. The
PandA's side of the data port is :class:`support.panda.PandaReplay`: it
sends the bytes real PandAs sent (the PandABlocks team's dumps, from the
``pandablocks`` 0.10.4 sdist on PyPI); the expected values are what the
``pandablocks`` client decodes from the same bytes. The official
PandABlocks-server simulator is C on GitHub only and is not built here.

The master's IncompleteTimeoutSeconds is long (60 s): a scan whose capture
lost samples ends within the test's time only because the ingester
declares them missing.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tango
import zmq

from services.ops.masters import ScanMasters
from services.ops.probe import Probe
from services.registration import TangoManagerLink
from support import ServerPool, topology_props, wait_for
from support.documents import minimal
from sink.queries import QUERY, SinkClient
from support.panda import Capture, PandaReplay, dump, oracle_columns, republished_recording
from support.scripts import on_path

pytestmark = pytest.mark.slow

MANAGER = "tangomesh/topology/manager"
PIPE = "pcap"
INGESTER = "test/pcap/ingester"
REPUBLISHED = "test/pcap/republished"  # a second device of the server: the MAX IV republisher's PUB as "pandazmq"
SINK = "test/pcap/sink"
LOOP = "127.0.0.1"
X_COLUMN, Y_COLUMN = "COUNTER1.OUT.Mean", "COUNTER3.OUT.Value"  # x mapped by ArrayNames, y by its default name


@pytest.fixture(scope="module")
def script_path(tmp_path_factory):
    with on_path(tmp_path_factory.mktemp("bin"), {"PcapIngester": "ingesters.devices:pcap_main"}):
        yield


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory, script_path):
    logs = tmp_path_factory.mktemp("pcap-logs")
    panda = PandaReplay()
    publisher = zmq.Context.instance().socket(zmq.XPUB)  # XPUB: the subscription is seen, so nothing is sent early
    pub_port = publisher.bind_to_random_port(f"tcp://{LOOP}")
    pool = ServerPool(logs)
    try:
        pool.start("TopologyManager/pcap", {"TopologyManager": {MANAGER: topology_props()}})
        pool.start("Sink/pcap", {"Sink": {SINK: {"DataHost": LOOP, "MemoryBudgetBytes": 64 * 2**20}}})
        pool.start("Sorter/pcap", {"Sorter": {"test/pcap/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/pcap", {"PipelineWorker": {"test/pcap-worker/1": {
            "Pipeline": PIPE, "HeartbeatSeconds": 0.2}}})
        pool.start("PipelineMaster/pcap", {"PipelineMaster": {"test/pcap/master": {
            "DataHost": LOOP, "Pipeline": PIPE, "IncompleteTimeoutSeconds": 60.0}}})
        ingester = pool.start("PcapIngester/test", {"PcapIngester": {INGESTER: {
            "DataHost": LOOP, "Pipeline": PIPE, "PandaHost": f"{LOOP}:{panda.port}", "Stream": "panda",
            "BlockPoints": 500, "ArrayNames": f"{X_COLUMN}=x_enc", "ScanWaitSeconds": 3.0,
            "ReconnectSeconds": 0.3},
            REPUBLISHED: {"DataHost": LOOP, "Pipeline": PIPE, "PandaHost": f"tcp://{LOOP}:{pub_port}",
                          "Stream": "pandazmq", "BlockPoints": 100, "ScanWaitSeconds": 3.0}}})
        link = TangoManagerLink(MANAGER)
        probe = Probe(PIPE, link, LOOP, keep=True, name="test/pcap/probe")
        wait_for(lambda: {"source", "sorter", "recorder", "master"} <= {
            s["kind"] for s in link.lookup({"pipeline": PIPE})}, 30, "the pipeline and the ingester's source")
        wait_for(lambda: len(json.loads(tango.DeviceProxy("test/pcap/master").WorkerTable)) == 1, 30, "the worker")
        wait_for(lambda: SINK in {s["name"] for s in link.lookup({})}, 20, "the sink")
        panda.wait_connected()
        assert publisher.poll(20_000), "the republish ingester did not subscribe"
        assert publisher.recv() == b"\x01"
        sink = SinkClient(json.loads(tango.DeviceProxy(SINK).Endpoints)[QUERY])
        yield {"panda": panda, "probe": probe, "link": link, "ingester": ingester,
               "device": tango.DeviceProxy(INGESTER), "sink": sink, "publisher": publisher,
               "republished": tango.DeviceProxy(REPUBLISHED)}
        sink.close()
        probe.close()
    finally:
        pool.stop_all()
        panda.close()
        publisher.close(0)


def document(scan_id: str, points: int, stream: str = "panda") -> dict:
    doc = minimal({"type": "points", "points": points})
    doc["scan"]["id"] = scan_id
    axes = {"x": {"encoder": "panda/x_enc"}, "y": {"encoder": f"panda/{Y_COLUMN}"}} if stream == "panda" else \
        {"x": {"encoder": "pandazmq/energy"}, "y": {"encoder": "pandazmq/INENC3.VAL.Mean"}}
    doc["analysis"] = {PIPE: {"processor": "position", "streams": [stream], "settings": {"axes": axes}}}
    return doc


def run_capture(mesh, scan_id: str, points: int, capture: bytes, chunk: int = 4096, timeout: float = 40):
    """StartScan, then the PandA sends ``capture``; the probe's tally once the scan ended."""
    masters = ScanMasters(mesh["link"], [PIPE])
    masters.start(document(scan_id, points))
    try:
        mesh["panda"].arm(capture, chunk)
        wait_for(lambda: mesh["probe"].ended(scan_id) is not None, timeout,
                 f"scan {scan_id} to end\n{mesh['ingester'].log_text()[-3000:]}")
    except BaseException:
        masters.abort(scan_id)
        raise
    return mesh["probe"].ended(scan_id)


def positions(tally, points: int) -> dict[str, np.ndarray]:
    """x and y per index, NaN where nothing was delivered."""
    out = {a: np.full(points, np.nan) for a in ("x", "y")}
    for start, arrays in tally.chunks:
        for a in out:
            if a in arrays:
                out[a][start:start + len(arrays[a])] = arrays[a]
    return out


@pytest.mark.parametrize("name", ["fast_dump", "raw_dump"])
def test_the_positions_are_the_captures_values(mesh, name) -> None:
    """A real SCALED capture (58 samples) and a real RAW one (10000 samples, Means divided by
    the gate duration): every index holds the value the pandablocks client decodes."""
    dev = mesh["device"]
    errors0, samples0 = dev.Errors, dev.Samples
    recorded = dump(name)
    want = oracle_columns(recorded)
    points = len(want[X_COLUMN])
    scan = f"pcap-{name}-{time.time_ns()}"
    tally = run_capture(mesh, scan, points, Capture.of(recorded).whole(), chunk=1500)
    assert not tally.aborted and tally.incomplete_points == 0 and tally.gap_points == 0 and tally.failed_points == 0
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(points))
    got = positions(tally, points)
    np.testing.assert_array_equal(got["x"], want[X_COLUMN])
    np.testing.assert_array_equal(got["y"], want[Y_COLUMN])
    assert dev.Samples == samples0 + points and dev.Errors == errors0
    assert mesh["panda"].options[-1] == b"XML FRAMED SCALED\n"
    assert dev.CurrentScan == "" and dev.LastEndReason == "Disarmed"
    sink = mesh["sink"]
    wait_for(lambda: sink.info(scan)["status"] == "complete", 10, "the sink to see the scan's end")
    info = sink.info(scan)
    assert (info["expected"], info["received"], info["missing"]) == (points, points, 0)
    np.testing.assert_array_equal(sink.get(scan, f"{PIPE}/x"), want[X_COLUMN])
    np.testing.assert_array_equal(sink.get(scan, f"{PIPE}/y"), want[Y_COLUMN])


def test_a_data_overrun_leaves_gaps_for_the_samples_never_sent(mesh) -> None:
    """The real RAW capture ended by the PandA after 1234 of 10000 samples with 'Data overrun':
    indices 0..1233 hold their values, 1234..9999 are declared missing (without the 60 s wait)."""
    dev = mesh["device"]
    gaps0, faulted0 = dev.GapPoints, dev.FaultedCaptures
    recorded = dump("raw_dump")
    want = oracle_columns(recorded)
    t0 = time.monotonic()
    scan = f"pcap-overrun-{time.time_ns()}"
    tally = run_capture(mesh, scan, 10000, Capture.of(recorded).cut(1234, "Data overrun"))
    assert time.monotonic() - t0 < 40
    assert tally.incomplete_points == 10000 - 1234 and not tally.aborted
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(1234))
    got = positions(tally, 10000)
    np.testing.assert_array_equal(got["x"][:1234], want[X_COLUMN][:1234])
    assert np.isnan(got["x"][1234:]).all()
    assert dev.GapPoints == gaps0 + 10000 - 1234 and dev.FaultedCaptures == faulted0 + 1
    assert dev.LastEndReason == "Data overrun"
    sink = mesh["sink"]
    wait_for(lambda: sink.info(scan)["status"] != "running", 10, "the sink to see the scan's end")
    info = sink.info(scan)
    # the missing indices went on as events without the stream: position fails them, with the reason
    assert (info["expected"], info["failed"], info["runs"][PIPE]["incomplete"]) == (10000, 8766, 8766)
    errors = info["runs"][PIPE]["errors"]  # the first few kept
    assert min(map(int, errors)) == 1234 and all("stream 'panda' is missing" in e for e in errors.values())
    in_sink = sink.get(scan, f"{PIPE}/x")
    np.testing.assert_array_equal(in_sink[:1234], want[X_COLUMN][:1234])
    assert np.isnan(in_sink[1234:]).all()


def test_the_panda_going_away_cuts_its_capture_and_the_next_capture_is_ingested(mesh) -> None:
    """Half the capture is sent, then the PandA disappears: that scan ends with what came, the
    rest missing; the PandA comes back on the same port, the ingester reconnects, and the next
    scan's capture arrives whole."""
    dev, panda = mesh["device"], mesh["panda"]
    connections0, samples0 = dev.Connections, dev.Samples
    recorded = dump("fast_dump")
    want = oracle_columns(recorded)
    whole = Capture.of(recorded).whole()
    cut_scan = f"pcap-cut-{time.time_ns()}"
    masters = ScanMasters(mesh["link"], [PIPE])
    masters.start(document(cut_scan, 58))
    try:
        panda.arm(whole[:len(whole) // 2], 512)
        wait_for(lambda: dev.Samples > samples0, 20, "the first samples")
        panda.go_away()
        wait_for(lambda: mesh["probe"].ended(cut_scan) is not None, 30, "the cut scan to end")
    except BaseException:
        masters.abort(cut_scan)
        raise
    cut = mesh["probe"].ended(cut_scan)
    sent = dev.Samples - samples0
    assert 0 < sent < 58 and cut.incomplete_points == 58 - sent
    np.testing.assert_array_equal(positions(cut, 58)["x"][:sent], want[X_COLUMN][:sent])
    assert dev.LastEndReason == "lost" and not dev.Connected
    panda.listen()
    panda.wait_connected()
    wait_for(lambda: dev.Connections == connections0 + 1 and dev.Connected, 20, "the ingester to reconnect")
    tally = run_capture(mesh, f"pcap-after-{time.time_ns()}", 58, whole)
    assert tally.incomplete_points == 0
    np.testing.assert_array_equal(positions(tally, 58)["x"], want[X_COLUMN])


def test_a_capture_without_a_scan_is_refused_then_the_next_works(mesh) -> None:
    dev = mesh["device"]
    refused0, discarded0 = dev.RefusedCaptures, dev.DiscardedSamples
    recorded = dump("fast_dump")
    mesh["panda"].arm(Capture.of(recorded).whole())
    wait_for(lambda: dev.RefusedCaptures == refused0 + 1 and dev.DiscardedSamples == discarded0 + 58, 20,
             "the capture to be refused and drained")
    assert dev.State() == tango.DevState.ON
    tally = run_capture(mesh, f"pcap-after-refusal-{time.time_ns()}", 58, Capture.of(recorded).whole())
    np.testing.assert_array_equal(positions(tally, 58)["y"], oracle_columns(recorded)[Y_COLUMN])


def test_bytes_the_protocol_forbids_are_refused_and_the_ingester_reconnects(mesh) -> None:
    """A header whose sample size disagrees with its fields: counted, logged, the connection
    dropped and made anew; the next capture arrives whole."""
    dev, panda = mesh["device"], mesh["panda"]
    errors0, connections0, accepted0 = dev.Errors, dev.Connections, panda.connections
    recorded = dump("fast_dump")
    bad = Capture.of(recorded).whole().replace(b'sample_bytes="52"', b'sample_bytes="50"')
    panda.arm(bad)
    wait_for(lambda: dev.Connections == connections0 + 1 and panda.connections == accepted0 + 1, 20,
             "the ingester to reconnect")
    assert dev.Errors == errors0 + 1
    assert "sample_bytes 50 but the fields take 52" in mesh["ingester"].log_text()
    tally = run_capture(mesh, f"pcap-after-bad-{time.time_ns()}", 58, Capture.of(recorded).whole())
    assert tally.incomplete_points == 0


def test_a_bad_property_leaves_the_device_in_fault_saying_why(mesh, tmp_path) -> None:
    pool = ServerPool(tmp_path)
    try:
        pool.start("PcapIngester/bad", {"PcapIngester": {"test/pcap/bad": {
            "Pipeline": PIPE, "PandaHost": "panda:8889", "CaptureOptions": "BASE64"}}})
        bad = tango.DeviceProxy("test/pcap/bad")
        assert bad.State() == tango.DevState.FAULT
        assert "CaptureOptions" in bad.Status()
        with pytest.raises(tango.DevFailed, match="TANGOMESH_Fault"):
            bad.Samples
    finally:
        pool.stop_all()


def test_the_max_iv_republished_stream_gives_its_positions_and_a_lost_message_is_a_gap(mesh) -> None:
    """dranspose's real recording of the MAX IV PCAP republisher (ZeroMQ PUB, JSON rows) sent
    twice: whole, every index holds its row's energy; then with one data message lost (as a
    PUB drops for a slow reader), its 15 rows are declared missing at their own indices."""
    import json as json_

    dev, publisher = mesh["republished"], mesh["publisher"]
    messages = republished_recording()
    rows = [json_.loads(m) for m in messages[1:-1]]
    energy = np.concatenate([r["energy"] for r in rows])
    assert len(energy) == 1500
    for lost in (None, 40):
        scan = f"pcap-zmq-{lost}-{time.time_ns()}"
        masters = ScanMasters(mesh["link"], [PIPE])
        masters.start(document(scan, 1500, stream="pandazmq"))
        try:
            publisher.send(messages[0])
            wait_for(lambda: dev.CurrentScan == scan, 20, "the series to join the scan")
            for k, message in enumerate(messages[1:], start=1):
                if k != lost:
                    publisher.send(message)
            wait_for(lambda: mesh["probe"].ended(scan) is not None, 30, f"scan {scan} to end")
        except BaseException:
            masters.abort(scan)
            raise
        tally = mesh["probe"].ended(scan)
        got = positions(tally, 1500)["x"]
        if lost is None:
            assert tally.incomplete_points == 0
            np.testing.assert_array_equal(got, energy)
        else:
            first, count = rows[lost - 1]["frame_number"], len(rows[lost - 1]["energy"])
            missing = np.zeros(1500, bool)
            missing[first:first + count] = True
            assert tally.incomplete_points == count
            assert np.isnan(got[missing]).all()
            np.testing.assert_array_equal(got[~missing], energy[~missing])
