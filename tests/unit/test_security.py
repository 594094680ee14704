"""Data-plane authentication (services/security.py) on real ZeroMQ sockets and
the real Registry (through the in-process link the component tests use)."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import zmq

from services import codec, protocol, security
from services.component import Counters
from services.dataplane import PullInlet
from services.registration import ManagerUnavailable
from support import wait_for
from topology_manager.local import LocalManagerLink
from topology_manager.registry import Registry

HOST = "127.0.0.1"


class DownableLink(LocalManagerLink):
    """The in-process link to the real registry, whose transport can be cut
    (``down``): what a manager that is restarting looks like to its clients."""

    down = False

    def lookup(self, query):
        if self.down:
            raise ManagerUnavailable("manager restarting")
        return super().lookup(query)


@pytest.fixture
def link() -> DownableLink:
    return DownableLink(Registry(10.0, 2.0))


def register(link, auth: security.Auth, kind: str, pipeline: str = "p1", endpoints: dict | None = None) -> None:
    link.register({"name": auth.name, "kind": kind, "pipeline": pipeline, "host": HOST, "pid": os.getpid(),
                   "endpoints": endpoints or {}, **auth.registration_fields()})


class Service:
    """A service's side for the tests: its counters, its auth, registered as ``kind``."""

    def __init__(self, link, name: str, kind: str, pipeline: str = "p1", register_now: bool = True) -> None:
        self.counters = Counters(logging.getLogger(f"test.{kind}"))
        self.auth = security.Auth(link, self.counters, name)
        self.kind, self.pipeline, self.link = kind, pipeline, link
        if register_now:
            register(link, self.auth, kind, pipeline)


@pytest.fixture
def inlet(link):
    """A consumer's inlet (data_in of a writer of pipeline p1), registered, recording what it takes."""
    consumer = Service(link, "test/p1/writer", protocol.Kind.WRITER, register_now=False)
    taken: list[codec.Message] = []
    inlet = PullInlet(zmq.Context.instance(), HOST, HOST, taken.append, consumer.counters, name="writer-in",
                      auth=consumer.auth, admits=security.consumer_rule("p1"),
                      check_sender=security.check_consumer_sender)
    register(link, consumer.auth, protocol.Kind.WRITER, endpoints={protocol.DATA_IN: inlet.endpoint})
    inlet.start()
    inlet.taken = taken
    inlet.consumer = consumer
    yield inlet
    inlet.stop()


def push(endpoint: str, auth: security.Auth | None, *messages: codec.Message) -> None:
    """Connect a PUSH as ``auth``'s service (None: plain, no CURVE) and send."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.linger = 500
    try:
        if auth is None:
            sock.connect(endpoint)
        else:
            auth.connect(sock, endpoint)
        for msg in messages:
            codec.send(sock, msg, zmq.NOBLOCK)
    except zmq.Again:
        pass  # no admitted connection to queue on: exactly what a refused peer gets
    finally:
        sock.close()


def scan_start(scan: str, pipeline: str = "p1") -> codec.Message:
    return codec.Message(codec.SCAN_START, scan=scan, stream=pipeline, meta={"scan": {}})


def test_the_registry_keeps_each_services_key_and_a_restart_replaces_it(link) -> None:
    first = Service(link, "test/p1/sorter", protocol.Kind.SORTER)
    (record,) = link.lookup({"name": "test/p1/sorter"})
    assert record[security.KEY_FIELD] == first.auth.public_key
    restarted = Service(link, "test/p1/sorter", protocol.Kind.SORTER)
    (record,) = link.lookup({"name": "test/p1/sorter"})
    assert restarted.auth.public_key != first.auth.public_key
    assert record[security.KEY_FIELD] == restarted.auth.public_key


def test_a_key_that_is_no_z85_key_is_refused_by_the_registry(link) -> None:
    with pytest.raises(ValueError, match="curve_key"):
        link.register({"name": "test/p1/bad", "kind": "worker", "host": HOST, "pid": 1, "curve_key": "short"})


def test_only_the_pipelines_sorter_gets_through_and_every_refusal_is_counted(link, inlet) -> None:
    sorter = Service(link, "test/p1/sorter", protocol.Kind.SORTER)
    stranger = security.Auth(link, Counters(logging.getLogger("t")), "test/x/stranger")  # never registered
    worker = Service(link, "test/p1-worker/1", protocol.Kind.WORKER)  # registered, but not a consumer's peer
    other_sorter = Service(link, "test/p2/sorter", protocol.Kind.SORTER, pipeline="p2")

    push(inlet.endpoint, stranger, scan_start("forged-1"))
    push(inlet.endpoint, None, scan_start("forged-2"))
    push(inlet.endpoint, worker.auth, scan_start("forged-3"))
    push(inlet.endpoint, other_sorter.auth, scan_start("forged-4", "p2"))
    wait_for(lambda: inlet.consumer.counters.errors >= 4, 10, "four refusals")
    push(inlet.endpoint, sorter.auth, scan_start("real"))
    wait_for(lambda: inlet.taken, 5, "the sorter's scan_start")
    time.sleep(0.3)
    assert [m.scan for m in inlet.taken] == ["real"]
    assert inlet.consumer.counters.errors == 4
    assert inlet.consumer.auth.refused == 4


def test_a_registered_peer_of_the_wrong_role_is_refused_message_by_message(link) -> None:
    """A consumer admitting every pipeline's sorters and masters (pipeline "")
    still takes scan control from a master only for scan_abort, and only a
    pipeline's own sorter may speak for that pipeline."""
    consumer = Service(link, "test/all/sink", protocol.Kind.SINK, pipeline="", register_now=False)
    taken: list[codec.Message] = []
    inlet = PullInlet(zmq.Context.instance(), HOST, HOST, taken.append, consumer.counters, name="sink-in",
                      auth=consumer.auth, admits=security.consumer_rule(""),
                      check_sender=security.check_consumer_sender)
    register(link, consumer.auth, protocol.Kind.SINK, pipeline="", endpoints={protocol.DATA_IN: inlet.endpoint})
    inlet.start()
    try:
        master = Service(link, "test/p1/master", protocol.Kind.MASTER)
        p2_sorter = Service(link, "test/p2/sorter", protocol.Kind.SORTER, pipeline="p2")
        push(inlet.endpoint, master.auth, scan_start("forged-by-master"),
             codec.Message(codec.RESULT, scan="s", stream="p1", index=0, count=1, arrays={"x": np.zeros(1)}),
             codec.Message(codec.SCAN_ABORT, scan="s", stream="p1"))
        push(inlet.endpoint, p2_sorter.auth, codec.Message(codec.SCAN_END, scan="s", stream="p1"),
             codec.Message(codec.SCAN_END, scan="s2", stream="p2"))
        wait_for(lambda: len(taken) == 2 and consumer.counters.errors == 3, 10, "two taken, three refused")
        assert sorted((m.type, m.stream) for m in taken) == [(codec.SCAN_ABORT, "p1"), (codec.SCAN_END, "p2")]
        assert "only from that pipeline's sorter" in consumer.counters.last_error
    finally:
        inlet.stop()


def test_a_peer_that_connects_just_before_its_registration_arrives_is_admitted(link, inlet) -> None:
    late = Service(link, "test/p1/sorter", protocol.Kind.SORTER, register_now=False)
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.linger = 500
    late.auth.connect(sock, inlet.endpoint)
    codec.send(sock, scan_start("early"))  # queued until the handshake is done
    time.sleep(0.3)  # the gate has asked the topology once and found nothing yet
    register(link, late.auth, protocol.Kind.SORTER)
    try:
        wait_for(lambda: inlet.taken, 5, "the late registrant's message")
        assert inlet.consumer.counters.errors == 0
    finally:
        sock.close()


def test_a_client_finds_the_servers_key_by_its_endpoint_and_refuses_an_unknown_one(link, inlet) -> None:
    sorter = Service(link, "test/p1/sorter", protocol.Kind.SORTER)
    assert sorter.auth.peers.server_key(inlet.endpoint) == inlet.consumer.auth.keys.public
    sock = zmq.Context.instance().socket(zmq.PUSH)
    try:
        with pytest.raises(security.UnknownPeer, match="tcp://127.0.0.1:1"):
            sorter.auth.connect(sock, "tcp://127.0.0.1:1")
    finally:
        sock.close(0)


def test_misses_are_looked_up_at_most_once_a_second_and_keys_outlive_a_manager_outage(link) -> None:
    now = [100.0]
    sorter = Service(link, "test/p1/sorter", protocol.Kind.SORTER)
    peers = security.PeerKeys(link, clock=lambda: now[0])
    assert peers.peer(sorter.auth.public_key).name == "test/p1/sorter"
    lookups = peers.lookups
    for _ in range(50):  # an attacker's unknown keys, in a loop
        assert peers.peer(security.Keypair.generate().text) is None
    assert peers.lookups == lookups, "no lookup within the rate limit"
    now[0] += security.REFRESH_SECONDS
    peers.peer(security.Keypair.generate().text)
    assert peers.lookups == lookups + 1

    link.down = True  # the manager restarts: lookups fail, the keys stay
    now[0] += 30
    assert not peers.refresh()
    assert peers.known(sorter.auth.public_key) is not None
    link.down = False
    link.registry.deregister("test/p1/sorter")  # a manager that came back without it (not re-registered yet)
    assert peers.refresh()
    assert peers.known(sorter.auth.public_key) is not None, "kept for the grace period"
    now[0] += security.GRACE_SECONDS
    assert peers.refresh()
    assert peers.known(sorter.auth.public_key) is None, "gone for good after it"


def test_a_refused_peer_is_counted_each_time_and_logged_once(link, caplog) -> None:
    auth = Service(link, "test/p1/master", protocol.Kind.MASTER).auth
    with caplog.at_level(logging.ERROR):
        for _ in range(20):
            auth.refuse("the work socket", "10.0.0.9 (abc...)", "not a registered worker")
    assert auth.counters.errors == 20
    assert sum("refused 10.0.0.9" in r.getMessage() for r in caplog.records) == 1


def test_with_the_switch_off_sockets_are_plain(link, monkeypatch) -> None:
    with pytest.raises(ValueError, match="DataPlaneAuth"):
        security.configure("maybe")
    monkeypatch.setattr(security, "_mode", None)
    security.configure("off")
    counters = Counters(logging.getLogger("t"))
    auth = security.Auth(link, counters, "test/p1/writer")
    assert not auth.on and auth.registration_fields() == {}
    taken: list[codec.Message] = []
    inlet = PullInlet(zmq.Context.instance(), HOST, HOST, taken.append, counters, auth=auth,
                      admits=security.consumer_rule("p1"), check_sender=security.check_consumer_sender)
    inlet.start()
    try:
        assert not inlet.socket.curve_server
        push(inlet.endpoint, None, scan_start("plain"))
        wait_for(lambda: taken, 5, "a plain peer's message")
    finally:
        inlet.stop()
