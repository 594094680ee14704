"""The pipeline core end to end: real TopologyManager, PipelineMaster, workers,
Sorter and Recorder processes, simulated sources and a probe consumer on real
sockets. One mesh serves the module; each test runs its own scans."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import tango
import zmq

from support import ServerHandle, ServerPool, topology_props, wait_for
from services import protocol
from services import codec
from services.ops import simulate
from services.sim import profiles
from services.registration import TangoManagerLink

MANAGER = "tangomesh/topology/manager"
PIPE = "p1"
MASTER = "test/p1/master"
SORTER = "test/p1/sorter"
RECORDER = "test/p1/recorder"
LOOP = "127.0.0.1"
GAP_TIMEOUT = 3.0


def worker_server(k: int) -> tuple[str, dict]:
    return f"PipelineWorker/p1-{k}", {"PipelineWorker": {f"test/p1-worker/{k}": {
        "Pipeline": PIPE, "HeartbeatSeconds": 0.2}}}


LEASE = 3.0  # the manager's lease: a killed server leaves the topology this long after its last heartbeat
MASTER_TIMEOUT = 3.0  # the sorter's MasterTimeoutSeconds


def sorter_server() -> tuple[str, dict]:
    return "Sorter/p1", {"Sorter": {SORTER: {"DataHost": LOOP, "Pipeline": PIPE, "GapTimeoutSeconds": GAP_TIMEOUT,
                                             "ChunkPoints": 500, "MasterTimeoutSeconds": MASTER_TIMEOUT}}}


def master_server() -> tuple[str, dict]:
    return "PipelineMaster/p1", {"PipelineMaster": {MASTER: {
        "DataHost": LOOP, "Pipeline": PIPE, "WorkerTimeoutSeconds": 1.0, "IncompleteTimeoutSeconds": 1.0,
        "MaxUnitPoints": 200}}}


@dataclass
class Mesh:
    pool: ServerPool
    link: TangoManagerLink
    beamline: simulate.SimBeamline
    workers: dict[int, ServerHandle]
    master: tango.DeviceProxy
    sorter: tango.DeviceProxy
    recorder: tango.DeviceProxy
    sorter_handle: ServerHandle
    master_handle: ServerHandle

    def worker_table(self) -> list[dict]:
        return json.loads(self.master.WorkerTable)

    def restart_worker(self, k: int) -> None:
        self.workers[k] = self.pool.start(*worker_server(k))
        wait_for(lambda: len(self.worker_table()) == len(self.workers), 15, f"worker {k} to join the master")

    def restart_sorter(self) -> None:
        """Start the Sorter server again (after a kill): a new process, a new endpoint, the same device."""
        self.sorter_handle = self.pool.start(*sorter_server())


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("pipeline-logs"))
    try:
        pool.start("TopologyManager/pipeline", {"TopologyManager": {MANAGER: topology_props(heartbeat=0.5, lease=LEASE)}})
        pool.start("Recorder/p1", {"Recorder": {RECORDER: {"DataHost": LOOP, "Pipeline": PIPE}}})
        sorter_handle = pool.start(*sorter_server())
        workers = {k: pool.start(*worker_server(k)) for k in range(3)}
        master_handle = pool.start(*master_server())
        link = TangoManagerLink(MANAGER)
        master = tango.DeviceProxy(MASTER)
        wait_for(lambda: len(json.loads(master.WorkerTable)) == 3, 20, "three workers to join the master")
        wait_for(lambda: {SORTER, RECORDER} <= {s["name"] for s in link.lookup({"pipeline": PIPE})}, 20,
                 "sorter and recorder to register")
        beamline = simulate.SimBeamline(PIPE, "counters", link, keep=True)
        yield Mesh(pool, link, beamline, workers, master, tango.DeviceProxy(SORTER), tango.DeviceProxy(RECORDER),
                   sorter_handle, master_handle)
        beamline.close()
    finally:
        pool.stop_all()


def assert_lossless(summary: dict, points: int) -> None:
    assert summary["points_delivered"] == points, summary
    assert summary["missing"] == 0 and summary["duplicates"] == 0 and summary["out_of_order"] == 0, summary
    assert not summary["aborted"], summary


def test_ten_thousand_points_three_streams_three_workers(mesh) -> None:
    mesh.recorder.Clear()
    # The streams block differently (a PandABox, a scaler and a diode ADC rarely agree): the master joins them.
    summary, tally = mesh.beamline.scan(10_000, block={"pandabox": 100, "scaler": 37, "diode": 250})
    assert_lossless(summary, 10_000)
    assert summary["failed_points"] == 0 and summary["incomplete_points"] == 0
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(10_000))
    got = tally.arrays()
    for name, want in profiles.expected_counters(np.arange(10_000)).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-13, err_msg=name)

    # the Recorder, a separate consumer, got the same scan: start, chunks tiling every index in order, end
    records = [r for r in json.loads(mesh.recorder.LatestRecords(0)) if r["scan"] == summary["scan"]]
    assert records[0]["type"] == "scan_start" and records[-1]["type"] == "scan_end"
    chunks = records[1:-1]
    assert all(r["type"] == "result" for r in chunks)
    assert [r["index"] for r in chunks] == list(np.cumsum([0] + [r["count"] for r in chunks[:-1]]))
    assert sum(r["count"] for r in chunks) == 10_000
    assert len(chunks) < 10_000 / 100  # chunking cuts downstream messages
    expected_sum = profiles.expected_counters(np.arange(10_000))["sum"].sum()
    assert sum(r["arrays"]["sum"]["sum"] for r in chunks) == pytest.approx(expected_sum, rel=1e-12)
    assert records[-1]["type"] == "scan_end"
    assert all(w["points"] > 0 for w in mesh.worker_table()), "every worker got a share"
    assert mesh.master.Progress == 1.0
    assert json.loads(mesh.master.ScanSummary)["acked"] == 10_000


def test_kill_minus_9_worker_at_random_moments(mesh) -> None:
    rng = random.Random(20261121)
    redispatched0 = mesh.master.Redispatched
    points, rate = 4000, 4000.0
    observer = tango.DeviceProxy(MASTER)  # the kill thread's own proxy
    held_at_kill = []
    for round_ in range(5):
        victim = rng.choice(sorted(mesh.workers))
        moment = rng.uniform(0.1, 0.7) * points / rate
        handle = mesh.workers[victim]
        name = f"test/p1-worker/{victim}"

        def kill() -> None:
            # a random moment, then the first instant the victim holds unacknowledged work
            time.sleep(moment)
            deadline = time.monotonic() + 3.0  # a loaded machine answers WorkerTable slowly: give it time
            while time.monotonic() < deadline:
                table = {w["name"]: w for w in json.loads(observer.WorkerTable)}
                if table.get(name, {}).get("in_flight", 0) > 0:
                    held_at_kill.append(table[name]["in_flight"])
                    break
            handle.kill(hard=True)

        summary, tally = mesh.beamline.scan(points, rate=rate, block=20, during=kill)
        assert_lossless(summary, points)
        got = tally.arrays()["sum_norm"]
        np.testing.assert_allclose(got, profiles.expected_counters(np.arange(points))["sum_norm"], rtol=1e-13)
        mesh.restart_worker(victim)
    assert len(held_at_kill) >= 3, "most kills hit a worker holding work"
    assert mesh.master.Redispatched > redispatched0, "the killed workers' units went to others"
    assert mesh.master.State() == tango.DevState.ON


def test_source_that_skips_an_index_gives_incomplete_events(mesh) -> None:
    t0 = time.monotonic()
    summary, tally = mesh.beamline.scan(3000, block=100, skip={"diode": {500}})
    assert time.monotonic() - t0 < 15, "the scan was not held up"
    assert_lossless(summary, 3000)
    assert summary["incomplete_points"] == 100
    # `counters` needs the diode for those points: they fail, with the reason, the rest is right
    assert summary["failed_points"] == 100
    assert json.loads(mesh.master.ScanSummary)["incomplete"] == 100
    assert sorted(tally.errors) == list(range(500, 600))
    assert all("diode" in why for why in tally.errors.values())
    # those events come without values; every other one is complete and right
    indices = tally.delivered_indices()
    np.testing.assert_array_equal(indices, np.delete(np.arange(3000), np.s_[500:600]))
    np.testing.assert_allclose(tally.arrays()["sum_norm"], profiles.expected_counters(indices)["sum_norm"], rtol=1e-13)


class RogueWorker:
    """A real DEALER that asks for work, heartbeats, and never returns a result."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.units: list[tuple[int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        codec.send(sock, protocol.credit(5, "test/rogue/1"))
        while not self.stop.is_set():
            if sock.poll(200):
                msg = codec.recv(sock)
                if msg.type == codec.DATA:
                    self.units.append((msg.index, msg.count))
            codec.send(sock, protocol.credit(0, "test/rogue/1"))
        sock.close(0)


def test_worker_that_never_answers_gives_a_gap_record(mesh) -> None:
    endpoint = mesh.link.lookup({"kind": "master", "pipeline": PIPE})[0]["endpoints"][protocol.WORK]
    rogue = RogueWorker(endpoint)
    wait_for(lambda: len(mesh.worker_table()) == 4, 10, "the rogue worker to be known")
    gaps0 = mesh.sorter.GapPoints
    try:
        t0 = time.monotonic()
        summary, tally = mesh.beamline.scan(2000, block=50, rate=4000)
        elapsed = time.monotonic() - t0
    finally:
        rogue.stop.set()
        rogue.thread.join(2)
    held = sum(count for _, count in rogue.units)
    assert held > 0, "the rogue worker got work (it asked for the most)"
    assert summary["gaps"] == held and summary["points_delivered"] == 2000 - held, summary
    assert summary["duplicates"] == 0 and summary["out_of_order"] == 0
    for index, count in rogue.units:
        assert (tally.counts[index:index + count] == 1).all()  # the gap record covers them, once
    assert mesh.sorter.GapPoints - gaps0 == held
    assert GAP_TIMEOUT <= elapsed < GAP_TIMEOUT + 10, "the gap came after the timeout, not later"
    assert json.loads(mesh.master.ScanSummary)["gaps"] == held  # gap acks free the master's copies
    wait_for(lambda: len(mesh.worker_table()) == 3, 5, "the silent rogue to be dropped")


def errors(proxy: tango.DeviceProxy) -> int:
    return proxy.read_attribute("Errors").value


def test_bad_input_on_every_data_endpoint(mesh) -> None:
    ctx = zmq.Context.instance()
    garbage = [b"\x00garbage"]
    fake_header = msgpack.packb({"v": 1, "t": "data"})  # missing keys
    before = {name: errors(p) for name, p in (("master", mesh.master), ("sorter", mesh.sorter),
                                              ("recorder", mesh.recorder))}
    services = {s["name"]: s for s in mesh.link.lookup({"pipeline": PIPE})}
    master_ep = services[MASTER]["endpoints"]
    sorter_ep = services[SORTER]["endpoints"][protocol.RESULTS_IN]

    def push(endpoint: str, *messages: list) -> None:
        sock = ctx.socket(zmq.PUSH)
        sock.linger = 2000
        sock.connect(endpoint)
        for frames in messages:
            sock.send_multipart(frames)
        sock.close()

    # master work socket: garbage, a data message instead of credit, an absurd credit
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 2000
    dealer.connect(master_ep[protocol.WORK])
    dealer.send_multipart(garbage)
    dealer.send_multipart([fake_header])
    dealer.send_multipart(codec.encode(codec.Message(codec.DATA, scan="x", count=1, arrays={"a": np.zeros(1)})))
    dealer.send_multipart(codec.encode(codec.Message(codec.CREDIT, count=20_000, meta={"worker": "x", "role": ""})))
    dealer.close()
    # master ack socket: garbage, an inverted range, an ack for a scan never started
    push(master_ep[protocol.ACKS], garbage,
         codec.encode(codec.Message(codec.ACK, scan="x", meta={"ranges": [[5, 2]], "gap": False})),
         codec.encode(protocol.ack("never-started", [(0, 10)])))
    # sorter: garbage, scan_start with an invalid document, a result with malformed meta
    push(sorter_ep, garbage,
         codec.encode(codec.Message(codec.SCAN_START, scan="bad", meta={"scan": {"scan": "nonsense"}})),
         codec.encode(codec.Message(codec.SCAN_END, scan="never-started", meta={"points": 3})))
    # recorder: garbage
    push(services[RECORDER]["endpoints"][protocol.DATA_IN], garbage, [fake_header])

    # the sources' own sockets, during a real scan: every kind of bad block, then the good data
    def bad_blocks(scan_id: str) -> None:
        src = mesh.beamline.sources["scaler"]
        good = profiles.counter_values("scaler", np.arange(10))
        src.socket.send_multipart(garbage)
        src.block("not-this-scan", 0, good)  # wrong scan id
        src.block(scan_id, 10**6, good)  # index beyond the scan's points
        src.block(scan_id, 0, {"i0": good["i0"].astype("<f4"), "i1": good["i1"]})  # wrong dtype
        src.block(scan_id, 0, {"i0": np.zeros((10, 2)), "i1": good["i1"]})  # wrong shape
        src.block(scan_id, 0, {"i0": good["i0"]})  # an array missing
        src.send(codec.Message(codec.DATA, scan=scan_id, stream="diode", index=0, count=10,
                               arrays=profiles.counter_values("diode", np.arange(10))))  # not its stream
        src.send(codec.Message(codec.SCAN_START, scan=scan_id))  # sources do not send scan control

    summary, tally = mesh.beamline.scan(1000, block=10, before=bad_blocks)
    assert_lossless(summary, 1000)
    assert summary["failed_points"] == 0
    master_refusals = 4 + 3 + 8
    wait_for(lambda: errors(mesh.master) - before["master"] >= master_refusals, 5, "master refusals counted")
    assert errors(mesh.master) - before["master"] == master_refusals
    assert errors(mesh.sorter) - before["sorter"] == 3
    assert errors(mesh.recorder) - before["recorder"] == 2
    for proxy in (mesh.master, mesh.sorter, mesh.recorder):
        assert proxy.State() == tango.DevState.ON
    # each refusal is explained in the status and the log
    assert "Last error" in mesh.master.Status()
    master_log = next(h for h in mesh.pool.started if h.name == "PipelineMaster/p1").log_text()
    for phrase in ("not valid msgpack", "no active scan 'not-this-scan'", "outside the scan's 1000 points",
                   "expected <f8[]", "expected ['i0', 'i1']", "sent stream 'diode'", "bad ack range",
                   "unknown scan 'never-started'", "workers send credit"):
        assert phrase in master_log, phrase
    # a bad StartScan is a DevFailed with the reason, and the master carries on
    with pytest.raises(tango.DevFailed) as exc:
        mesh.master.StartScan('{"scan": 1}')
    assert exc.value.args[0].reason == "TANGOMESH_InvalidInput" and "invalid scan" in exc.value.args[0].desc
    with pytest.raises(tango.DevFailed) as exc:
        mesh.master.EndScan("no-such-scan")
    assert "no scan 'no-such-scan'" in exc.value.args[0].desc
    with pytest.raises(tango.DevFailed) as exc:
        mesh.master.StartScan(json.dumps(profiles.ProfileScan(mesh.beamline.profile, PIPE, 10)
                                         .document(summary["scan"], 1)))
    assert "already started" in exc.value.args[0].desc


def test_a_scan_whose_processor_refuses_its_settings_is_refused_at_start_scan(mesh) -> None:
    """Bad analysis settings fail StartScan with the processor's own message
    (Processor.check_settings), counted in Errors; nothing reaches the workers
    or the sorter, instead of every point failing there."""
    workers = [tango.DeviceProxy(f"test/p1-worker/{k}") for k in sorted(mesh.workers)]
    before = ([w.EventsIn for w in workers], mesh.sorter.EventsIn, errors(mesh.master), mesh.master.CurrentScan)
    document = profiles.ProfileScan(mesh.beamline.profile, PIPE, 100, analysis={
        "settings": {"counters": ["i1"], "transmission": "i1"}}).document("refused-1", 1)
    with pytest.raises(tango.DevFailed) as exc:
        mesh.master.StartScan(json.dumps(document))
    error = exc.value.args[0]
    assert error.reason == "TANGOMESH_InvalidInput"
    assert "scan refused-1: counters settings refused: transmission needs normalise_by" in error.desc
    assert errors(mesh.master) == before[2] + 1
    assert mesh.master.CurrentScan == before[3]
    assert "transmission needs normalise_by" in mesh.master.Status()
    time.sleep(0.5)  # anything sent would have arrived by now
    assert ([w.EventsIn for w in workers], mesh.sorter.EventsIn) == before[:2]
    assert "refused-1" not in json.loads(mesh.sorter.FinishedScans)
    assert mesh.master.State() == tango.DevState.ON


def test_late_worker_slow_worker_and_bounded_burst_queue(mesh, tango_server) -> None:
    """Pipeline p2: spectra (16 KB per point) faster than one slow worker can
    take them. The master's queue fills to its bound and holds the sources
    back; a worker started mid-scan gets work at once; the slow one gets
    proportionally less (credit)."""
    bound = 4 * 2**20
    tango_server("Sorter/p2", {"Sorter": {"test/p2/sorter": {"DataHost": LOOP, "Pipeline": "p2"}}})
    tango_server("PipelineWorker/p2-slow", {"PipelineWorker": {"test/p2-worker/slow": {
        "Pipeline": "p2", "ProcessingDelaySeconds": 0.05, "HeartbeatSeconds": 0.2}}})
    tango_server("PipelineMaster/p2", {"PipelineMaster": {"test/p2/master": {
        "DataHost": LOOP, "Pipeline": "p2", "MaxQueueBytes": bound, "MaxUnitPoints": 16,
        "WorkerTimeoutSeconds": 1.0}}})
    master = tango.DeviceProxy("test/p2/master")
    wait_for(lambda: len(json.loads(master.WorkerTable)) == 1, 15, "the slow worker to join")
    beamline = simulate.SimBeamline("p2", "spectra", mesh.link)
    samples: list[tuple[float, int, bool, dict]] = []
    sampling = threading.Event()

    def sample() -> None:
        proxy = tango.DeviceProxy("test/p2/master")
        while not sampling.is_set():
            values = proxy.read_attributes(["QueueBytes", "SourcesHeld", "WorkerTable"])
            table = {w["name"]: w["points"] for w in json.loads(values[2].value)}
            samples.append((time.monotonic(), values[0].value, values[1].value, table))
            time.sleep(0.02)

    def start_fast_worker() -> None:
        time.sleep(1.5)
        tango_server("PipelineWorker/p2-fast", {"PipelineWorker": {"test/p2-worker/fast": {
            "Pipeline": "p2", "HeartbeatSeconds": 0.2}}})

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary, _ = beamline.scan(3000, block=16, during=start_fast_worker, timeout=60)
    finally:
        sampling.set()
        sampler.join(2)
        beamline.close()
    assert_lossless(summary, 3000)

    block_bytes = 16 * (4096 * 4 + 2 * 8)  # one message of each stream at most beyond the bound
    assert max(q for _, q, _, _ in samples) <= bound + block_bytes
    assert any(held for _, _, held, _ in samples), "sources were held back"
    assert summary["sources_blocked_s"] > 0.5 and master.HeldSeconds > 0.5

    fast, slow = "test/p2-worker/fast", "test/p2-worker/slow"
    joined = next(t for t, _, _, table in samples if fast in table)
    working = next(t for t, _, _, table in samples if table.get(fast, 0) > 0)
    assert working - joined <= 0.1, "a new worker gets work within a credit round trip (+ sampling period)"
    last = samples[-1][3]
    at_join = next(table for t, _, _, table in samples if t >= joined)
    fast_share = last[fast] - at_join.get(fast, 0)
    slow_share = last[slow] - at_join[slow]
    assert fast_share > 3 * slow_share, (fast_share, slow_share)


def test_a_ten_mib_argument_and_a_deep_json_get_a_short_counted_refusal(mesh) -> None:
    """Every string command of the manager and the master, fed 10 MiB and a
    100,000-deep JSON: a DevFailed under 1 KiB, counted, Status stays small,
    and the mesh goes on (the next test's scans)."""
    huge, deep = "x" * 10 * 2**20, "[" * 100_000 + "]" * 100_000
    manager = tango.DeviceProxy(MANAGER)
    for proxy in (manager, mesh.master):
        proxy.set_timeout_millis(10_000)
    calls = [(manager, c) for c in ("Register", "Heartbeat", "Deregister", "Lookup")] + \
            [(mesh.master, c) for c in ("StartScan", "EndScan", "AbortScan")]
    errors0 = {MANAGER: manager.Errors, MASTER: mesh.master.Errors}
    for proxy, command in calls:
        for argument in (huge, deep):
            with pytest.raises(tango.DevFailed) as caught:
                proxy.command_inout(command, argument)
            error = caught.value.args[0]
            assert len(error.desc) < 1024, f"{command}: {len(error.desc)} characters of error"
            assert error.reason in ("TANGOMESH_InvalidInput", "TANGOMESH_UnknownService"), (command, error.reason)
        assert len(proxy.Status()) < 4096, f"{command}: Status grew to {len(proxy.Status())} characters"
    assert manager.Errors >= errors0[MANAGER] + 8 and mesh.master.Errors == errors0[MASTER] + 6
    assert manager.State() == tango.DevState.ON and mesh.master.State() == tango.DevState.ON


def test_kill_minus_9_sorter_mid_scan_and_restart_it_the_scan_completes_lossless(mesh) -> None:
    """The sorter dies mid-scan with results in its queues and chunks unacknowledged; the pool starts it again.
    The master sees the new registration, re-sends the scan with where delivery stands and dispatches every
    unacknowledged unit again; the probe, which holds the first part, gets the rest exactly once."""
    points, rate = 6000, 1500.0  # about 4 s of scan: the kill lands well inside it even on a loaded machine
    scan_id = f"sorter-restart-{time.time_ns() // 1000}"
    probe = mesh.beamline.driver.probes[PIPE]
    old_endpoint = [s["endpoints"][protocol.RESULTS_IN] for s in mesh.link.lookup({"name": SORTER})]
    seen_at_kill: list[int] = []

    def kill_and_restart_the_sorter() -> None:
        wait_for(lambda: probe.points_seen(scan_id) >= 1000, 60, "a first part of the scan delivered")
        seen_at_kill.append(probe.points_seen(scan_id))
        mesh.sorter_handle.kill(hard=True)
        mesh.restart_sorter()

    summary, tally = mesh.beamline.scan(points, rate=rate, block=20, scan_id=scan_id,
                                        during=kill_and_restart_the_sorter, timeout=240.0)
    assert seen_at_kill and seen_at_kill[0] < points, f"the sorter died mid-scan ({seen_at_kill})"
    assert_lossless(summary, points)
    assert summary["gaps"] == 0 and summary["failed_points"] == 0, summary
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(points))
    got = tally.arrays()["sum_norm"]
    np.testing.assert_allclose(got, profiles.expected_counters(np.arange(points))["sum_norm"], rtol=1e-13)
    assert 0 < tally.end["resumed_from"] < points, tally.end  # the new sorter went on where delivery stood
    assert [s["endpoints"][protocol.RESULTS_IN] for s in mesh.link.lookup({"name": SORTER})] != old_endpoint
    assert mesh.master.State() == tango.DevState.ON
    # the restarted sorter serves the next scan as any other
    summary, _ = mesh.beamline.scan(1000)
    assert_lossless(summary, 1000)


def test_kill_minus_9_master_mid_scan_aborts_the_scan_with_a_reason_within_the_bound(mesh) -> None:
    """The master dies with the scan open: the events it held are gone, the scan can never complete. Once its
    lease runs out the sorter waits MasterTimeoutSeconds, then aborts the scan at every consumer with a reason:
    the probe and the Recorder see scan_abort, never scan_end. Runs last: it restarts the master."""
    points, sent = 5000, 1000
    scan_id = f"master-death-{time.time_ns() // 1000}"
    probe = mesh.beamline.driver.probes[PIPE]
    document = profiles.ProfileScan(profiles.PROFILES["counters"], PIPE, points,
                                    streams=list(mesh.beamline.sources)).document(scan_id, 7)
    mesh.master.StartScan(json.dumps(document))
    for start in range(0, sent, 100):  # the first part only, and no end: the scan is open when the master dies
        for stream, source in mesh.beamline.sources.items():
            source.block(scan_id, start, profiles.PROFILES["counters"].values(stream, np.arange(start, start + 100)))
    wait_for(lambda: probe.points_seen(scan_id) == sent, 60, "the first part delivered")
    killed = time.monotonic()
    mesh.master_handle.kill(hard=True)
    bound = LEASE + MASTER_TIMEOUT + 2.0  # the lease, the timeout, the sorter's look-up period and the expiry's
    tally = wait_for(lambda: probe.ended(scan_id), bound + 30, "the scan to end at the probe")
    took = time.monotonic() - killed
    assert tally.aborted and "master" in tally.end["reason"], tally.end
    assert tally.end["delivered"] == sent and (tally.counts[:sent] == 1).all() and not tally.counts[sent:].any()
    assert took < bound + 10, f"scan_abort {took:.1f} s after the kill"  # slack for a loaded machine
    records = [r for r in json.loads(mesh.recorder.LatestRecords(0)) if r["scan"] == scan_id]
    assert records[0]["type"] == "scan_start" and records[-1]["type"] == "scan_abort", records[-3:]
    assert not any(r["type"] == "scan_end" for r in records)
    # a new master serves the next scan as any other
    mesh.master_handle = mesh.pool.start(*master_server())
    wait_for(lambda: len(mesh.worker_table()) == len(mesh.workers), 30, "the workers to join the new master")
    summary, _ = mesh.beamline.scan(1000)
    assert_lossless(summary, 1000)
