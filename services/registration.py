"""The one registration client: how a service joins, stays in and leaves the mesh.

The client talks to the topology manager through a small *link* interface, so
the same lease logic runs against the real TopologyManager device
(:class:`TangoManagerLink`) and, in unit tests, against an in-process registry.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Protocol

from services import protocol

log = logging.getLogger(__name__)

DEFAULT_TOPOLOGY_DEVICE = "tangomesh/topology/manager"
REFUSED_RETRY_SECONDS = 10.0

#: DevFailed reasons used by mesh devices, so that clients can branch on them.
REASON_UNKNOWN_SERVICE = "TANGOMESH_UnknownService"
REASON_INVALID_INPUT = "TANGOMESH_InvalidInput"
#: A device whose component failed to start refuses its own attributes and commands with this.
REASON_FAULT = "TANGOMESH_Fault"


class UnknownService(KeyError):
    """Heartbeat or deregistration for a name the manager does not hold."""

    def __str__(self) -> str:
        return (
            f"service {self.args[0]!r} is not registered "
            "(lease expired or manager restarted): register again"
        )


class ManagerUnavailable(ConnectionError):
    """The topology manager did not answer."""


class ManagerLink(Protocol):
    def register(self, info: dict[str, Any]) -> dict[str, Any]: ...
    def heartbeat(self, name: str) -> dict[str, Any]: ...
    def deregister(self, name: str) -> None: ...
    def lookup(self, query: dict[str, Any]) -> list[dict[str, Any]]: ...


class TangoManagerLink:
    """ManagerLink over the TopologyManager device's commands."""

    def __init__(self, device: str = DEFAULT_TOPOLOGY_DEVICE, timeout_ms: int = 3000) -> None:
        self.device = device
        self.timeout_ms = timeout_ms
        self._proxy = None

    def _call(self, command: str, argument: str) -> str:
        import tango

        try:
            if self._proxy is None:
                self._proxy = tango.DeviceProxy(self.device)
                self._proxy.set_timeout_millis(self.timeout_ms)
            return self._proxy.command_inout(command, argument)
        except tango.DevFailed as exc:
            reason = exc.args[0].reason if exc.args else ""
            if reason == REASON_UNKNOWN_SERVICE:
                raise UnknownService(argument) from None
            if reason == REASON_INVALID_INPUT:
                raise ValueError(exc.args[0].desc) from None
            raise ManagerUnavailable(f"{self.device}: {exc.args[0].desc if exc.args else exc}") from None

    def register(self, info: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self._call("Register", json.dumps(info)))

    def heartbeat(self, name: str) -> dict[str, Any]:
        return json.loads(self._call("Heartbeat", name))

    def deregister(self, name: str) -> None:
        self._call("Deregister", name)

    def lookup(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        return json.loads(self._call("Lookup", json.dumps(query)))


def master_proxy(link: ManagerLink, pipeline: str, timeout_ms: int = 15000) -> Any:
    """A DeviceProxy to the one registered master of ``pipeline``: where the
    control system sends StartScan / EndScan / AbortScan."""
    import tango

    names = [s["name"] for s in link.lookup({"kind": protocol.Kind.MASTER, "pipeline": pipeline})]
    if len(names) != 1:
        raise RuntimeError(f"pipeline {pipeline} has {len(names)} registered masters, expected 1 "
                           "(is it declared in the mesh file and running?)")
    proxy = tango.DeviceProxy(names[0])
    proxy.set_timeout_millis(timeout_ms)
    return proxy


class RegistrationClient:
    """Registers ``info``, renews the lease, re-registers when the manager has
    forgotten the service, and deregisters on stop.

    All calls happen on one background thread (``thread_factory`` lets a Tango
    device use ``PyTangoThread``), so a manager that is down or slow never
    blocks the service; ``registered`` and ``last_problem`` tell how it goes.
    """

    def __init__(
        self,
        link: ManagerLink,
        info: dict[str, Any],
        retry_seconds: float = 0.5,
        thread_factory: Callable[..., threading.Thread] = threading.Thread,
    ) -> None:
        self.link = link
        self.info = info
        self.retry_seconds = retry_seconds
        self.heartbeat_seconds = retry_seconds
        self.registered = False
        self.refused = False  # the manager rejected our registration: a configuration error
        self.registrations = 0
        self.last_problem = ""
        self._stop = threading.Event()
        self._thread = thread_factory(target=self._run, name=f"registration-{info['name']}", daemon=True)

    @property
    def name(self) -> str:
        return self.info["name"]

    def start(self) -> None:
        self._thread.start()

    def stop(self, deregister: bool = True, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if deregister and self.registered:
            try:
                self.link.deregister(self.name)
            except (UnknownService, ManagerUnavailable) as exc:
                log.info("deregistering %s: %s", self.name, exc)
            self.registered = False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the lease thread must outlive any surprise
                self.registered = False
                self.last_problem = f"unexpected: {exc!r}"
                log.exception("registration step failed")
            if self.registered:
                pause = self.heartbeat_seconds
            elif self.refused:
                pause = REFUSED_RETRY_SECONDS  # needs a configuration fix: retry slowly
            else:
                pause = self.retry_seconds
            self._stop.wait(pause)

    def tick(self) -> None:
        """One step of the lease protocol (public so tests can drive it)."""
        try:
            if self.registered:
                try:
                    self._accept(self.link.heartbeat(self.name))
                    return
                except UnknownService:
                    log.warning("%s: manager does not know us any more, registering again", self.name)
                    self.registered = False
            self._accept(self.link.register(self.info))
            self.registered = True
            self.refused = False
            self.registrations += 1
            self.last_problem = ""
            log.info("%s registered (%d)", self.name, self.registrations)
        except ManagerUnavailable as exc:
            # Unknown whether the lease survives: say "not registered" until the
            # manager answers again (re-registering with the same facts is a no-op).
            self.registered = False
            self.last_problem = str(exc)
            log.debug("topology manager unavailable: %s", exc)
        except ValueError as exc:  # refused registration: a configuration error
            if not self.refused:  # say it once, not at every retry
                log.error("registration refused: %s", exc)
            self.refused = True
            self.last_problem = f"registration refused: {exc}"

    def _accept(self, terms: dict[str, Any]) -> None:
        self.heartbeat_seconds = float(terms.get("heartbeat_s", self.heartbeat_seconds))


def wait_registered(*clients: RegistrationClient, timeout: float = 10.0) -> None:
    """Block until every client holds a lease; TimeoutError naming why not."""
    deadline = time.monotonic() + timeout
    while not all(c.registered for c in clients):
        if time.monotonic() > deadline:
            problems = "; ".join(c.last_problem for c in clients if not c.registered)
            raise TimeoutError(f"not registered with the topology manager within {timeout:g} s: {problems}")
        time.sleep(0.02)
