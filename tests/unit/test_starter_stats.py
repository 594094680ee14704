"""Reading a Starter's statistics: automatic restarts and the last failure per server."""

from __future__ import annotations

from services.ops.starter_stats import parse_statistics

# newest first, as Starter writes Starter.stat (DevReadLog("Statistics") ends with a NUL)
STATISTICS = """Recorder/starter\tFAULT\t1796310100\t1796310103\tfalse
Recorder/starter\tON\t1796310100\t1796310090\ttrue
Recorder/starter\tFAULT\t1796310000\t1796310090\tfalse
TopologyManager/starter\tON\t1796310001\t-1\tfalse
Recorder/starter\tON\t1796310000\t-1\tfalse
not a statistics line
\0"""


def test_automatic_restarts_and_the_newest_failure_per_server() -> None:
    stats = parse_statistics(STATISTICS.splitlines())
    assert stats["TopologyManager/starter"] == {"restarts": 0, "last_exit": None}
    recorder = stats["Recorder/starter"]
    assert recorder["restarts"] == 1  # the ON line with auto restart true
    assert recorder["last_exit"] == {"code": None, "signal": None, "at": 1796310103, "ran_s": 3,
                                     "how": "failed (seen by Starter: exit status unknown)"}
    assert parse_statistics([]) == {}
