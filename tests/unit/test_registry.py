"""Lease registry and registration client, without Tango."""

from __future__ import annotations

import pytest

from services.registration import ManagerUnavailable, RegistrationClient, UnknownService
from services.schema import SchemaError
from topology_manager.registry import Registry


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def info(name: str = "mesh/worker/1", kind: str = "worker", pipeline: str = "xrf", **extra) -> dict:
    return {"name": name, "kind": kind, "pipeline": pipeline, "host": "bl-node-1", "pid": 42,
            "endpoints": {"data_in": "tcp://bl-node-1:5555"}, **extra}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list:
    return []


@pytest.fixture
def registry(clock, changes) -> Registry:
    return Registry(lease_seconds=5.0, heartbeat_seconds=1.0, clock=clock, on_change=changes.append)


def test_register_returns_lease_terms_and_lookup_filters(registry) -> None:
    terms = registry.register(info())
    assert terms == {"name": "mesh/worker/1", "lease_s": 5.0, "heartbeat_s": 1.0}
    registry.register(info("mesh/worker/2", pipeline="xrd"))
    registry.register(info("mesh/sink/1", kind="sink", pipeline=""))
    assert [s["name"] for s in registry.lookup({"kind": "worker"})] == ["mesh/worker/1", "mesh/worker/2"]
    assert [s["name"] for s in registry.lookup({"kind": "worker", "pipeline": "xrd"})] == ["mesh/worker/2"]
    assert [s["name"] for s in registry.lookup({"name": "MESH/Sink/1"})] == ["mesh/sink/1"]
    assert len(registry.lookup({})) == 3
    assert registry.lookup({"kind": "master"}) == []


def test_names_are_case_insensitive_like_tango_devices(registry) -> None:
    registry.register(info("Mesh/Worker/1"))
    registry.heartbeat("MESH/WORKER/1")
    registry.deregister("mesh/worker/1")
    assert len(registry) == 0


def test_heartbeat_renews_and_silence_expires(registry, clock, changes) -> None:
    registry.register(info("mesh/worker/1"))
    registry.register(info("mesh/worker/2"))
    clock.now += 4.0
    registry.heartbeat("mesh/worker/1")
    clock.now += 2.0  # worker/2 silent for 6 s > 5 s lease, worker/1 for 2 s
    assert registry.expire() == ["mesh/worker/2"]
    assert [s["name"] for s in registry.snapshot()] == ["mesh/worker/1"]
    assert [s["name"] for s in changes[-1]] == ["mesh/worker/1"]
    with pytest.raises(UnknownService, match="register again"):
        registry.heartbeat("mesh/worker/2")


def test_pinned_records_never_expire(registry, clock) -> None:
    registry.register(info("mesh/topology/manager", kind="topology"), pinned=True)
    clock.now += 100
    assert registry.expire() == []
    assert len(registry) == 1


def test_change_notified_on_join_leave_and_changed_facts_only(registry, changes) -> None:
    registry.register(info())
    assert len(changes) == 1
    registry.register(info())  # same facts: a refresh, not a change
    assert len(changes) == 1
    registry.register(info(endpoints={"data_in": "tcp://bl-node-1:6000"}))
    assert len(changes) == 2 and changes[-1][0]["endpoints"]["data_in"].endswith(":6000")
    registry.deregister("mesh/worker/1")
    assert changes[-1] == []


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"kind": "worker", "host": "h", "pid": 1}, "'name' is a required property"),
        ({**info(), "name": "not-a-device"}, "at name"),
        ({**info(), "pid": -1}, "at pid"),
        ({**info(), "kind": "Bad Kind"}, "at kind"),
        ({**info(), "endpoints": {"data_in": "http://x"}}, "at endpoints/data_in"),
        ({**info(), "surprise": 1}, "surprise"),
        ([], "is not of type 'object'"),
    ],
)
def test_invalid_registration_refused_with_location(registry, bad, where) -> None:
    with pytest.raises(SchemaError, match=where):
        registry.register(bad)
    assert len(registry) == 0


def test_invalid_lookup_refused(registry) -> None:
    with pytest.raises(SchemaError):
        registry.lookup({"colour": "blue"})
    with pytest.raises(SchemaError):
        registry.lookup({"kind": 3})


def test_deregister_unknown_raises(registry) -> None:
    with pytest.raises(UnknownService):
        registry.deregister("mesh/nobody/1")


# --------------------------------------------------------------------------- client


class FlakyLink:
    """A link to a registry that can go down, or be replaced (a restarted manager)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ManagerUnavailable("manager down")

    def register(self, info):
        self._check()
        return self.registry.register(info)

    def heartbeat(self, name):
        self._check()
        return self.registry.heartbeat(name)

    def deregister(self, name):
        self._check()
        self.registry.deregister(name)

    def lookup(self, query):
        self._check()
        return self.registry.lookup(query)


def test_client_registers_renews_and_follows_manager_restart(registry, clock) -> None:
    link = FlakyLink(registry)
    client = RegistrationClient(link, info())
    client.tick()
    assert client.registered and client.heartbeat_seconds == 1.0
    clock.now += 4.0
    client.tick()  # heartbeat
    clock.now += 4.0
    assert registry.expire() == []  # renewed 4 s ago
    # the manager restarts: a fresh, empty registry
    link.registry = Registry(lease_seconds=5.0, heartbeat_seconds=0.5, clock=clock)
    client.tick()  # heartbeat refused as unknown -> registers again in the same tick
    assert client.registered and client.registrations == 2
    assert [s["name"] for s in link.registry.snapshot()] == ["mesh/worker/1"]
    assert client.heartbeat_seconds == 0.5  # new terms taken


def test_client_survives_manager_down_then_registers(registry) -> None:
    link = FlakyLink(registry)
    link.down = True
    client = RegistrationClient(link, info())
    client.tick()
    assert not client.registered and "manager down" in client.last_problem
    link.down = False
    client.tick()
    assert client.registered and client.last_problem == ""


def test_client_reports_refused_registration(registry) -> None:
    client = RegistrationClient(FlakyLink(registry), info(name="bad name"))
    client.tick()
    assert not client.registered
    assert client.last_problem.startswith("registration refused")


def test_client_thread_registers_and_deregisters_on_stop(registry) -> None:
    import time

    registry.clock = time.time
    client = RegistrationClient(FlakyLink(registry), info(), retry_seconds=0.01)
    client.start()
    deadline = time.monotonic() + 5
    while not client.registered and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [s["name"] for s in registry.snapshot()] == ["mesh/worker/1"]
    client.stop()
    assert registry.snapshot() == []
