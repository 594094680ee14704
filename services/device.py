"""MeshDevice: the Tango face every tangomesh service shares.

It registers the service with the topology manager, keeps the lease alive from
a ``PyTangoThread``, deregisters on delete, and exposes the standard counters.
Subclasses only say which component to build (:meth:`create_component`) and
declare their own properties, attributes and commands.

One FAULT rule for every device: when the component fails to start, the
device stays exported in FAULT, and every attribute and command a subclass
declares is refused with DevFailed ``TANGOMESH_Fault`` naming the start
failure (Tango's own is-allowed hook, installed for each of them by
:meth:`MeshDevice.__init_subclass__`). State, Status, Init and the base
counters keep answering, so Jive and Astor show why and Init retries.
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

from services.component import BRIEF_CHARS, Component, brief
from services.registration import (
    DEFAULT_TOPOLOGY_DEVICE,
    REASON_FAULT,
    REASON_INVALID_INPUT,
    ManagerLink,
    RegistrationClient,
    TangoManagerLink,
)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def throw_invalid(message: str, origin: str) -> NoReturn:
    """Refuse a command's input with a DevFailed that names what was wrong
    (briefly: a huge argument is never echoed whole to the client)."""
    tango.Except.throw_exception(REASON_INVALID_INPUT, brief(message, 3 * BRIEF_CHARS), origin)


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


_DTYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple[str, ...]": (str,),
           "tuple[int, ...]": (int,)}


def config_property(config: type, name: str, doc: str) -> device_property:
    """A device property for field ``name`` of the component's config
    dataclass: its default and its Tango type are the field's, so a device
    states neither again. :meth:`MeshDevice.config_from_properties` builds
    the config from all such properties of a device."""
    field = next((f for f in dataclasses.fields(config) if f.name == name), None)
    dtype = _DTYPES.get(field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")) \
        if field is not None else None
    if dtype is None:
        raise ValueError(f"{config.__name__}.{name}: not a field of a Tango property type (int, float, str, bool, "
                         "tuple of str or int)")
    prop = device_property(dtype=dtype, default_value=default_of(config, name), doc=doc)
    prop.config_field = (config, name)  # type: ignore[attr-defined]
    return prop


def _allowed_unless_fault(name: str, own: Callable[..., bool] | None = None) -> Callable[..., bool]:
    """Tango's is-allowed hook for attribute or command ``name``: refuses in
    FAULT, then asks the device's own ``is_<name>_allowed``, if it has one."""

    def allowed(self: "MeshDevice", *request_type: Any) -> bool:  # attributes pass the request type
        if self.start_failure:
            self.refuse_in_fault(name)
        return True if own is None else own(self, *request_type)

    # PyTango files a command's hook under its function name: one name per hook, or they overwrite each other
    allowed.__name__ = allowed.__qualname__ = f"is_{name}_allowed"
    allowed.fault_rule = True  # type: ignore[attr-defined]
    return allowed


class FaultedComponent(Component):
    """Stands in for a component that failed to start. What the base device
    reads of every component (counters, endpoints, capabilities, status, stop)
    is the plain :class:`Component`'s; anything else raises the FAULT DevFailed,
    never AttributeError, should a code path get past the is-allowed hooks
    (the restore of a memorized attribute, a device's own helper)."""

    def __init__(self, name: str, refusal: Callable[[str], NoReturn], why: str) -> None:
        super().__init__(name)
        self._refusal = refusal
        self.counters.error(f"start failed: {why}")

    def __getattr__(self, name: str) -> NoReturn:  # only called for what Component does not have
        if name.startswith("__"):
            raise AttributeError(name)  # copy, pickle and friends probe dunders: not a device access
        self._refusal(name)


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
    start_failure: str = ""  # why the component did not start; empty unless in FAULT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Install the FAULT rule on every attribute and command the subclass
        declares (not on MeshDevice's own: State, Status, Init and the counters
        keep answering). Runs before PyTango builds the Tango class, which then
        finds ``is_<name>_allowed``; a subclass's own is-allowed method is
        asked after the FAULT check."""
        super().__init_subclass__(**kwargs)
        for key, value in list(vars(cls).items()):
            if vars(MeshDevice).get(key) is value:
                continue
            if isinstance(value, attribute):
                name, custom = value.attr_name or key, getattr(value, "fisallowed", None)
            elif hasattr(value, "__tango_command__"):
                name, info = value.__tango_command__
                custom = info[2].get("Is allowed")
            else:
                continue
            if isinstance(custom, str) and getattr(getattr(cls, custom, None), "fault_rule", False):
                continue  # inherited from a MeshDevice subclass: PyTango filed our hook there already
            if custom:  # it would bypass the hook below
                raise TypeError(f"{cls.__name__}.{name}: define is_{name}_allowed instead of fisallowed, "
                                "so that the FAULT rule applies to it too")
            hook = f"is_{name}_allowed"
            own = getattr(cls, hook, None)
            if own is None or not getattr(own, "fault_rule", False):
                setattr(cls, hook, _allowed_unless_fault(name, own))

    def config_from_properties(self, config: type, **computed: Any) -> Any:
        """``config`` built from this device's :func:`config_property`
        properties for it, plus the fields the device computes itself
        (``computed``: a path resolved, a JSON property decoded)."""
        values: dict[str, Any] = {}
        for klass in reversed(type(self).__mro__):
            for key, prop in vars(klass).items():
                if getattr(prop, "config_field", (None,))[0] is config:
                    value = getattr(self, key)
                    values[prop.config_field[1]] = tuple(value) if isinstance(value, list) else value
        return config(**{**values, **computed})

    def refuse_in_fault(self, what: str = "") -> NoReturn:
        """The DevFailed a device in FAULT answers with, naming the start failure."""
        device_class = type(self).__name__
        tango.Except.throw_exception(
            REASON_FAULT,
            f"{device_class} {self.get_name()} is in FAULT: start failed: {self.start_failure} "
            "(fix the property, then Init)",
            f"{device_class}.{what}" if what else device_class,
        )

    # ------------------------------------------------------------ life cycle
    def init_device(self) -> None:
        self.start_failure = ""
        try:
            super().init_device()  # reads the device properties: a value Tango cannot convert raises here
        except Exception as exc:  # e.g. "many" for an int property: FAULT saying so, not a dead server
            self._fail_start(str(exc) or type(exc).__name__)
            return
        self.set_state(DevState.INIT)
        component: Component | None = None
        try:
            component = self.create_component()
            component.start()
            self.component = component
        except Exception as exc:  # a bad property, a bind failure: show it, stay up for Jive/Astor
            if component is not None:  # built but not started: release what it bound
                try:
                    component.stop()
                except Exception:
                    logging.getLogger("tangomesh.device").exception("stopping %s after its failed start",
                                                                    self.get_name())
            self._fail_start(str(exc) or type(exc).__name__)
            return
        self.registration = RegistrationClient(
            self.create_link(),
            self.registration_info(),
            thread_factory=PyTangoThread,
        )
        self.registration.start()
        self.set_state(DevState.ON)

    def _fail_start(self, why: str) -> None:
        self.start_failure = why
        self.component = FaultedComponent(self.get_name(), self.refuse_in_fault, why)
        self.set_state(DevState.FAULT)
        self.set_status(f"start failed: {why}")

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
        auth = getattr(self.component, "auth", None)  # services.security.Auth of a component on the data plane
        return {
            **(auth.registration_fields() if auth is not None else {}),
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

