"""Data-plane authentication end to end (docs/operating.md, "Data-plane
authentication"): real TopologyManager, master, worker, sorter, sink, NeXus
writer and recorder processes with authentication on (the default), the
simulated sources and the probe in this process.

An unregistered peer (its own keypair, and a plain peer without CURVE) talks
to every bound data-plane endpoint the topology lists: nothing of it arrives,
each endpoint's service counts the refusals, and a registered scan right after
is lossless. A registered peer of the wrong kind is refused by the consumers'
sorter-only rule.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import tango
import zmq

from services import codec, protocol, security
from services.component import Counters
from services.ops import simulate
from services.registration import TangoManagerLink
from services.sim.profiles import PROFILES, ProfileScan
from sink.queries import QUERY, SinkClient
from support import ServerPool, topology_props, wait_for
from support.peers import RegisteredPeer

MANAGER = "tangomesh/topology/manager"
PIPE = "a1"
LOOP = "127.0.0.1"
MASTER, WORKER, SORTER = "test/a1/master", "test/a1-worker/0", "test/a1/sorter"
SINK, NEXUS, RECORDER = "test/sink/auth", "test/writer/auth", "test/a1/recorder"
#: Endpoints not authenticated, by design (docs/operating.md): Lavue speaks no CURVE, and
#: the sink's query socket answers the CLI and notebooks, which are not registered services.
PLAIN_ROLES = {"lavue", QUERY}


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("auth-logs"))
    root = tmp_path_factory.mktemp("auth-beamtime")
    try:
        pool.start("TopologyManager/auth", {"TopologyManager": {MANAGER: topology_props(heartbeat=0.5, lease=3.0)}})
        pool.start("Sink/auth", {"Sink": {SINK: {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("NexusWriter/auth", {"NexusWriter": {NEXUS: {"DataHost": LOOP, "Pipeline": PIPE,
                                                                 "BeamtimeRoot": str(root)}}})
        pool.start("Recorder/a1", {"Recorder": {RECORDER: {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("Sorter/a1", {"Sorter": {SORTER: {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/a1-0", {"PipelineWorker": {WORKER: {"Pipeline": PIPE}}})
        pool.start("PipelineMaster/a1", {"PipelineMaster": {MASTER: {"DataHost": LOOP, "Pipeline": PIPE}}})
        link = TangoManagerLink(MANAGER)
        master = tango.DeviceProxy(MASTER)
        wait_for(lambda: len(json.loads(master.WorkerTable)) == 1, 20, "the worker to join the master")
        wanted = {SORTER, SINK, NEXUS, RECORDER}
        wait_for(lambda: wanted <= {s["name"] for s in link.lookup({})}, 20, "sorter, sink, writer, recorder")
        beamline = simulate.SimBeamline(PIPE, "counters", link)
        yield pool, root, link, beamline
        beamline.close()
    finally:
        pool.stop_all()


def errors_of(beamline: simulate.SimBeamline) -> dict[str, int]:
    """Errors of every service, by name: the devices' attribute, the in-process sources' and probe's counters."""
    counts = {name: tango.DeviceProxy(name).Errors for name in (MASTER, WORKER, SORTER, SINK, NEXUS, RECORDER)}
    for source in beamline.sources.values():
        counts[source.registration.name] = source.counters.errors
    for probe in beamline.driver.probes.values():
        counts[probe.registration.name] = probe.counters.errors
    return counts


def settled_errors(beamline: simulate.SimBeamline) -> dict[str, int]:
    """Errors once no refusal is still on its way: a connection a ZAP handler
    is still deciding on (an unknown key gets a few topology reads first), or
    a forger's reconnection (ZeroMQ reconnects when the refusal and the closed
    connection race), is counted a little later."""
    last = errors_of(beamline)
    while True:
        time.sleep(1 + security.UNKNOWN_KEY_ATTEMPTS * security.REFRESH_SECONDS)
        now = errors_of(beamline)
        if now == last:
            return now
        last = now


def status_of(beamline: simulate.SimBeamline, name: str) -> str:
    """The device's Status, or the in-process client's last error."""
    clients = {c.registration.name: c for c in [*beamline.sources.values(), *beamline.driver.probes.values()]}
    return clients[name].counters.last_error if name in clients else tango.DeviceProxy(name).Status()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def forged_scan(scan_id: str) -> list[codec.Message]:
    """A complete scan a consumer would write: a valid document, a result block, the end."""
    document = ProfileScan(PROFILES["counters"], PIPE, 4).document(scan_id, 1)
    return [codec.Message(codec.SCAN_START, scan=scan_id, stream=PIPE, meta={protocol.META_SCAN: document}),
            codec.Message(codec.RESULT, scan=scan_id, stream=PIPE, index=0, count=4,
                          arrays={"i0": np.arange(4.0)}),
            codec.Message(codec.SCAN_END, scan=scan_id, stream=PIPE, meta={"delivered": 4})]


def attack(endpoint: str, role: str, key: bytes | None, auth: security.Auth | None) -> zmq.Socket:
    """Talk to ``endpoint`` the way its peers do, as ``auth``'s (unregistered) key or plain (None).
    Returns the socket (open, so that what it queued has every chance to arrive)."""
    ctx = zmq.Context.instance()
    sock_type = {protocol.WORK: zmq.DEALER, protocol.SOURCE_OUT: zmq.PULL}.get(role, zmq.PUSH)
    sock = ctx.socket(sock_type)
    sock.linger = 0
    if auth is not None:
        auth.connect(sock, endpoint, server_key=key)
    else:
        sock.connect(endpoint)
    if role == protocol.WORK:
        messages = [protocol.credit(50, "test/forged/worker", open_units=50)]
    elif role == protocol.ACKS:
        messages = [protocol.ack("forged-ack", [(0, 10)])]
    elif role == protocol.RESULTS_IN:
        messages = forged_scan("forged-at-sorter")
    elif role == protocol.DATA_IN:
        # 70 scan_starts would fill a writer's MaxOpenScans (64), then a whole checksummed forged file
        messages = [forged_scan(f"forged-open-{k}")[0] for k in range(70)] + forged_scan("forged-file")
    else:
        messages = []  # a source's PUSH: the forger reads, below
    for msg in messages:
        try:
            codec.send(sock, msg, zmq.NOBLOCK)
        except zmq.Again:
            break  # nothing admitted to queue on
    return sock


def test_an_unregistered_peer_is_refused_on_every_endpoint_and_a_registered_scan_is_lossless(mesh) -> None:
    _, root, link, beamline = mesh
    services = link.lookup({})
    targets = [(s["name"], role, endpoint, s[security.KEY_FIELD]) for s in services
               for role, endpoint in sorted(s.get("endpoints", {}).items()) if role not in PLAIN_ROLES]
    roles = {role for _, role, _, _ in targets}
    assert {protocol.WORK, protocol.ACKS, protocol.RESULTS_IN, protocol.DATA_IN, protocol.SOURCE_OUT} <= roles
    assert {name for name, *_ in targets} >= {MASTER, SORTER, SINK, NEXUS, RECORDER}
    assert all(key for *_, key in targets), "every service with an endpoint publishes its key"
    files_before = files_under(root)
    errors_before = errors_of(beamline)
    workers_before = json.loads(tango.DeviceProxy(MASTER).WorkerTable)
    stranger = security.Auth(link, Counters(logging.getLogger("test.stranger")), "test/forged/stranger")
    assert stranger.on and not link.lookup({"name": "test/forged/stranger"})  # a keypair, never registered

    sockets = []
    try:
        for _, role, endpoint, key in targets:
            sockets.append(attack(endpoint, role, key.encode(), stranger))
            sockets.append(attack(endpoint, role, None, None))
        per_service: dict[str, int] = {}
        for name, *_ in targets:
            per_service[name] = per_service.get(name, 0) + 2  # each endpoint: the stranger and the plain peer
        wait_for(lambda: all(errors_of(beamline)[n] - errors_before[n] >= k for n, k in per_service.items()),
                 15, "every endpoint's service to count both refusals")
        time.sleep(0.5)
        pulled = [s for s in sockets if s.type == zmq.PULL and s.poll(0)]
        assert not pulled, "a forger read blocks off a source"
    finally:
        for sock in sockets:
            sock.close(0)

    after = settled_errors(beamline)
    for name, k in per_service.items():
        assert after[name] - errors_before[name] >= k, status_of(beamline, name)
        assert "refused" in status_of(beamline, name)
    nexus = tango.DeviceProxy(NEXUS)
    assert nexus.OpenScans == 0, "no forged scan_start reached the writer"
    assert files_under(root) == files_before, "no forged file"
    recorded = {r["scan"] for r in json.loads(tango.DeviceProxy(RECORDER).LatestRecords(0))}
    assert not {s for s in recorded if s.startswith("forged")}
    sink = SinkClient(json.loads(tango.DeviceProxy(SINK).Endpoints)[QUERY])
    try:
        assert not [s for s in sink.list()["scans"] if str(s.get("scan", s)).startswith("forged")]
    finally:
        sink.close()
    assert json.loads(tango.DeviceProxy(MASTER).WorkerTable) == workers_before, "no forged worker took credit"

    summary, tally = beamline.scan(500, block=25)
    assert summary["points_delivered"] == 500 and summary["missing"] == 0 and summary["duplicates"] == 0, summary
    assert not summary["aborted"]
    wait_for(lambda: [f for f in json.loads(nexus.ListFiles(0)) if f["scan"] == summary["scan"]], 15,
             "the registered scan's file")
    assert errors_of(beamline) == after, "the registered scan was refused nothing"


def test_a_registered_peer_that_is_not_the_pipelines_sorter_cannot_drive_a_consumer(mesh) -> None:
    """A registered master of the pipeline is admitted to the consumers (it
    sends scan_abort when its sorter is gone) but may not start, fill or end
    a scan there; a registered worker is not admitted at all."""
    _, root, link, beamline = mesh
    consumers = {s["name"]: s["endpoints"][protocol.DATA_IN] for s in link.lookup({})
                 if s["kind"] in protocol.CONSUMER_KINDS and s["name"] in (SINK, NEXUS, RECORDER)}
    files_before = files_under(root)
    before = errors_of(beamline)
    master_peer = RegisteredPeer(link, "test/a1-forged/master", protocol.Kind.MASTER, PIPE)
    worker_peer = RegisteredPeer(link, "test/a1-forged/worker", protocol.Kind.WORKER, PIPE)

    def send_forged_scan(peer: RegisteredPeer, endpoint: str) -> None:
        sock = peer.socket(zmq.PUSH, endpoint, linger=1000)
        for msg in forged_scan(f"forged-by-{peer.registration.name.split('/')[-1]}"):
            try:
                codec.send(sock, msg, zmq.NOBLOCK)
            except zmq.Again:
                break  # a refused connection: nothing to queue on
        sock.close()

    try:
        for endpoint in consumers.values():  # a worker is no consumer's peer: its connection is refused
            send_forged_scan(worker_peer, endpoint)
        wait_for(lambda: all(errors_of(beamline)[n] > before[n] for n in consumers), 15,
                 "every consumer to refuse the worker")
        middle = settled_errors(beamline)
        assert all("test/a1-forged/worker is a worker" in status_of(beamline, n) for n in consumers)
        for endpoint in consumers.values():  # a master is admitted, for scan_abort only
            send_forged_scan(master_peer, endpoint)
        wait_for(lambda: all(errors_of(beamline)[n] - middle[n] >= 3 for n in consumers), 15,
                 "every consumer to refuse the master's scan_start, result and scan_end one by one")
    finally:
        master_peer.close()
        worker_peer.close()
    after = errors_of(beamline)
    assert {n: after[n] - middle[n] for n in consumers} == {n: 3 for n in consumers}
    assert all("only from that pipeline's sorter" in status_of(beamline, n) for n in consumers)
    assert tango.DeviceProxy(NEXUS).OpenScans == 0 and files_under(root) == files_before


def test_the_switch_is_one_free_property_and_a_service_started_with_it_off_runs_plain(mesh, tango_server) -> None:
    """``DataPlaneAuth`` unset means curve; ``off`` (what ``tangomesh up --trusted``
    writes) makes a service started afterwards bind plain sockets and publish no key."""
    _, _, link, _ = mesh
    db = tango.Database()
    assert security.read_switch(db) == security.CURVE  # unset, or stated as curve by the default
    device = "test/plain/recorder"
    security.write_switch(security.OFF, db)
    try:
        assert security.read_switch(db) == security.OFF
        tango_server("Recorder/plain", {"Recorder": {device: {"DataHost": LOOP}}})
        recorder = tango.DeviceProxy(device)
        (record,) = wait_for(lambda: link.lookup({"name": device}), 10, "the plain recorder to register")
    finally:
        security.write_switch(security.CURVE, db)
    assert record[security.KEY_FIELD] == ""
    push = zmq.Context.instance().socket(zmq.PUSH)  # no CURVE at all
    push.linger = 1000
    push.connect(record["endpoints"][protocol.DATA_IN])
    codec.send(push, codec.Message(codec.DATA, scan="plain", stream="x", index=0, count=1, arrays={"a": np.zeros(1)}))
    push.close()
    wait_for(lambda: recorder.RecordCount == 1, 10, "the plain peer's message")
    assert recorder.Errors == 0
