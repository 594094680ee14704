"""Tango-free base of a service's logic (the "component manager").

A device class declares properties, attributes and commands and delegates to a
component; the component owns sockets, threads and state, and is unit-tested
without Tango.
"""

from __future__ import annotations

import logging
import threading
from typing import Any


BRIEF_CHARS = 300


def brief(text: str, limit: int = BRIEF_CHARS) -> str:
    """``text`` cut to ``limit`` characters with the length said: an error
    message may quote what it refuses, but never echo a huge argument into a
    reply, the Status or the log."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class Counters:
    """Monotonic counters every service exposes as attributes.

    Each counter is incremented by one owning thread and read by others; plain
    int attributes are enough under the GIL.
    """

    __slots__ = ("events_in", "events_out", "errors", "queue_depth", "last_error", "_log")

    def __init__(self, log: logging.Logger) -> None:
        self.events_in = 0
        self.events_out = 0
        self.errors = 0
        self.queue_depth = 0
        self.last_error = ""
        self._log = log

    def error(self, message: str, log: bool = True) -> None:
        """Count, remember and log one refused input or failed operation
        (``log=False``: the caller rate-limits its own log lines)."""
        self.errors += 1
        self.last_error = brief(message, 4 * BRIEF_CHARS)
        if log:
            self._log.error(self.last_error)

    def refused(self, message: str, log: bool = True) -> None:
        """Count and remember one refused input; log it only if ``log`` (a peer
        that retries in a loop is logged now and then, by the caller's rule)."""
        self.errors += 1
        self.last_error = brief(message, 4 * BRIEF_CHARS)
        if log:
            self._log.error(self.last_error)

    def to_json(self) -> dict[str, Any]:
        return {
            "events_in": self.events_in,
            "events_out": self.events_out,
            "errors": self.errors,
            "queue_depth": self.queue_depth,
        }


class Component:
    """Override ``start``/``stop``; fill ``endpoints`` and ``capabilities`` in
    ``start`` (they go into the service's registration)."""

    kind = "service"

    def __init__(self, name: str, pipeline: str = "", log: logging.Logger | None = None) -> None:
        self.name = name
        self.pipeline = pipeline
        self.log = log or logging.getLogger(f"tangomesh.{self.kind}")
        self.counters = Counters(self.log)
        self.endpoints: dict[str, str] = {}
        self.capabilities: dict[str, Any] = {}
        self._stopping = threading.Event()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self._stopping.set()

    def status(self) -> str:
        """One line for the device's Status, beyond registration."""
        return ""
