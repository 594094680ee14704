"""A real Sardana for the tests: Pool and MacroServer (with a Door) as
server processes on the session's embedded database, ``sar_demo`` elements,
the tangomesh recorder and macros on the MacroServer's paths, and a Door
client that runs macros the way spock does (``RunMacro``) and waits for them."""

from __future__ import annotations

import json
import threading
from xml.etree import ElementTree
from pathlib import Path
from typing import Any

from services.ops.sardana import MACRO_PATH, RECORDER_PATH
from support.servers import ServerPool
from support.waiting import wait_for

POOL = "test/sardana/pool"
MACROSERVER = "test/sardana/ms"
DOOR = "test/sardana/door"


def start_sardana(pool: ServerPool, env_dir: Path) -> "Door":
    """Pool, then the MacroServer (recorder and macro paths set), then ``sar_demo``."""
    pool.start("Pool/tangomesh", {"Pool": {POOL: {}}})
    pool.start("MacroServer/tangomesh", {
        "MacroServer": {MACROSERVER: {"PoolNames": POOL, "MacroPath": MACRO_PATH, "RecorderPath": RECORDER_PATH,
                                      "EnvironmentDb": str(env_dir / "macroserver.env")}},
        "Door": {DOOR: {}}})
    door = Door(DOOR)
    import tango

    # the MacroServer connects to the Pool a little after it is up: sar_demo refuses until then, creating nothing
    wait_for(lambda: door.run("sar_demo", timeout=120) == tango.DevState.ON and not door.lines("Error"), 60,
             "sar_demo to create the demo elements")
    # the MacroServer learns of the new elements by events, a little after sar_demo returns
    for macro, element in (("lsm", "mot04"), ("lsct", "ct04"), ("lsmeas", "mntgrp01")):
        wait_for(lambda: door.run(macro) == tango.DevState.ON and element in "\n".join(door.lines("Output")), 30,
                 f"the MacroServer to know {element}")
    return door


class Door:
    """A Door client: run a macro and wait for its end; read what it printed and raised.

    RunMacro only queues the macro (it returns its XML with the macro's id);
    its end is the ``finish``/``stop``/``abort``/``exception`` state in the
    Door's MacroStatus change events, collected from the start: polling the
    Door's State could read it before the macro began."""

    ENDED = {"finish", "stop", "abort", "exception"}

    def __init__(self, name: str) -> None:
        import tango

        self.proxy = tango.DeviceProxy(name)
        self.proxy.set_timeout_millis(10000)
        self.macro_states: dict[str, str] = {}
        self._lock = threading.Lock()
        self._last = ""
        self.proxy.subscribe_event("MacroStatus", tango.EventType.CHANGE_EVENT, self._on_status)

    def _on_status(self, event: Any) -> None:
        if event.err or event.attr_value is None:
            return
        _, data = event.attr_value.value
        try:
            statuses = json.loads(data)
        except (TypeError, ValueError):
            return
        with self._lock:
            for status in statuses if isinstance(statuses, list) else [statuses]:
                if isinstance(status, dict) and "id" in status:
                    self.macro_states[str(status["id"])] = str(status.get("state"))

    def state(self) -> Any:
        return self.proxy.state()

    def start(self, *argv: str) -> str:
        """Start a macro; its id (:meth:`wait` waits for its end)."""
        import tango

        wait_for(lambda: self.state() != tango.DevState.RUNNING, 30, "the Door to be free")
        (xml,) = self.proxy.RunMacro([str(a) for a in argv])
        self._last = ElementTree.fromstring(xml).find(".//macro").get("id")
        return self._last

    def wait(self, timeout: float = 120) -> Any:
        """The Door's state once the last macro has ended (ON; ALARM after an error)."""
        import tango

        wait_for(lambda: self.macro_states.get(self._last) in self.ENDED, timeout, f"macro {self._last} to end")
        wait_for(lambda: self.state() != tango.DevState.RUNNING, 10, "the Door to leave RUNNING")
        return self.state()

    def ended_as(self) -> str:
        """How the last macro ended: finish, stop, abort or exception."""
        return self.macro_states.get(self._last, "")

    def run(self, *argv: str, timeout: float = 120) -> Any:
        self.start(*argv)
        return self.wait(timeout)

    def senv(self, name: str, value: Any) -> None:
        """``senv name value``: ``value`` as its Python literal (Sardana evaluates it)."""
        self.run("senv", name, repr(value))

    def lines(self, attribute: str) -> list[str]:
        """What the last macro wrote to ``Output``, ``Info``, ``Warning`` or ``Error``."""
        value = self.proxy.read_attribute(attribute).value
        return list(value or [])
