"""MeshDevice: the Tango face every tangomesh service shares.

It registers the service with the topology manager, keeps the lease alive from
a ``PyTangoThread``, deregisters on delete, and exposes the standard counters.
Subclasses only say which component to build (:meth:`create_component`) and
declare their own properties, attributes and commands.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from typing import Any, Callable, NoReturn

import tango
from tango import DevState
from tango.server import Device, attribute, device_property
from tango.utils import PyTangoThread

from services.component import Component
from services.registration import (
    DEFAULT_TOPOLOGY_DEVICE,
    REASON_INVALID_INPUT,
    ManagerLink,
    RegistrationClient,
    TangoManagerLink,
)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def throw_invalid(message: str, origin: str) -> NoReturn:
    """Refuse a command's input with a DevFailed that names what was wrong."""
    tango.Except.throw_exception(REASON_INVALID_INPUT, message, origin)


def default_of(config: type, name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``config``, as a
    device property's ``default_value``.

    The component's config dataclass is the one place a default is stated:
    the device property (what Jive shows), the component built without
    Tango (tests, benchmarks) and the mesh files (which leave defaults out)
    all follow it. Tuples become lists, the form Tango gives array properties.
    """
    for field in dataclasses.fields(config):
        if field.name == name:
            if field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                raise ValueError(f"{config.__name__}.{name} has no default")
            return list(value) if isinstance(value, tuple) else value
    raise ValueError(f"{config.__name__} has no field {name!r}")


class MeshDevice(Device):
    """Base class: do not instantiate; subclasses implement create_component."""

    TopologyDevice = device_property(
        dtype=str, default_value=DEFAULT_TOPOLOGY_DEVICE, doc="Device name of the TopologyManager"
    )
    Pipeline = device_property(dtype=str, default_value="", doc="Pipeline this service belongs to")
    DataHost = device_property(
        dtype=str,
        default_value="",
        doc="Address data endpoints bind to and advertise (empty: this host's name, all interfaces)",
    )

    component: Component
    registration: RegistrationClient | None = None

    # ------------------------------------------------------------ life cycle
    def init_device(self) -> None:
        super().init_device()
        self.set_state(DevState.INIT)
        try:
            self.component = self.create_component()
            self.component.start()
        except Exception as exc:  # a bad property, a bind failure: show it, stay up for Jive/Astor
            self.component = Component(self.get_name())
            self.component.counters.error(f"start failed: {exc}")
            self.set_state(DevState.FAULT)
            self.set_status(f"start failed: {exc}")
            return
        self.registration = RegistrationClient(
            self.create_link(),
            self.registration_info(),
            thread_factory=PyTangoThread,
        )
        self.registration.start()
        self.set_state(DevState.ON)

    def delete_device(self) -> None:
        if self.registration is not None:
            self.registration.stop(deregister=True)
            self.registration = None
        self.component.stop()
        super().delete_device()

    def create_component(self) -> Component:
        raise NotImplementedError

    def create_link(self) -> ManagerLink:
        return TangoManagerLink(self.TopologyDevice)

    def registration_info(self) -> dict[str, Any]:
        util = tango.Util.instance()
        return {
            "name": self.get_name().lower(),
            "kind": self.component.kind,
            "pipeline": self.Pipeline,
            "server": util.get_ds_name(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "endpoints": self.component.endpoints,
            "capabilities": self.component.capabilities,
        }

    @property
    def bind_host(self) -> str:
        return self.DataHost or "*"

    @property
    def advertised_host(self) -> str:
        return self.DataHost if self.DataHost not in ("", "*", "0.0.0.0") else socket.getfqdn()

    def dev_status(self) -> str:
        if self.get_state() == DevState.FAULT:
            return self.get_status()
        lines = [f"The device is in {self.get_state()} state."]
        reg = self.registration
        if reg is not None:
            lines.append("Registered with the topology manager." if reg.registered else
                         f"Not registered yet: {reg.last_problem or 'waiting for the topology manager'}")
        extra = self.component.status()
        if extra:
            lines.append(extra)
        last = self.component.counters.last_error
        if last:
            lines.append(f"Last error: {last}")
        return "\n".join(lines)

    # ------------------------------------------------------------ counters
    @attribute(dtype=int, doc="Messages or events received")
    def EventsIn(self) -> int:
        return self.component.counters.events_in

    @attribute(dtype=int, doc="Messages or events sent on")
    def EventsOut(self) -> int:
        return self.component.counters.events_out

    @attribute(dtype=int, doc="Refused inputs and failed operations (see Status and the log)")
    def Errors(self) -> int:
        return self.component.counters.errors

    @attribute(dtype=int, doc="Items waiting inside the service")
    def QueueDepth(self) -> int:
        return self.component.counters.queue_depth

    @attribute(dtype=str, doc="Data-plane endpoints by role (JSON)")
    def Endpoints(self) -> str:
        return json.dumps(self.component.endpoints)

    @attribute(dtype=bool, doc="True while the topology manager holds our lease")
    def Registered(self) -> bool:
        return bool(self.registration and self.registration.registered)


def run_server(classes: tuple[type[Device], ...], argv: list[str] | None = None) -> None:
    """Entry point body of every tangomesh console script."""
    # Starter sends a server's stdout to /dev/null and keeps stderr in its LogFileHome.
    logging.basicConfig(level=os.environ.get("TANGOMESH_LOG_LEVEL", "INFO"), format=LOG_FORMAT, stream=sys.stderr)
    # Debian's Starter starts servers with SIGTERM blocked; unblock it so that
    # kill, systemd and `tangomesh down` stop them cleanly (deregistering first).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    from tango.server import run

    run(classes, args=argv)


def console_script(*classes: type[Device]) -> Callable[[], None]:
    """``main`` for setup.cfg's console_scripts: the script name is the server name."""

    def main() -> None:
        run_server(classes)

    main.device_classes = classes  # type: ignore[attr-defined]  # what the server runs (mesh-file checks)
    return main

