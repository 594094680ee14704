"""Inbound frame limits on the kit's sockets (services/dataplane.py): a frame
beyond the limit never reaches the handler or the service's memory, and the
inlet goes on serving its other peers."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import zmq

from services import codec
from services.component import Counters
from services.dataplane import CONTROL_MAX_FRAME_BYTES, DATA_MAX_FRAME_BYTES, BoundSocketThread, PullInlet


def test_an_oversized_frame_is_dropped_at_the_socket_and_the_inlet_serves_the_others():
    got: list[codec.Message] = []
    arrived = threading.Event()

    def handler(msg: codec.Message) -> None:
        got.append(msg)
        arrived.set()

    inlet = PullInlet(zmq.Context.instance(), "127.0.0.1", "127.0.0.1", handler, Counters(logging.getLogger("t")),
                      max_frame_bytes=64 * 2**10)
    inlet.start()
    big, small = (zmq.Context.instance().socket(zmq.PUSH) for _ in range(2))
    try:
        for sock in (big, small):
            sock.linger = 0
            sock.connect(inlet.endpoint)
        codec.send(big, codec.Message(codec.RESULT, scan="s", stream="p", index=0, count=1,
                                      arrays={"frame": np.zeros((1, 512, 512), np.uint8)}))  # 256 KiB frame
        time.sleep(0.2)  # the big one is on the wire first
        codec.send(small, codec.Message(codec.RESULT, scan="s", stream="p", index=1, count=1,
                                        arrays={"x": np.ones(1)}))
        assert arrived.wait(5), "the small message did not arrive"
        time.sleep(0.3)
        assert [m.index for m in got] == [1]
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
    try:
        wait_registered(source.registration)
        assert master.router.maxmsgsize == master.acks.maxmsgsize == CONTROL_MAX_FRAME_BYTES
        master._connect_sources({source.endpoint: "scaler"})
        assert master.sources[source.endpoint].socket.maxmsgsize == DATA_MAX_FRAME_BYTES
        assert sorter.inlet.maxmsgsize == DATA_MAX_FRAME_BYTES
    finally:
        master.stop()
        sorter.stop()
        source.close()
