"""Restart policy of the embedded mesh: which server to restart, when, and when to give up.

Plain logic, no processes: the supervising process (``services/ops/supervise.py``)
gives it a ``spawn`` function (start a server, return its pid), an ``exited``
function (``None`` while the server's pid runs, else how it ended) and a clock, and calls
``tick`` a few times a second. Tests give it fakes of all three.

Policy (the same shape as Starter's: restart what failed by itself, never what
was stopped, and stop trying on a crash loop):

- a server that exits without having been ``forget``-ed (``tangomesh down`` and
  ``tangomesh scale`` forget a server before they stop it) is restarted;
- after ``first_delay`` (1 s), doubling for every further *quick* failure (a run
  shorter than ``quick_run_s``) up to ``max_delay`` (30 s); a run that lasted
  longer resets the back-off;
- the ``give_up_after``-th (5th) quick failure in a row is not restarted: the
  server is left stopped, with one log line saying so; ``tangomesh up`` starts
  it again (and resets the count).

A supervisor that is itself killed and started again (``tangomesh up`` does)
carries on: :meth:`Supervisor.restore` takes each server's record from the
state file the previous one left, so restart counts, the last exit and the
crash-loop count go on from there, and a server still running is adopted,
never started twice.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("tangomesh.supervisor")


@dataclass(frozen=True)
class Policy:
    first_delay: float = 1.0
    max_delay: float = 30.0
    quick_run_s: float = 10.0
    give_up_after: int = 5

    def delay(self, quick_failures: int) -> float:
        """Wait before the next start after ``quick_failures`` quick failures in a row (0: the run was long)."""
        return min(self.first_delay * 2 ** max(quick_failures - 1, 0), self.max_delay)


@dataclass(frozen=True)
class Exit:
    """How a process ended; both ``None`` when it was not our child (its status is lost)."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> "Exit":
        import os

        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.WEXITSTATUS(status))

    def describe(self) -> str:
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        if self.code is not None:
            return f"exit status {self.code}"
        return "gone (exit status unknown: not started by the supervisor)"


@dataclass
class Record:
    """One supervised server."""

    name: str
    pid: int | None
    started: float  # clock time of the last start (or adoption)
    restarts: int = 0
    quick_failures: int = 0
    last_exit: dict[str, Any] | None = None
    last_restart: float | None = None  # wall time
    restart_at: float | None = None  # clock time of the pending restart
    gave_up: bool = False

    def to_json(self) -> dict[str, Any]:
        state = "gave up" if self.gave_up else "restarting" if self.restart_at is not None else "running"
        return {"pid": self.pid, "state": state, "restarts": self.restarts, "last_exit": self.last_exit,
                "last_restart": self.last_restart, "quick_failures": self.quick_failures}


class Supervisor:
    """Watches named servers and restarts the ones that exit unexpectedly."""

    def __init__(self, spawn: Callable[[str], int], exited: Callable[[str, int], Exit | None],
                 clock: Callable[[], float], wall: Callable[[], float], policy: Policy = Policy()) -> None:
        self.spawn = spawn
        self.exited = exited
        self.clock = clock
        self.wall = wall
        self.policy = policy
        self.records: dict[str, Record] = {}

    def watch(self, name: str, pid: int) -> None:
        """Supervise a server started elsewhere (adopted from its pid file)."""
        record = self.records.get(name)
        if record is None:
            self.records[name] = Record(name, pid, self.clock())
        elif record.pid != pid:
            record.pid, record.started, record.restart_at, record.gave_up = pid, self.clock(), None, False

    def restore(self, name: str, pid: int | None, saved: dict[str, Any], running: bool) -> None:
        """Take over a server from a previous supervisor's state record
        (``saved``, from :meth:`state`): its counts carry on. ``pid`` is the
        server's pid file's (what should run), ``running`` whether that
        process is the server. A running server is adopted as it is; one
        given up on stays given up; one that was waiting for its restart is
        restarted now; one that died while nobody watched is found gone by
        the next :meth:`tick` and restarted by the policy."""
        record = Record(name, pid, self.clock())
        try:
            record.restarts = max(0, int(saved.get("restarts") or 0))
            record.quick_failures = max(0, int(saved.get("quick_failures") or 0))
            last_exit = saved.get("last_exit")
            record.last_exit = dict(last_exit) if isinstance(last_exit, dict) else None
            last_restart = saved.get("last_restart")
            record.last_restart = float(last_restart) if last_restart is not None else None
        except (TypeError, ValueError) as exc:  # a damaged record: keep what could be read
            log.warning("%s: previous supervisor's record %r not fully readable (%s)", name, saved, exc)
        if not running:
            if saved.get("state") == "gave up":
                record.pid, record.gave_up = None, True
            elif saved.get("state") == "restarting" or pid is None:
                record.pid, record.restart_at = None, self.clock()
        self.records[name] = record

    def start(self, name: str) -> int:
        """Start a server now (``tangomesh up``/``scale``); a server given up on starts afresh."""
        pid = self.spawn(name)
        record = self.records.setdefault(name, Record(name, pid, self.clock()))
        record.pid, record.started, record.restart_at = pid, self.clock(), None
        if record.gave_up:
            record.gave_up, record.quick_failures = False, 0
        return pid

    def forget(self, name: str) -> None:
        """The server is being stopped on purpose: never restart it."""
        self.records.pop(name, None)

    def tick(self) -> bool:
        """Reap exits, start the restarts that are due; True when something changed."""
        changed = False
        now = self.clock()
        for record in list(self.records.values()):
            if record.gave_up:
                continue
            if record.restart_at is None and record.pid is not None:
                how = self.exited(record.name, record.pid)
                if how is None:
                    continue
                changed = True
                self._failed(record, how, now)
            if record.restart_at is not None and now >= record.restart_at:
                changed = True
                self._restart(record, now)
        return changed

    def _failed(self, record: Record, how: Exit, now: float) -> None:
        ran = now - record.started
        record.quick_failures = record.quick_failures + 1 if ran < self.policy.quick_run_s else 0
        record.last_exit = {"code": how.code, "signal": how.signal, "at": self.wall(), "ran_s": round(ran, 3),
                            "how": how.describe()}
        record.pid = None
        if record.quick_failures >= self.policy.give_up_after:
            record.gave_up = True
            log.error("%s %s after running %.1f s; giving up after %d quick failures in a row "
                      "(each ran < %.0f s); see its log, then run `tangomesh up` to start it again",
                      record.name, how.describe(), ran, record.quick_failures, self.policy.quick_run_s)
            return
        delay = self.policy.delay(record.quick_failures)
        record.restart_at = now + delay
        log.warning("%s %s after running %.1f s; restarting in %.0f s", record.name, how.describe(), ran, delay)

    def _restart(self, record: Record, now: float) -> None:
        record.restart_at = None
        try:
            record.pid = self.spawn(record.name)
        except Exception as exc:  # a missing executable, a full disk: counts as a quick failure
            log.error("%s: restart failed: %s", record.name, exc)
            record.started = now
            self._failed(record, Exit(), now)
            return
        record.started = now
        record.restarts += 1
        record.last_restart = self.wall()
        log.warning("%s restarted (pid %d, restart %d)", record.name, record.pid, record.restarts)

    def state(self) -> dict[str, dict[str, Any]]:
        return {name: r.to_json() for name, r in sorted(self.records.items())}

