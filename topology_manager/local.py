"""The topology manager in the caller's own process: a ManagerLink that calls
the manager's real :class:`Registry` directly instead of through a Tango command.

It is not a stand-in for the manager: leases, validation, lookups and refusals
are the Registry's own, the code the TopologyManager device runs. Only the
transport differs. Arguments and answers still go through JSON, as they do over
Tango, so a caller never shares a mutable dict with the registry and a
document that could not travel as a Tango string fails here too. Refusals keep
the link's contract (:class:`services.registration.ManagerLink`): ``ValueError``
for invalid input, ``UnknownService`` for an unknown name.

Used where every stage runs in one process without Tango: the component tests,
and any later one-process mesh (ops may import it; pipeline stages never do,
they are handed a link).
"""

from __future__ import annotations

import json
from typing import Any

from topology_manager.registry import Registry


class LocalManagerLink:
    """ManagerLink over a Registry in this process (see the module docstring)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.calls = 0  # like the device's EventsIn: how much the mesh talks to its manager

    def register(self, info: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return _travel(self.registry.register(_travel(info)))

    def heartbeat(self, name: str) -> dict[str, Any]:
        self.calls += 1
        return _travel(self.registry.heartbeat(name))

    def deregister(self, name: str) -> None:
        self.calls += 1
        self.registry.deregister(name)

    def lookup(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        self.calls += 1
        return _travel(self.registry.lookup(_travel(query)))


def _travel(document: Any) -> Any:
    """The document as the other side of a Tango string command would see it."""
    return json.loads(json.dumps(document))
