"""Inbound frame limits on the kit's sockets (services/dataplane.py): a frame
beyond the limit never reaches the handler or the service's memory, and the
inlet goes on serving its other peers."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import zmq

from services import codec
from services.component import Counters
from services.dataplane import CONTROL_MAX_FRAME_BYTES, DATA_MAX_FRAME_BYTES, BoundSocketThread, PullInlet


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def result(index: int, arrays: dict) -> codec.Message:
    return codec.Message(codec.RESULT, scan="s", stream="p", index=index, count=1, arrays=arrays)


def test_libzmq_reports_a_dropped_peer_as_a_plain_disconnect_like_a_peer_leaving():
    """What the DropWatch has to work with (libzmq 4.3.5): no errno, no
    protocol-error event, the connection's descriptor as the value."""
    from zmq.utils.monitor import recv_monitor_message

    context = zmq.Context()  # libzmq alone: no ZAP handler or monitor of this process's services on it
    seen = {}
    for case in ("oversized", "left"):
        pull = context.socket(zmq.PULL)
        pull.maxmsgsize = 1000
        endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
        monitor = pull.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        push = context.socket(zmq.PUSH)
        push.linger = 0
        push.connect(endpoint)
        push.send(b"x" * (2000 if case == "oversized" else 10))
        if case == "left":
            assert pull.poll(5000) and pull.recv() == b"x" * 10
            push.close(0)
        events = []
        while len(events) < 2 and monitor.poll(20_000):  # a loaded machine delivers monitor events late
            event = recv_monitor_message(monitor)
            events.append((event["event"], event["value"]))
        seen[case] = events
        pull.disable_monitor()
        monitor.close(0)
        pull.close(0)
        if case == "oversized":
            push.close(0)
    context.term()
    for events in seen.values():
        (accepted, fd), (disconnected, same_fd) = events
        assert (accepted, disconnected) == (zmq.EVENT_ACCEPTED, zmq.EVENT_DISCONNECTED) and fd == same_fd > 2


def test_an_oversized_frame_is_dropped_at_the_socket_counted_and_the_inlet_serves_the_others():
    got: list[codec.Message] = []
    counters = Counters(logging.getLogger("t"))
    inlet = PullInlet(zmq.Context.instance(), "127.0.0.1", "127.0.0.1", got.append, counters,
                      max_frame_bytes=64 * 2**10)
    inlet.start()
    big, small = (zmq.Context.instance().socket(zmq.PUSH) for _ in range(2))
    try:
        for sock in (big, small):
            sock.linger = 0
            sock.connect(inlet.endpoint)
        codec.send(big, result(0, {"frame": np.zeros((1, 512, 512), np.uint8)}))  # 256 KiB frame
        assert wait_until(lambda: counters.errors == 1), "the dropped peer was not counted"
        assert "ZeroMQ dropped a peer on" in counters.last_error and inlet.endpoint in counters.last_error
        assert "65536 byte cap" in counters.last_error
        codec.send(small, result(1, {"x": np.ones(1)}))
        assert wait_until(lambda: len(got) == 1), "the small message did not arrive"
        codec.send(big, result(2, {"x": np.ones(1)}))  # the dropped peer reconnects and is heard again
        codec.send(big, result(3, {"frame": np.zeros((1, 2**20), np.uint8)}))
        codec.send(small, result(4, {"x": np.ones(1)}))
        assert wait_until(lambda: counters.errors == 2 and len(got) == 3), (counters.errors, [m.index for m in got])
        assert sorted(m.index for m in got) == [1, 2, 4]
        small.close(0)  # a peer that leaves is not an error
        time.sleep(0.5)
        assert counters.errors == 2 and inlet.drops.dropped == 2
    finally:
        big.close()
        small.close()
        inlet.stop()


def test_sockets_carry_their_limits():
    inlet = PullInlet(zmq.Context.instance(), "127.0.0.1", "127.0.0.1", lambda m: None,
                      Counters(logging.getLogger("t")))
    control = BoundSocketThread(zmq.Context.instance(), zmq.ROUTER, "127.0.0.1", "127.0.0.1", threading.Thread, "c")
    try:
        assert inlet.socket.maxmsgsize == DATA_MAX_FRAME_BYTES
        assert control.socket.maxmsgsize == CONTROL_MAX_FRAME_BYTES
    finally:
        inlet.socket.close(0)
        control.socket.close(0)


def test_the_pipeline_stages_cap_what_they_receive():
    from pipelines.master import MasterComponent, MasterConfig
    from pipelines.sorter import SorterComponent, SorterConfig
    from topology_manager.local import LocalManagerLink
    from topology_manager.registry import Registry

    from services.registration import wait_registered
    from services.source import SourceClient

    link = LocalManagerLink(Registry(10.0, 2.0))
    master = MasterComponent("test/caps/master", "caps", "127.0.0.1", "127.0.0.1", MasterConfig(), link)
    sorter = SorterComponent("test/caps/sorter", "caps", "127.0.0.1", "127.0.0.1", SorterConfig(), link)
    source = SourceClient("scaler", "caps", link)  # registered: the master connects to registered sources only
    frames = SourceClient("frames", "caps", link)
    try:
        wait_registered(source.registration, frames.registration)
        assert master.router.maxmsgsize == master.acks.maxmsgsize == CONTROL_MAX_FRAME_BYTES
        master._connect_sources({source.endpoint: "scaler"})
        assert master.sources[source.endpoint].socket.maxmsgsize == DATA_MAX_FRAME_BYTES
        assert sorter.inlet.maxmsgsize == DATA_MAX_FRAME_BYTES
        master._connect_sources({frames.endpoint: "frames"}, {frames.endpoint: 5 * 2**20})  # described
        assert master.sources[frames.endpoint].socket.maxmsgsize == 5 * 2**20
    finally:
        master.stop()
        sorter.stop()
        source.close()
        frames.close()
    from services.ops.probe import Probe
    from sink.queries import SinkClient

    probe, client = Probe("caps", link), SinkClient("tcp://127.0.0.1:1")
    try:  # the scan driver's consumer and the sink's query client receive data too
        assert probe.socket.maxmsgsize == client._connect().maxmsgsize == DATA_MAX_FRAME_BYTES
    finally:
        probe.close()
        client.close()


def test_a_stream_descriptor_sizes_the_frame_cap_within_the_fixed_bounds():
    from services.dataplane import FRAME_MARGIN, FRAME_SLACK_BYTES, stream_frame_cap
    from services.source import stream_descriptor

    detector = stream_descriptor({"frame": np.zeros((1, 512, 512), np.float32), "index": np.zeros(1, np.int64)}, 20)
    assert detector == {"arrays": {"frame": {"dtype": "<f4", "shape": [512, 512]},
                                   "index": {"dtype": "<i8", "shape": []}}, "max_block": 20}
    assert stream_frame_cap(detector) == int(20 * 2**20 * (1 + FRAME_MARGIN)) + FRAME_SLACK_BYTES
    assert stream_frame_cap(stream_descriptor({"i0": np.zeros(1)}, 10)) == CONTROL_MAX_FRAME_BYTES  # the header's
    assert stream_frame_cap(stream_descriptor({"f": np.zeros((1, 4096, 4096), np.float32)}, 1000)) == DATA_MAX_FRAME_BYTES
    assert stream_frame_cap({"stream": "scaler"}) == DATA_MAX_FRAME_BYTES  # undescribed: the fixed cap
    for bad in ({"arrays": {"x": {"dtype": "<f8", "shape": [2]}}}, {"arrays": {}, "max_block": 3},
                {"arrays": {"x": {"dtype": "nonsense", "shape": [2]}}, "max_block": 3}):
        with pytest.raises(ValueError):
            stream_frame_cap(bad)


def test_the_registry_refuses_a_malformed_stream_descriptor():
    from services.schema import validate

    info = {"name": "source/p1-scaler/1", "kind": "source", "host": "h", "pid": 1,
            "capabilities": {"stream": "scaler", "arrays": {"i0": {"dtype": "<f8", "shape": []}}, "max_block": 10}}
    validate("registration", info)
    for capabilities in ({"arrays": {"i0": {"dtype": "<f8", "shape": []}}},  # no max_block
                         {"arrays": {"i0": {"dtype": "object", "shape": []}}, "max_block": 10},
                         {"arrays": {"i0": {"dtype": "<f8", "shape": [-1]}}, "max_block": 10},
                         {"arrays": {"i0": {"dtype": "<f8", "shape": []}}, "max_block": 0}):
        with pytest.raises(ValueError):
            validate("registration", {**info, "capabilities": {"stream": "scaler", **capabilities}})


def test_a_worker_dropped_by_zeromq_for_an_oversized_unit_counts_it_and_connects_anew(monkeypatch):
    """libzmq never reconnects a connecting socket after such a drop: without
    a new connection the worker would sit idle for good."""
    import os

    from pipelines import worker as worker_module
    from pipelines.worker import WorkerComponent, WorkerConfig
    from services import protocol, security
    from topology_manager.local import LocalManagerLink
    from topology_manager.registry import Registry

    monkeypatch.setattr(worker_module, "DATA_MAX_FRAME_BYTES", 64 * 2**10)
    link = LocalManagerLink(Registry(10.0, 2.0))
    master = zmq.Context.instance().socket(zmq.ROUTER)  # a stand-in master: it reads credit, sends one unit
    master.linger = 0
    auth = security.Auth(link, Counters(logging.getLogger("t")), "test/caps/master")  # admits the pipeline's workers
    auth.serve(master, security.rule(protocol.Kind.WORKER, pipeline="caps"), "the work socket")
    endpoint = f"tcp://127.0.0.1:{master.bind_to_random_port('tcp://127.0.0.1')}"
    link.register({"name": "test/caps/master", "kind": protocol.Kind.MASTER, "pipeline": "caps", "host": "h",
                   "pid": os.getpid(), "endpoints": {protocol.WORK: endpoint}, **auth.registration_fields()})
    worker = WorkerComponent("test/caps-worker/1", "caps", WorkerConfig(heartbeat=0.1, lookup_period=0.2), link)
    link.register({"name": worker.name, "kind": protocol.Kind.WORKER, "pipeline": "caps", "host": "h",
                   "pid": os.getpid(), **worker.auth.registration_fields()})
    worker.start()

    def next_identity(other_than: bytes = b"") -> bytes:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if master.poll(200):
                identity, *_ = master.recv_multipart()
                if identity != other_than:
                    return identity
        raise AssertionError("no credit from the worker")

    try:
        first = next_identity()
        master.send_multipart([first, *codec.encode(result(0, {"frame": np.zeros((1, 2**18), np.uint8)}))])
        assert wait_until(lambda: worker.counters.errors == 1), "the dropped link was not counted"
        assert "the link from the master: ZeroMQ dropped a peer on" in worker.counters.last_error
        second = next_identity(other_than=first)  # connected anew, with a fresh identity
        assert second != first and worker.counters.errors == 1
    finally:
        worker.stop()
        master.close(0)
