"""LocalManagerLink: the manager's registry behind a direct call keeps the
contract of the Tango link (copies both ways, the same refusals)."""

from __future__ import annotations

import pytest

from services.registration import RegistrationClient, UnknownService
from topology_manager.local import LocalManagerLink
from topology_manager.registry import Registry


def info(name: str = "test/p1/sorter") -> dict:
    return {"name": name, "kind": "sorter", "pipeline": "p1", "host": "127.0.0.1", "pid": 7,
            "endpoints": {"results_in": "tcp://127.0.0.1:5000"}}


def test_documents_are_copied_both_ways_as_over_tango() -> None:
    link = LocalManagerLink(Registry(10.0, 2.0))
    sent = info()
    assert link.register(sent) == {"name": "test/p1/sorter", "lease_s": 10.0, "heartbeat_s": 2.0}
    sent["endpoints"]["results_in"] = "tcp://elsewhere:1"  # the caller's dict is not the record
    (found,) = link.lookup({"kind": "sorter"})
    assert found["endpoints"] == {"results_in": "tcp://127.0.0.1:5000"}
    found["endpoints"].clear()  # nor is the answer
    assert link.lookup({"kind": "sorter"})[0]["endpoints"]
    assert link.calls == 3


def test_refusals_are_those_of_the_link_contract() -> None:
    link = LocalManagerLink(Registry(10.0, 2.0))
    with pytest.raises(ValueError, match="invalid registration"):
        link.register({"name": "not a device name", "kind": "sorter", "host": "h", "pid": 1})
    with pytest.raises(ValueError, match="invalid lookup"):
        link.lookup({"colour": "blue"})
    with pytest.raises(UnknownService):
        link.heartbeat("test/p1/nobody")
    with pytest.raises(UnknownService):
        link.deregister("test/p1/nobody")


def test_the_registration_client_runs_its_lease_over_it() -> None:
    registry = Registry(10.0, 2.0)
    client = RegistrationClient(LocalManagerLink(registry), info())
    client.tick()
    assert client.registered and len(registry) == 1
    registry.deregister("test/p1/sorter")  # the manager forgot us (restart, expired lease)
    client.tick()  # heartbeat refused as unknown: registers again at once
    assert client.registrations == 2 and len(registry) == 1
    client.stop(deregister=True)
    assert len(registry) == 0
