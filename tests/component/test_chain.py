"""The pipeline chain in one process: master -> workers -> sorter -> consumer
on the components, real ZeroMQ sockets, the manager's registry, no Tango.

What only the whole chain can show: a killed worker's units re-dispatched
and every point delivered once, in order; a worker joining mid-scan; an abort
reaching the consumer; refused input counted while the chain goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Iterator

import numpy as np
import pytest
import zmq

from pipelines import master as master_module
from pipelines import sorter as sorter_module
from pipelines.component import PipelineComponent
from pipelines.master import MasterConfig
from pipelines.sorter import SorterConfig
from pipelines.worker import WorkerConfig
from services import codec, protocol
from support import wait_for
from support.chain import Chain, Tally, expected_counters
from services.sim.profiles import compressed_frames, noise_values
from topology_manager.component import TopologyConfig

PATIENCE = 30.0  # seconds any single condition may take on a loaded machine; normally well under one


def assert_every_point_once_in_order(chain: Chain, scan_id: str, tally: Tally, points: int) -> None:
    """Exactly once, in acquisition order, no gap, values as the counters processor must compute them."""
    assert not tally.aborted, tally.end
    assert tally.end["points"] == tally.end["delivered"] == points, tally.end
    assert tally.end["gaps"] == tally.end["duplicates"] == tally.end["failed"] == 0, tally.end
    assert_values_once_in_order(chain, tally, points)


def assert_values_once_in_order(chain: Chain, tally: Tally, points: int) -> None:
    """What the consumer holds: every index once, in order, the counters' values; nothing left at the master."""
    assert (tally.counts == 1).all(), f"indices not delivered exactly once: {np.flatnonzero(tally.counts != 1)[:10]}"
    assert tally.out_of_order == 0 and tally.gap_points == 0
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(points))
    got = tally.arrays()
    for name, want in expected_counters(np.arange(points)).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-13, err_msg=name)
    assert chain.master.scan_summary()["acked"] == points  # the master holds nothing of it any more


def test_a_killed_workers_units_are_redispatched_and_every_point_arrives_once_in_order(make_chain) -> None:
    # The victim is slow, so that it surely holds unacknowledged units when it is killed.
    chain = make_chain(workers=[WorkerConfig(heartbeat=0.1), WorkerConfig(heartbeat=0.1, processing_delay=0.5)])
    survivor, victim = chain.workers
    points = 10_000

    def kill_the_slow_worker_mid_scan(scan_id: str) -> None:
        wait_for(lambda: victim.units >= 1, PATIENCE, "the slow worker to take work")
        chain.kill_worker(victim)

    # the streams block differently (a PandABox, a scaler and a diode ADC rarely agree): the master joins them
    scan_id, tally = chain.run_scan(points, block={"pandabox": 100, "scaler": 37, "diode": 250},
                                    during=kill_the_slow_worker_mid_scan)
    assert_every_point_once_in_order(chain, scan_id, tally, points)
    assert chain.master.dispatcher.redispatched >= 1, "the killed worker's units were sent again"
    assert not chain.master_knows(victim), "the master gave the silent worker up"
    assert survivor.points > points / 2, "the survivor did the killed worker's share"
    assert chain.master.counters.errors == chain.sorter.counters.errors == 0


def test_a_worker_joining_mid_scan_takes_work(make_chain) -> None:
    # Alone, the slow worker needs 40 units x 0.2 s: ample time for a newcomer to join mid-scan.
    chain = make_chain(workers=[WorkerConfig(heartbeat=0.1, processing_delay=0.2)])
    (slow,) = chain.workers
    points = 4000
    joined = []

    def join_mid_scan(scan_id: str) -> None:
        wait_for(lambda: slow.units >= 2, PATIENCE, "the first worker to be under way")
        assert chain.consumer.tallies[scan_id].end is None, "still mid-scan"
        joined.append(chain.add_worker(WorkerConfig(heartbeat=0.1)))

    scan_id, tally = chain.run_scan(points, during=join_mid_scan)
    assert_every_point_once_in_order(chain, scan_id, tally, points)
    (newcomer,) = joined
    assert scan_id in newcomer.scans, "the master sent the running scan's document to the newcomer"
    assert newcomer.points > 0, "the newcomer took work"
    assert newcomer.points > slow.points, "and most of it: it is faster, and credit follows speed"


def test_an_aborted_scan_reaches_the_consumer_as_scan_abort_and_the_next_scan_runs(make_chain) -> None:
    chain = make_chain(workers=[WorkerConfig(heartbeat=0.1, processing_delay=0.1)])  # 30 units: 3 s unaborted
    points = 3000
    scan_id = chain.start_scan(points)
    chain.send_blocks(scan_id, points)
    wait_for(lambda: chain.consumer.tallies[scan_id].counts.any(), PATIENCE, "the first results to arrive")
    chain.master.abort_scan(scan_id)
    tally = chain.wait_scan_end(scan_id)

    assert tally.aborted, "the consumer saw scan_abort"
    delivered = int(tally.counts.sum())
    assert 0 < delivered < points, delivered
    assert (tally.counts[:delivered] == 1).all() and tally.out_of_order == 0, "what came is in order, once"
    assert chain.sorter.finished[scan_id]["aborted"]
    chain.end_scan(scan_id)  # EndScan after an abort: nothing to do, no error

    next_id, next_tally = chain.run_scan(500)  # the aborted scan left nothing behind that blocks the next
    assert_every_point_once_in_order(chain, next_id, next_tally, 500)


@contextlib.contextmanager
def pusher(endpoint: str, peer: PipelineComponent) -> Iterator[zmq.Socket]:
    """A PUSH socket connected to a stage's bound inlet with the key of the
    registered ``peer`` (a stage admits only the kinds that talk to it): a
    registered peer's bad messages are refused one by one, by their content."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.linger = 2000  # what was sent still leaves when the block ends
    peer.auth.connect(sock, endpoint)
    try:
        yield sock
    finally:
        sock.close()


def test_refused_messages_are_counted_and_the_chain_goes_on(make_chain, monkeypatch) -> None:
    # A result may overtake its scan_start; one for a scan that never starts is refused after this grace.
    monkeypatch.setattr(sorter_module, "ORPHAN_SECONDS", 0.2)
    chain = make_chain(workers=1)
    garbage = [b"\x00 not a tangomesh message"]
    with pusher(chain.sorter.endpoints[protocol.RESULTS_IN], chain.workers[0]) as sorter_in:
        sorter_in.send_multipart(garbage)
        codec.send(sorter_in, codec.Message(codec.SCAN_END, scan="never-started", meta={protocol.META_POINTS: 3}))
        codec.send(sorter_in, codec.Message(codec.RESULT, scan="no-such-scan", stream="p1", index=0, count=1,
                                            arrays={"sum": np.zeros(1)}))
    with pusher(chain.master.endpoints[protocol.ACKS], chain.sorter) as master_acks:
        master_acks.send_multipart(garbage)
        codec.send(master_acks, protocol.ack("no-such-scan", [(0, 10)]))
    wait_for(lambda: chain.sorter.counters.errors == 3, PATIENCE, "the sorter to refuse three messages")
    assert "unknown scan 'no-such-scan'" in chain.sorter.counters.last_error
    wait_for(lambda: chain.master.counters.errors == 2, PATIENCE, "the master to refuse two acks")
    assert "unknown scan 'no-such-scan'" in chain.master.counters.last_error

    # mid-scan: right scan, right indices, wrong values and malformed meta; refused, the real result wins
    scan_id = chain.start_scan(2000)
    wait_for(lambda: scan_id in chain.sorter.runs, PATIENCE, "the sorter to start the scan")
    with pusher(chain.sorter.endpoints[protocol.RESULTS_IN], chain.workers[0]) as sorter_in:
        codec.send(sorter_in, codec.Message(codec.RESULT, scan=scan_id, stream="p1", index=0, count=10,
                                            arrays={"sum": np.full(10, -1.0)},
                                            meta={protocol.META_ERRORS: ["not", "a", "map"]}))
    wait_for(lambda: chain.sorter.counters.errors == 4, PATIENCE, "the forged result to be refused")
    chain.send_blocks(scan_id, 2000)
    chain.end_scan(scan_id)
    tally = chain.wait_scan_end(scan_id)
    assert_every_point_once_in_order(chain, scan_id, tally, 2000)
    assert "result errors must map index text to a message" in chain.sorter.counters.last_error
    assert (chain.sorter.counters.errors, chain.master.counters.errors) == (4, 2), "nothing else was refused"


def test_the_passthrough_processor_carries_the_chosen_arrays(make_chain) -> None:
    """The other plumbing processor, found by its entry point like any other."""
    chain = make_chain(profile="counterset", workers=2)
    _, tally = chain.run_scan(1000)
    assert tally.end["delivered"] == 1000 and (tally.counts == 1).all() and tally.out_of_order == 0, tally.end
    np.testing.assert_allclose(tally.arrays()["counters/t"], np.arange(1000) * 1e-3)


def test_compressed_frames_reach_the_processor_decoded_and_exact(make_chain) -> None:
    """The EIGER's frames travel compressed through the master, which cuts units
    from them without decoding; the worker alone decompresses them: the
    passthrough processor's results are the detector's frames exactly."""
    profile = compressed_frames((32, 48))
    profile = dataclasses.replace(profile, settings={"arrays": ["eiger/image", "scaler/i0"]})
    chain = make_chain(profile=profile, workers=2, sorter_config=SorterConfig(chunk_points=50))
    points = 300
    _, tally = chain.run_scan(points, block=20)
    assert tally.end["delivered"] == points and (tally.counts == 1).all() and tally.out_of_order == 0, tally.end
    plain = noise_values(profile.streams)
    want = np.concatenate([plain("eiger", np.arange(start, start + 20))["image"] for start in range(0, points, 20)])
    got = tally.arrays()["eiger/image"]
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_frames_a_passthrough_keeps_compressed_reach_the_consumer_as_the_detector_sent_them(make_chain) -> None:
    """With ``keep_compressed`` no stage decodes: the sorter merges the chunks of
    consecutive results, the consumer gets the detector's own chunks (for a
    writer's direct chunk write), and they decode to the frames."""
    from services.compression import CompressedFrames

    profile = compressed_frames((32, 48))
    profile = dataclasses.replace(profile, settings={"arrays": ["eiger/image", "scaler/i0"], "keep_compressed": True})
    chain = make_chain(profile=profile, workers=2, sorter_config=SorterConfig(chunk_points=50))
    points = 300
    _, tally = chain.run_scan(points, block=20)
    assert tally.end["delivered"] == points and (tally.counts == 1).all() and tally.out_of_order == 0, tally.end
    sent = {start: profile.values("eiger", np.arange(start, start + 20))["image"] for start in range(0, points, 20)}
    chunks = {}
    for start, arrays in tally.chunks:
        image = arrays["eiger/image"]
        assert isinstance(image, CompressedFrames) and image.codec == "bslz4"
        for j in range(len(image)):
            chunks[start + j] = bytes(image.chunk(j))
    assert sorted(chunks) == list(range(points))
    for index, chunk in chunks.items():
        assert chunk == bytes(sent[index - index % 20].chunk(index % 20)), f"index {index}: not the detector's chunk"
    plain = noise_values(profile.streams)
    np.testing.assert_array_equal(
        np.concatenate([a["eiger/image"].decompress() for _, a in sorted(tally.chunks, key=lambda c: c[0])]),
        np.concatenate([plain("eiger", np.arange(s, s + 20))["image"] for s in range(0, points, 20)]))


def test_results_that_overtake_their_scan_start_are_kept_even_behind_a_refused_one(make_chain) -> None:
    """A worker's result can reach the sorter before the master's scan_start
    (two senders, no order between them): the sorter keeps it until the scan
    starts. One refused early result must not take the others down with it."""
    chain = make_chain(workers=0)  # nobody processes: the early result is the only one for its indices
    scan_id = "chain-early-results"
    with pusher(chain.sorter.endpoints[protocol.RESULTS_IN], chain.master) as sorter_in:
        codec.send(sorter_in, codec.Message(codec.RESULT, scan=scan_id, stream="p1", index=50, count=10,
                                            arrays={"sum": np.zeros(10)}, meta={protocol.META_ERRORS: ["bad"]}))
        codec.send(sorter_in, codec.Message(codec.RESULT, scan=scan_id, stream="p1", index=0, count=50,
                                            arrays={"sum": np.arange(50.0)}))
    wait_for(lambda: len(chain.sorter.orphans.get(scan_id, [])) == 2, PATIENCE, "the sorter to hold both")
    chain.start_scan(100, scan_id=scan_id)
    wait_for(lambda: chain.sorter.counters.errors == 1, PATIENCE, "the malformed early result to be refused")
    assert "result errors must map" in chain.sorter.counters.last_error
    assert "refused scan_start" not in chain.sorter.counters.last_error, "the scan_start itself was fine"
    wait_for(lambda: chain.consumer.tallies[scan_id].counts[:50].all(), PATIENCE, "the good early result delivered")
    chain.master.abort_scan(scan_id)
    tally = chain.wait_scan_end(scan_id)
    np.testing.assert_array_equal(tally.arrays()["sum"], np.arange(50.0))


def test_a_live_worker_the_master_gave_up_on_gets_work_again(make_chain) -> None:
    """The master forgets a worker it has not heard of for WorkerTimeoutSeconds
    (a network blip, a stalled process; here: heartbeats slower than the
    timeout). When the worker is heard again it is a worker like any other."""
    chain = make_chain(workers=[WorkerConfig(heartbeat=0.6)],
                       master_config=MasterConfig(max_unit_points=100, worker_timeout=0.3))
    (worker,) = chain.workers
    wait_for(lambda: not chain.master_knows(worker), PATIENCE, "the master to give the worker up")
    wait_for(lambda: chain.master_knows(worker), PATIENCE, "the worker's next heartbeat")
    _, tally = chain.run_scan(500, timeout=3.0)  # a few units: well under a second when the worker takes them
    assert tally.end["delivered"] == 500


def test_a_restarted_sorter_resumes_the_scan_and_every_point_arrives_once_in_order(make_chain) -> None:
    """The sorter is killed mid-scan and a new one takes its registration: the
    master re-sends the scan there with where delivery stands, dispatches
    every unacknowledged unit again, and the consumer, which holds the first
    part, gets the rest: nothing lost, nothing twice, in order."""
    # slow workers, so the scan is surely under way (delivered in part, units in flight) when the sorter dies
    chain = make_chain(workers=[WorkerConfig(heartbeat=0.1, processing_delay=0.02)] * 2)
    points = 6000
    old = chain.sorter

    def restart_the_sorter_mid_scan(scan_id: str) -> None:
        wait_for(lambda: chain.consumer.points_seen(scan_id) >= 1000, PATIENCE, "a first part delivered")
        assert chain.consumer.points_seen(scan_id) < points, "the sorter must die mid-scan"
        chain.restart_sorter()

    started = chain.start_scan(points)
    sender = threading.Thread(target=chain.send_blocks, args=(started, points), daemon=True)
    sender.start()  # the sources block while the master holds them back: send beside the restart
    restart_the_sorter_mid_scan(started)
    sender.join(PATIENCE * 2)
    chain.end_scan(started)
    tally = chain.wait_scan_end(started, timeout=PATIENCE * 4)
    assert chain.sorter is not old and chain.master.sorter_restarts == 1
    resumed = tally.end["resumed_from"]
    assert 0 < resumed < points, tally.end
    assert tally.end["points"] == points and tally.end["delivered"] == points - resumed, tally.end
    assert tally.end["gaps"] == tally.end["failed"] == 0, tally.end
    assert_values_once_in_order(chain, tally, points)
    assert chain.sorter.resumed == 1 and chain.sorter.counters.errors == 0, chain.sorter.counters.last_error


def test_a_restarted_consumer_is_given_the_rest_of_the_open_scan_once_in_order(make_chain) -> None:
    """The consumer (a sink or a writer, here the probe) dies mid-scan and
    comes back under its name on a new endpoint. The sorter gives it the
    scan's start with where delivery stands and then the rest: each point
    from there once, in order; what went to the dead process is not sent
    again (the master has let it go), and the scan itself goes on."""
    chain = make_chain()
    points, first = 6000, 2000
    scan_id = chain.start_scan(points)
    chain.deliver_first_part(scan_id, first)
    chain.restart_consumer()
    # joined before more data comes: so where it joins is known exactly
    wait_for(lambda: chain.sorter.consumers_joined == 1, PATIENCE, "the sorter to give the new consumer the scan")
    chain.send_part(scan_id, first, points)
    for source in chain.sources.values():
        source.end(scan_id, points)
    chain.end_scan(scan_id)
    tally = chain.wait_scan_end(scan_id)
    assert tally.joined_at == first and not tally.aborted, (tally.joined_at, tally.end)
    assert not tally.counts[:first].any() and (tally.counts[first:] == 1).all()
    assert tally.out_of_order == 0 and tally.end["points"] == points and tally.end["delivered"] == points
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(first, points))
    for name, want in expected_counters(np.arange(first, points)).items():
        np.testing.assert_allclose(tally.arrays()[name], want, rtol=1e-13, err_msg=name)
    assert chain.master.scan_summary()["acked"] == points
    # the next scan reaches it from the start, as any other
    _, tally = chain.run_scan(1000)
    assert tally.joined_at is None and (tally.counts == 1).all()


def test_a_dead_master_gets_its_open_scan_aborted_with_a_reason_within_the_bound(make_chain) -> None:
    """The master dies mid-scan: what it held of the sources' data is gone, so
    the scan can never complete. Once its lease runs out the sorter gives it
    MasterTimeoutSeconds, then aborts the scan at the consumer, with why."""
    lease, master_timeout = 2.0, 1.0
    chain = make_chain(topology_config=TopologyConfig(lease_seconds=lease, heartbeat_seconds=0.3),
                       sorter_config=SorterConfig(master_timeout=master_timeout))
    scan_id = chain.start_scan(5000)
    chain.deliver_first_part(scan_id, 2000)  # no scan_end: the scan is open when the master dies
    killed = time.monotonic()
    chain.kill_master()
    tally = chain.wait_scan_end(scan_id, timeout=PATIENCE)
    took = time.monotonic() - killed
    assert tally.aborted and "master" in tally.end[protocol.META_REASON], tally.end
    assert tally.end["delivered"] == 2000 and (tally.counts[:2000] == 1).all() and not tally.counts[2000:].any()
    # the bound: the lease, the timeout, a look-up period of the sorter and of the manager's expiry, and slack
    assert took < lease + master_timeout + 2 * sorter_module.MASTER_CHECK_SECONDS + 10, took
    assert chain.sorter.masters_lost == 1 and scan_id not in chain.sorter.runs


def test_a_sorter_that_never_comes_back_gets_its_scans_aborted_at_the_consumers(make_chain) -> None:
    """The sorter dies and nothing restarts it: once its lease has run out and
    SorterTimeoutSeconds more have passed, the master aborts the open scan
    everywhere, telling the consumers directly, with why."""
    lease, sorter_timeout = 2.0, 1.0
    chain = make_chain(topology_config=TopologyConfig(lease_seconds=lease, heartbeat_seconds=0.3),
                       master_config=MasterConfig(sorter_timeout=sorter_timeout))
    scan_id = chain.start_scan(5000)
    chain.deliver_first_part(scan_id, 1000)
    killed = time.monotonic()
    chain.kill_sorter()
    tally = chain.wait_scan_end(scan_id, timeout=PATIENCE)
    took = time.monotonic() - killed
    assert tally.aborted and "no sorter registered" in tally.end[protocol.META_REASON], tally.end
    assert (tally.counts[:1000] == 1).all() and not tally.counts[1000:].any()
    assert took < lease + sorter_timeout + 2 * master_module.SORTER_CHECK_SECONDS + 10, took
    assert scan_id in chain.master.finished and chain.master.finished[scan_id].aborted



def test_sources_that_describe_their_stream_are_capped_to_fit_and_an_oversized_frame_is_counted_not_fatal(
        make_chain) -> None:
    """The master sizes ZMQ_MAXMSGSIZE per source from its registered
    descriptor; a frame beyond it makes ZeroMQ drop that source: counted,
    logged with the endpoint, the source connected anew, and the scan
    completes with every point from it and the other streams."""
    from services.dataplane import CONTROL_MAX_FRAME_BYTES, stream_frame_cap

    chain = make_chain(max_block=100)
    points = 1000
    scan_id = chain.start_scan(points)
    links = {link.stream: link for link in chain.master.sources.values()}
    assert set(links) == set(chain.sources)
    for stream, source in chain.sources.items():
        cap = links[stream].socket.maxmsgsize
        assert cap == stream_frame_cap(source.descriptor) == CONTROL_MAX_FRAME_BYTES  # counters: small blocks
    errors = chain.master.counters.errors
    victim = chain.sources["scaler"]
    with pytest.raises(ValueError, match="more than the 100 it registered"):  # the client refuses it itself
        victim.block(scan_id, 0, chain.profile.values("scaler", np.arange(101)))
    forged = codec.Message(codec.DATA, scan=scan_id, stream="scaler", index=0, count=1,
                           arrays={"i0": np.zeros((1, CONTROL_MAX_FRAME_BYTES // 8 + 1))})  # a frame just over the cap
    victim.socket.send_multipart([bytes(memoryview(f)) for f in codec.encode(forged)])  # copied: no pyzmq gc thread
    wait_for(lambda: chain.master.counters.errors == errors + 1, PATIENCE, "the dropped source to be counted")
    assert "ZeroMQ dropped a peer on" in chain.master.counters.last_error
    assert victim.endpoint in chain.master.counters.last_error
    chain.send_blocks(scan_id, points, 100)  # the same source, connected anew, and the others
    chain.end_scan(scan_id)
    assert_every_point_once_in_order(chain, scan_id, chain.wait_scan_end(scan_id), points)
    assert chain.master.counters.errors == errors + 1


def test_a_recording_master_keeps_every_accepted_message_and_a_failing_disk_never_stops_the_scan(
        make_chain, tmp_path) -> None:
    """With a record directory the master keeps each accepted source message
    as it came (the scan document beside them); when writing fails (here the
    next stream file is taken by a symlink, which the writer refuses to
    follow, as it would a full disk) that scan's recording stops, counted,
    and every point still arrives once, in order."""
    from services.recording import read_document, read_stream, scan_directory, stream_files

    chain = make_chain(master_config=MasterConfig(record_directory=str(tmp_path)))
    scan_id, tally = chain.run_scan(500, block=50)
    assert_every_point_once_in_order(chain, scan_id, tally, 500)
    directory = scan_directory(tmp_path, scan_id, chain.pipeline)
    assert read_document(directory)["scan"]["id"] == scan_id
    files = stream_files(directory)
    assert set(files) == set(chain.sources)
    for stream, path in files.items():
        messages = [r.message for r in read_stream(path)]
        assert [m.type for m in messages] == [codec.DATA] * 10 + [codec.SCAN_END]
        assert [m.index for m in messages[:-1]] == list(range(0, 500, 50))
        want = chain.profile.values(stream, np.arange(450, 500))
        for name, array in want.items():
            np.testing.assert_array_equal(messages[-2].arrays[name], array)

    errors = chain.master.counters.errors
    taken = sorted(chain.sources)[0]
    scan_id = f"chain-{chain.pipeline}-disk-fails"
    (scan_directory(tmp_path, scan_id, chain.pipeline) / f"{taken}.tmrec").parent.mkdir(parents=True)
    (scan_directory(tmp_path, scan_id, chain.pipeline) / f"{taken}.tmrec").symlink_to(tmp_path / "elsewhere")
    chain.start_scan(500, scan_id=scan_id)
    chain.send_blocks(scan_id, 500, block=50)
    chain.end_scan(scan_id)
    assert_every_point_once_in_order(chain, scan_id, chain.wait_scan_end(scan_id), 500)
    assert chain.master.counters.errors > errors
    assert "recording stopped" in chain.master.counters.last_error
    assert not (tmp_path / "elsewhere").exists()
