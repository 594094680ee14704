"""TopologyManager and MeshDevice against the embedded database and real servers."""

from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import pytest
import tango
import zmq

from support import topology_props, wait_for
from support.peers import RegisteredPeer
from services import codec, protocol
from services.registration import TangoManagerLink

MANAGER = "tangomesh/topology/manager"


def names(manager: tango.DeviceProxy, query: dict | None = None) -> list[str]:
    return [s["name"] for s in json.loads(manager.Lookup(json.dumps(query or {})))]


def registration(name: str, kind: str = "worker", pipeline: str = "xrf") -> str:
    return json.dumps({"name": name, "kind": kind, "pipeline": pipeline, "host": "node-7", "pid": 1234,
                       "endpoints": {"data_in": "tcp://node-7:5001"}, "capabilities": {"processors": ["xrf"]}})


@pytest.fixture
def manager(tango_server) -> tango.DeviceProxy:
    tango_server("TopologyManager/test", {"TopologyManager": {MANAGER: topology_props(heartbeat=0.5, lease=2.0)}})
    proxy = tango.DeviceProxy(MANAGER)
    wait_for(lambda: MANAGER in names(proxy), 10, "the manager to list itself")
    return proxy


def test_register_lookup_heartbeat_deregister(manager) -> None:
    terms = json.loads(manager.Register(registration("bl/worker/1")))
    assert terms == {"name": "bl/worker/1", "lease_s": 2.0, "heartbeat_s": 0.5}
    manager.Register(registration("bl/worker/2", pipeline="xrd"))
    manager.Register(registration("bl/sink/1", kind="sink", pipeline=""))
    assert names(manager, {"kind": "worker"}) == ["bl/worker/1", "bl/worker/2"]
    assert names(manager, {"kind": "worker", "pipeline": "xrd"}) == ["bl/worker/2"]
    record = json.loads(manager.Lookup('{"name": "bl/worker/1"}'))[0]
    assert record["endpoints"] == {"data_in": "tcp://node-7:5001"} and record["pid"] == 1234
    assert json.loads(manager.Heartbeat("bl/worker/1"))["lease_s"] == 2.0
    manager.Deregister("bl/worker/1")
    assert "bl/worker/1" not in names(manager)
    with pytest.raises(tango.DevFailed) as exc:
        manager.Heartbeat("bl/worker/1")
    assert exc.value.args[0].reason == "TANGOMESH_UnknownService"
    assert manager.ServiceCount == 3  # itself, worker/2, sink/1


def test_lease_expiry_removes_silent_services(manager, tango_server) -> None:
    manager.Register(registration("bl/worker/9"))
    recorder = tango_server("Recorder/expiry", {"Recorder": {"test/recorder/expiry": {"DataHost": "127.0.0.1"}}})
    wait_for(lambda: "test/recorder/expiry" in names(manager), 10, "the recorder to register")
    t0 = time.monotonic()
    recorder.kill(hard=True)  # no deregistration: only the lease can remove it
    wait_for(lambda: not {"bl/worker/9", "test/recorder/expiry"} & set(names(manager)), 10, "leases to expire")
    assert time.monotonic() - t0 < 2.0 + 1.5  # lease plus the expiry check period
    assert MANAGER in names(manager)  # the manager itself keeps heartbeating


def test_services_change_events(manager) -> None:
    received: list[list[str]] = []

    def on_event(event: tango.EventData) -> None:
        if not event.err:
            received.append([s["name"] for s in json.loads(event.attr_value.value)])

    event_id = manager.subscribe_event("Services", tango.EventType.CHANGE_EVENT, on_event)
    try:
        wait_for(lambda: received, 5, "the initial event")
        manager.Register(registration("bl/worker/5"))
        wait_for(lambda: any("bl/worker/5" in r for r in received), 5, "a join event")
        manager.Deregister("bl/worker/5")
        wait_for(lambda: "bl/worker/5" not in received[-1], 5, "a leave event")
    finally:
        manager.unsubscribe_event(event_id)


def test_manager_restart_is_repopulated_within_two_heartbeats(tango_server) -> None:
    heartbeat = 1.0
    props = topology_props(heartbeat=heartbeat, lease=5.0)
    first = tango_server("TopologyManager/restart", {"TopologyManager": {MANAGER: props}})
    devices = [f"test/recorder/r{i}" for i in range(3)]
    tango_server("Recorder/restart", {"Recorder": {d: {"DataHost": "127.0.0.1"} for d in devices}})
    manager = tango.DeviceProxy(MANAGER)
    wait_for(lambda: set(devices) <= set(names(manager)), 10, "recorders to register")

    first.kill(hard=True)
    tango_server("TopologyManager/restart", {"TopologyManager": {MANAGER: props}})
    fresh = tango.DeviceProxy(MANAGER)
    t_up = time.monotonic()
    wait_for(lambda: set(devices) <= set(names(fresh)), 4 * heartbeat, "services to re-register")
    elapsed = time.monotonic() - t_up
    assert elapsed <= 2 * heartbeat, f"repopulated after {elapsed:.2f} s"
    for device in devices:
        assert tango.DeviceProxy(device).Registered


def test_bad_input_is_refused_and_the_manager_stays_up(manager) -> None:
    errors_before = manager.Errors
    cases = [
        ("Register", "{not json", "TANGOMESH_InvalidInput", "not JSON"),
        ("Register", '{"name": "bl/worker/1"}', "TANGOMESH_InvalidInput", "'kind' is a required property"),
        ("Register", json.dumps({**json.loads(registration("bl/w/1")), "pid": "x"}), "TANGOMESH_InvalidInput", "at pid"),
        ("Lookup", "[1, 2]", "TANGOMESH_InvalidInput", "not of type 'object'"),
        ("Heartbeat", "nobody/is/here", "TANGOMESH_UnknownService", "not registered"),
        ("Deregister", "nobody/is/here", "TANGOMESH_UnknownService", "not registered"),
    ]
    for command, argument, reason, text in cases:
        with pytest.raises(tango.DevFailed) as exc:
            manager.command_inout(command, argument)
        assert exc.value.args[0].reason == reason
        assert text in exc.value.args[0].desc
    assert manager.Errors == errors_before + len(cases)
    assert manager.state() == tango.DevState.ON
    assert "Last error" in manager.status()
    manager.Register(registration("bl/worker/ok"))
    assert "bl/worker/ok" in names(manager)


def test_garbage_frames_on_a_data_endpoint_are_counted_and_survived(manager, tango_server) -> None:
    device = "test/recorder/garbage"
    # a pipeline of its own: a recorder of every pipeline ("") would also take what the sorters of
    # other modules' meshes still running in this session send it, and count their refusals too
    tango_server("Recorder/garbage", {"Recorder": {device: {"DataHost": "127.0.0.1", "Pipeline": "garbage"}}})
    recorder = tango.DeviceProxy(device)
    endpoint = json.loads(recorder.Endpoints)["data_in"]
    good = codec.encode(codec.Message(codec.DATA, "scan-1", "counters", 7, 2,
                                      {"i0": np.array([1.0, 2.0]), "spectrum": np.ones((2, 4096), "<u4")}))
    garbage = [
        [b"\x00\x01\x02"],
        [b""],
        [msgpack.packb({"v": 1})],
        [msgpack.packb([1, 2, 3])],
        [good[0]],  # header promises arrays that are missing
        [good[0], good[1], b"short"],  # wrong buffer length
        [good[0].replace(b"counters", b"counter\xff")],  # invalid UTF-8 inside the header
        [np.random.default_rng(1).bytes(5000)],
    ]
    # from the pipeline's registered sorter, so past the authentication: refused by content
    sorter = RegisteredPeer(TangoManagerLink(MANAGER), "test/garbage/sorter", protocol.Kind.SORTER, "garbage")
    push = sorter.socket(zmq.PUSH, endpoint, linger=1000)
    try:
        for frames in garbage:
            push.send_multipart(frames)
        push.send_multipart(good)
        wait_for(lambda: recorder.RecordCount == 1, 10, "the valid message after the garbage")
    finally:
        push.close()
        sorter.close()
    assert recorder.Errors == len(garbage), recorder.status()
    assert recorder.EventsIn == 1
    assert recorder.state() == tango.DevState.ON
    record = json.loads(recorder.LatestRecords(1))[0]
    assert record["index"] == 7 and record["count"] == 2 and record["stream"] == "counters"
    assert record["arrays"]["spectrum"] == {"dtype": "<u4", "shape": [2, 4096], "sum": 2 * 4096.0}
    assert "refused data-plane message" in recorder.status()


def test_bad_property_faults_the_device_with_a_reason_and_it_stays_up(manager, tango_server) -> None:
    device = "test/recorder/badprop"
    tango_server("Recorder/badprop", {"Recorder": {device: {"MaxRecords": 0}}})
    proxy = tango.DeviceProxy(device)
    assert proxy.state() == tango.DevState.FAULT
    assert "MaxRecords must be at least 1" in proxy.status()
    assert proxy.Errors == 1
    assert device not in names(manager)  # a device that cannot work does not offer itself
    proxy.put_property({"MaxRecords": ["many"]})  # a value Tango itself cannot convert to the property's type
    proxy.Init()
    assert proxy.state() == tango.DevState.FAULT
    assert "Failed to convert property 'MaxRecords'" in proxy.status() and "'many'" in proxy.status()
    proxy.put_property({"MaxRecords": ["10"]})
    proxy.Init()  # fixed in Jive, re-initialised from Astor/Jive: it recovers
    assert proxy.state() == tango.DevState.ON
    wait_for(lambda: device in names(manager), 10, "the repaired device to register")


def test_a_property_value_tango_cannot_convert_faults_the_device_at_start_instead_of_killing_the_server(
        manager, tango_server) -> None:
    device = "test/recorder/badconv"
    tango_server("Recorder/badconv", {"Recorder": {device: {"MaxRecords": "many"}}})
    proxy = tango.DeviceProxy(device)
    assert proxy.state() == tango.DevState.FAULT
    assert "Failed to convert property 'MaxRecords'" in proxy.status()
    assert proxy.Errors == 1 and device not in names(manager)


def test_in_fault_every_device_refuses_its_own_attributes_and_commands_until_init(manager, tango_server) -> None:
    """The one FAULT rule (services/device.py), on a PipelineMaster and a Sink
    that failed to start: their own attributes and commands answer DevFailed
    TANGOMESH_Fault naming the start failure, never AttributeError; State,
    Status, Init and the counters keep working; fixed and re-initialised they work."""
    master_name, sink_name = "test/fault/master", "test/fault/sink"
    tango_server("PipelineMaster/fault", {"PipelineMaster": {master_name: {
        "DataHost": "127.0.0.1", "Pipeline": "fault", "MaxUnitPoints": 0}}})
    tango_server("Sink/fault", {"Sink": {sink_name: {"DataHost": "127.0.0.1", "ViewerRateHz": 0}}})
    master, sink = tango.DeviceProxy(master_name), tango.DeviceProxy(sink_name)
    cases = [
        (master, "PipelineMaster", "MaxUnitPoints must be positive", ["Progress", "WorkerTable", "CurrentScan"],
         [lambda: master.StartScan("{}"), lambda: master.EndScan("s1"), lambda: master.AbortScan("s1")]),
        (sink, "Sink", "ViewerRateHz must be in (0, 100]", ["ResidentBytes", "Products", "Preview", "PreviewProduct"],
         [lambda: sink.ListScans(), lambda: sink.ScanInfo("s1"),
          lambda: sink.write_attribute("PreviewProduct", "counters/sum")]),
    ]
    for proxy, cls, why, attributes, commands in cases:
        name = proxy.name()
        assert proxy.state() == tango.DevState.FAULT
        expected = f"{cls} {name} is in FAULT: start failed: {why}"
        calls = [lambda a=a: proxy.read_attribute(a) for a in attributes] + commands
        for call in calls:
            with pytest.raises(tango.DevFailed) as exc:
                call()
            assert exc.value.args[0].reason == "TANGOMESH_Fault", exc.value.args[0]
            assert expected in exc.value.args[0].desc
        # a client reading several at once gets the base ones and the refusal per attribute
        state, errors, own = proxy.read_attributes(["State", "Errors", attributes[0]])
        assert state.value == tango.DevState.FAULT and errors.value == 1
        assert own.has_failed
        assert proxy.Errors == 1 and proxy.EventsIn == 0 and proxy.QueueDepth == 0
        assert proxy.Endpoints == "{}" and not proxy.Registered
        assert proxy.status().startswith(f"start failed: {why}")
        assert name not in names(manager)
    master.put_property({"MaxUnitPoints": ["200"]})
    sink.put_property({"ViewerRateHz": ["5"]})
    for proxy in (master, sink):
        proxy.Init()
        assert proxy.state() == tango.DevState.ON
        assert proxy.Errors == 0
    assert master.Progress == 0.0 and master.CurrentScan == ""
    assert sink.ScanCount == 0 and json.loads(sink.ListScans()) == []
    wait_for(lambda: {master_name, sink_name} <= set(names(manager)), 10, "the repaired devices to register")
