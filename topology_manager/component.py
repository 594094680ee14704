"""The topology manager's logic: a lease registry plus the thread that expires leases."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from services import protocol
from services.component import Component
from topology_manager.registry import Registry

log = logging.getLogger("tangomesh.topology")


@dataclass(frozen=True)
class TopologyConfig:
    """The lease terms the manager hands every service (the one place their defaults are stated)."""

    lease_seconds: float = 10.0
    heartbeat_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_seconds < self.lease_seconds:
            raise ValueError(f"HeartbeatSeconds ({self.heartbeat_seconds}) must be positive and below "
                             f"LeaseSeconds ({self.lease_seconds})")


class TopologyComponent(Component):
    kind = protocol.Kind.TOPOLOGY

    def __init__(
        self,
        name: str,
        config: TopologyConfig,
        on_change: Callable[[list[dict[str, Any]]], None] | None = None,
        thread_factory: Callable[..., threading.Thread] = threading.Thread,
    ) -> None:
        super().__init__(name, log=log)
        self.config = config
        self.registry = Registry(config.lease_seconds, config.heartbeat_seconds, on_change=on_change)
        self._thread_factory = thread_factory
        self._expiry: threading.Thread | None = None

    def start(self) -> None:
        self._expiry = self._thread_factory(target=self._expire_loop, name="lease-expiry", daemon=True)
        self._expiry.start()

    def stop(self) -> None:
        super().stop()
        if self._expiry is not None:
            self._expiry.join(5)

    def _expire_loop(self) -> None:
        period = min(1.0, self.registry.lease_seconds / 4)
        while not self._stopping.wait(period):
            for name in self.registry.expire():
                log.warning("lease of %s expired: removed from the mesh", name)

    def status(self) -> str:
        return f"{len(self.registry)} services registered."
