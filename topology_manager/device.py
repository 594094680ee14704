"""TopologyManager: the one fixed location of the mesh (see docs/topology.md)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

import tango
from tango.server import attribute, command
from tango.utils import PyTangoThread

from services.component import brief
from services.device import MeshDevice, config_property, throw_invalid
from services.registration import REASON_UNKNOWN_SERVICE, ManagerLink, UnknownService
from services.schema import SchemaError, load_json
from topology_manager.component import TopologyComponent, TopologyConfig


class TopologyManager(MeshDevice):
    """Registration, discovery and liveness of every tangomesh service."""

    LeaseSeconds = config_property(TopologyConfig, "lease_seconds", doc="A service silent this long is removed")
    HeartbeatSeconds = config_property(TopologyConfig, "heartbeat_seconds", doc="Heartbeat period asked of services")

    component: TopologyComponent

    def init_device(self) -> None:
        self._services_json = "[]"
        # before the component starts: its first registration already pushes events
        self.set_change_event("Services", True, False)
        self.set_change_event("ServiceCount", True, False)
        super().init_device()

    def create_component(self) -> TopologyComponent:
        return TopologyComponent(
            self.get_name(),
            self.config_from_properties(TopologyConfig),
            on_change=self._publish,
            thread_factory=PyTangoThread,
        )

    def create_link(self) -> ManagerLink:
        return self.component.registry  # the manager registers itself in-process

    def _publish(self, services: list[dict]) -> None:
        self._services_json = json.dumps(services)
        try:
            self.push_change_event("Services", self._services_json)
            self.push_change_event("ServiceCount", len(services))
        except tango.DevFailed as exc:  # a failed event must not fail the registration behind it
            self.component.counters.error(f"change event not pushed: {exc.args[0].desc}")

    # ------------------------------------------------------------ attributes
    @attribute(dtype=str, doc="Every registered service (JSON list); change events on every change")
    def Services(self) -> str:
        return self._services_json

    @attribute(dtype=int, doc="Number of registered services")
    def ServiceCount(self) -> int:
        return len(self.component.registry)

    # ------------------------------------------------------------ commands
    @contextmanager
    def _refusals(self, origin: str) -> Iterator[None]:
        """Turn refused input into a counted, logged DevFailed with a clear reason."""
        try:
            yield
        except SchemaError as exc:
            self.component.counters.error(f"{origin}: {exc}")
            throw_invalid(str(exc), f"TopologyManager.{origin}")
        except UnknownService as exc:
            self.component.counters.error(f"{origin}: {exc}")
            tango.Except.throw_exception(REASON_UNKNOWN_SERVICE, brief(str(exc)), f"TopologyManager.{origin}")

    @command(dtype_in=str, doc_in="registration JSON (services/schemas/registration.json)",
             dtype_out=str, doc_out="lease terms JSON: name, lease_s, heartbeat_s")
    def Register(self, info: str) -> str:
        self.component.counters.events_in += 1
        with self._refusals("Register"):
            return json.dumps(self.component.registry.register(load_json("registration", info)))

    @command(dtype_in=str, doc_in="device name of the service", dtype_out=str, doc_out="lease terms JSON")
    def Heartbeat(self, name: str) -> str:
        self.component.counters.events_in += 1
        with self._refusals("Heartbeat"):
            return json.dumps(self.component.registry.heartbeat(name))

    @command(dtype_in=str, doc_in="device name of the service")
    def Deregister(self, name: str) -> None:
        self.component.counters.events_in += 1
        with self._refusals("Deregister"):
            self.component.registry.deregister(name)

    @command(dtype_in=str, doc_in='query JSON, e.g. {"kind": "worker", "pipeline": "xrf"}; {} lists all',
             dtype_out=str, doc_out="JSON list of matching services")
    def Lookup(self, query: str) -> str:
        self.component.counters.events_in += 1
        with self._refusals("Lookup"):
            return json.dumps(self.component.registry.lookup(load_json("lookup", query)))
