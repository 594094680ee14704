"""Restarts done by a host's Starter, from its statistics (``DevReadLog("Statistics")``).

Debian's Starter (9.3.4) keeps no restart counter, but it appends a line to
``<LogFileHome>/ds.log/Starter.stat`` whenever a controlled server changes
between running and failed (newest first, at most 2000 lines, emptied by
``ResetStatistics``)::

    <Server/instance>\\t<ON|FAULT>\\t<started, epoch s>\\t<failed, epoch s or -1>\\t<auto restart: true|false>

A line ``ON ... true`` is a start by ``AutoRestartDuration``; a ``FAULT`` line is
a failure (a ``DevStop`` writes none). ``tangomesh status`` shows these for the
servers no supervisor of its own runs.
"""

from __future__ import annotations

from typing import Any, Iterable

import tango


def parse_statistics(lines: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per server: ``restarts`` (automatic ones) and ``last_exit`` (the newest failure, or None)."""
    found: dict[str, dict[str, Any]] = {}
    for line in lines:
        fields = line.replace("\0", "").strip().split("\t")
        if len(fields) != 5:
            continue
        name, state, started, failed, auto = fields
        try:
            started_s, failed_s = int(started), int(failed)
        except ValueError:
            continue
        record = found.setdefault(name, {"restarts": 0, "last_exit": None})
        if state == "ON" and auto == "true":
            record["restarts"] += 1
        elif state == "FAULT" and record["last_exit"] is None:  # newest first
            record["last_exit"] = {"code": None, "signal": None, "at": failed_s, "ran_s": failed_s - started_s,
                                   "how": "failed (seen by Starter: exit status unknown)"}
    return found


def read_statistics(host: str, timeout_ms: int = 1500) -> dict[str, dict[str, Any]]:
    """The statistics of ``tango/admin/<short host>``; empty when no Starter answers there."""
    try:
        proxy = tango.DeviceProxy(f"tango/admin/{host.split('.')[0]}")
        proxy.set_timeout_millis(timeout_ms)
        text = proxy.command_inout("DevReadLog", "Statistics")
    except tango.DevFailed:
        return {}
    return parse_statistics(str(text).splitlines())
