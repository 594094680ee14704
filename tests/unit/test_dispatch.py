"""Credit-based fan-out (pipelines/dispatch.py): credit bookkeeping, the choice
of worker, acknowledgement, re-dispatch of a vanished worker's units, load
balancing between a fast and a slow worker, group affinity and copies."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.dispatch import Affinity, Dispatcher
from services import codec

TIMEOUT = 2.0
NONE = Affinity()


def unit(index: int, count: int = 10, scan: str = "s1", width: int = 3) -> codec.Message:
    return codec.Message(codec.DATA, scan=scan, index=index, count=count,
                         arrays={"scaler/i0": np.zeros((count, width))})


def dispatch(d: Dispatcher, msg: codec.Message, affinity: Affinity = NONE, now: float = 0.0) -> list[bytes] | None:
    """choose() then, if someone was chosen, sent(): what the master's loop does."""
    chosen = d.choose(msg, affinity)
    if chosen is not None:
        d.sent(msg, chosen, affinity, now)
    return chosen


# --------------------------------------------------------------------------- credit


def test_seen_registers_once_and_accumulates_credit() -> None:
    d = Dispatcher(TIMEOUT)
    assert d.seen(b"w1", "worker/1", "", 2, now=0.0) is True
    assert d.seen(b"w1", "worker/1", "", 3, now=1.0) is False
    assert d.seen(b"w1", "worker/1", "", 0, now=1.5) is False
    w = d.workers[b"w1"]
    assert (w.name, w.role, w.credit, w.last_seen) == ("worker/1", "", 5, 1.5)
    assert d.seen(b"w2", "worker/2", "debug", 0, now=2.0) is True
    assert d.workers[b"w2"].role == "debug" and len(d.workers) == 2


def test_a_worker_heard_again_after_expiry_starts_from_the_credit_it_holds_open() -> None:
    d = Dispatcher(TIMEOUT)
    d.seen(b"w1", "worker/1", "", 2, now=0.0, open_units=2)
    assert [w.name for w in d.expire(now=TIMEOUT + 1)] == ["worker/1"]
    # its next heartbeat asks for nothing new, but it still waits for its 2 units
    assert d.seen(b"w1", "worker/1", "", 0, now=TIMEOUT + 2, open_units=2) is True
    assert d.workers[b"w1"].credit == 2
    # a known worker's open count lags what is already on its way: only increments count
    d.seen(b"w1", "worker/1", "", 1, now=TIMEOUT + 3, open_units=2)
    assert d.workers[b"w1"].credit == 3


def test_choose_prefers_the_worker_with_most_credit() -> None:
    d = Dispatcher(TIMEOUT)
    d.seen(b"a", "a", "", 1, 0.0)
    d.seen(b"b", "b", "", 3, 0.0)
    d.seen(b"c", "c", "", 2, 0.0)
    assert d.choose(unit(0), NONE) == [b"b"]
    d.seen(b"c", "c", "", 5, 0.0)
    assert d.choose(unit(0), NONE) == [b"c"]


def test_equal_credit_is_shared_in_turn() -> None:
    d = Dispatcher(TIMEOUT)
    for w in (b"a", b"b"):
        d.seen(w, w.decode(), "", 1, 0.0)
    first = d.choose(unit(0), NONE)
    second = d.choose(unit(0), NONE)
    assert {first[0], second[0]} == {b"a", b"b"}


def test_choose_waits_without_credit() -> None:
    d = Dispatcher(TIMEOUT)
    assert d.choose(unit(0), NONE) is None
    d.seen(b"a", "a", "", 0, 0.0)
    assert d.choose(unit(0), NONE) is None
    d.seen(b"a", "a", "", 1, 0.0)
    assert dispatch(d, unit(0)) == [b"a"]
    assert d.choose(unit(10), NONE) is None


def test_sent_spends_credit_and_records_the_unit() -> None:
    d = Dispatcher(TIMEOUT)
    d.seen(b"a", "a", "", 3, 0.0)
    units = [unit(0, 10), unit(10, 5, width=7)]
    for i, u in enumerate(units):
        d.sent(u, [b"a"], NONE, now=float(i))
    w = d.workers[b"a"]
    assert w.credit == 1 and w.units == 2 and w.points == 15
    assert w.in_flight == {("s1", 0), ("s1", 10)}
    assert set(d.in_flight) == {("s1", 0), ("s1", 10)}
    assert d.in_flight[("s1", 10)].sent_at == 1.0 and d.in_flight[("s1", 10)].attempts == 1
    assert d.in_flight_bytes == sum(u.nbytes for u in units) == (10 * 3 + 5 * 7) * 8
    assert d.outstanding("s1") == 2 and d.outstanding("s2") == 0


# --------------------------------------------------------------------------- acknowledgement


def test_ack_frees_units_whose_first_index_is_acknowledged() -> None:
    d = Dispatcher(TIMEOUT)
    d.seen(b"a", "a", "", 10, 0.0)
    units = [unit(i) for i in range(0, 50, 10)]
    for u in units:
        d.sent(u, [b"a"], NONE, 0.0)
    d.sent(unit(0, scan="s2"), [b"a"], NONE, 0.0)
    total = d.in_flight_bytes
    assert d.ack("s1", [(0, 10), (25, 35)]) == 2  # units 0 and 30; 20 starts before 25
    assert set(d.in_flight) == {("s1", 10), ("s1", 20), ("s1", 40), ("s2", 0)}
    assert d.workers[b"a"].in_flight == set(d.in_flight)
    assert d.in_flight_bytes == total - units[0].nbytes - units[3].nbytes
    assert d.ack("s1", [(0, 10), (25, 35)]) == 0
    assert d.ack("s1", [(5, 10), (11, 20), (41, 50)]) == 0
    assert d.ack("s1", [(0, 50)]) == 3
    assert set(d.in_flight) == {("s2", 0)}
    assert d.in_flight_bytes == units[0].nbytes


# --------------------------------------------------------------------------- vanished workers


def test_expire_requeues_a_silent_workers_units_oldest_first() -> None:
    d = Dispatcher(TIMEOUT)
    d.seen(b"slow", "slow", "", 4, 0.0)
    d.seen(b"ok", "ok", "", 1, 0.0)
    for i in (30, 0, 20, 10):
        d.sent(unit(i), [b"slow"], NONE, now=0.0)
    d.sent(unit(40), [b"ok"], NONE, now=0.0)
    d.ack("s1", [(20, 30)])
    d.seen(b"ok", "ok", "", 0, now=TIMEOUT + 0.5)
    assert d.expire(now=TIMEOUT) == []
    gone = d.expire(now=TIMEOUT + 0.01)
    assert [w.identity for w in gone] == [b"slow"]
    assert set(d.workers) == {b"ok"}
    assert d.redispatched == 3
    assert list(d.retry) == [("s1", 0), ("s1", 10), ("s1", 30)]
    d.seen(b"ok", "ok", "", 3, now=TIMEOUT + 0.5)
    delivered = []
    while (entry := d.next_retry()) is not None:
        assert entry.worker is None
        dispatch(d, entry.unit, now=3.0)
        delivered.append(entry.unit.index)
        d.pop_retry()
    assert delivered == [0, 10, 30]
    assert all(d.in_flight[("s1", i)].worker == b"ok" and d.in_flight[("s1", i)].attempts == 2 for i in delivered)
    assert d.workers[b"ok"].in_flight == {("s1", i) for i in (0, 10, 30, 40)}


def test_remove_requeues_at_once_and_skips_acknowledged_units() -> None:
    d = Dispatcher(TIMEOUT)
    d.seen(b"a", "a", "", 3, 0.0)
    for i in (0, 10, 20):
        d.sent(unit(i), [b"a"], NONE, 0.0)
    bytes_before = d.in_flight_bytes
    assert d.remove(b"a").identity == b"a"
    assert d.remove(b"a") is None
    assert d.redispatched == 3 and d.workers == {}
    assert d.in_flight_bytes == bytes_before
    d.ack("s1", [(0, 10)])
    assert d.next_retry().unit.index == 10
    d.pop_retry()
    assert d.next_retry().unit.index == 20
    d.pop_retry()
    assert d.next_retry() is None


# --------------------------------------------------------------------------- load balancing


def test_a_slow_worker_gets_proportionally_fewer_units() -> None:
    """Two workers with a credit window of PREFETCH units; each finishes one
    unit per period (1 tick and 5 ticks) and only then grants one credit back.
    An endless supply of units is dispatched whenever someone has credit.

    A worker receives exactly what it asked for: its PREFETCH initial credit
    plus one per finished unit, i.e. PREFETCH + TICKS // period (it always
    holds PREFETCH units because its credit is spent at once). The ratio is therefore
    (TICKS + P) / (TICKS / 5 + P), within 5 * P / (TICKS / 5) of 5: 0.05 here,
    and the assertion allows twice that."""
    TICKS, PREFETCH = 1000, 2
    periods = {b"fast": 1, b"slow": 5}
    d = Dispatcher(TIMEOUT)
    for w in periods:
        d.seen(w, w.decode(), "", PREFETCH, now=0.0)
    hand: dict[bytes, list[codec.Message]] = {w: [] for w in periods}
    received = dict.fromkeys(periods, 0)
    next_index = 0

    def fill(now: float) -> None:
        nonlocal next_index
        while (chosen := d.choose(u := unit(next_index, 1), NONE)) is not None:
            d.sent(u, chosen, NONE, now)
            hand[chosen[0]].append(u)
            received[chosen[0]] += 1
            next_index += 1

    fill(0.0)
    for tick in range(1, TICKS + 1):
        now = tick * 0.01
        for w, period in periods.items():
            if tick % period == 0:
                done = hand[w].pop(0)
                assert d.ack("s1", [(done.index, done.stop)]) == 1
                d.seen(w, w.decode(), "", 1, now)
            else:
                d.seen(w, w.decode(), "", 0, now)
        fill(now)
        assert all(len(h) == PREFETCH for h in hand.values())
        assert len(d.in_flight) == sum(len(h) for h in hand.values())
    assert received == {b"fast": TICKS + PREFETCH, b"slow": TICKS // 5 + PREFETCH}
    ratio = received[b"fast"] / received[b"slow"]
    assert abs(ratio - 5) <= 2 * 5 * PREFETCH / (TICKS / 5)


# --------------------------------------------------------------------------- affinity


@pytest.mark.parametrize("obj, expected", [
    (None, Affinity()),
    ("", Affinity()),
    ({}, Affinity()),
    ({"group": 100}, Affinity(100, "")),
    ({"copy_to": "debug"}, Affinity(0, "debug")),
    ({"group": 0, "copy_to": ""}, Affinity()),
    ({"group": 7, "copy_to": "viewer"}, Affinity(7, "viewer")),
])
def test_affinity_from_json(obj: object, expected: Affinity) -> None:
    assert Affinity.from_json(obj) == expected


@pytest.mark.parametrize("obj", [
    [], "group", 5, {"grup": 1}, {"group": 1, "extra": 1}, {"group": -1}, {"group": 1.0}, {"group": "10"},
    {"group": True}, {"group": None}, {"copy_to": 3}, {"copy_to": None}, {"copy_to": ["debug"]},
])
def test_affinity_from_json_refuses_malformed(obj: object) -> None:
    with pytest.raises(ValueError, match="affinity"):
        Affinity.from_json(obj)


def test_group_affinity_keeps_a_group_on_one_worker() -> None:
    group = Affinity(group=100)
    d = Dispatcher(TIMEOUT)
    for w in (b"a", b"b", b"c"):
        d.seen(w, w.decode(), "", 50, 0.0)
    owner_of: dict[int, bytes] = {}
    for i in range(0, 600, 10):
        (chosen,) = dispatch(d, unit(i), group)
        owner_of.setdefault(i // 100, chosen)
        assert chosen == owner_of[i // 100]
    assert len(owner_of) == 6 and set(owner_of.values()) == {b"a", b"b", b"c"}
    for w in (b"a", b"b", b"c"):
        expected = {("s1", i) for i in range(0, 600, 10) if owner_of[i // 100] == w}
        assert d.workers[w].in_flight == expected


def test_group_affinity_waits_for_the_owner_s_credit() -> None:
    group = Affinity(group=100)
    d = Dispatcher(TIMEOUT)
    d.seen(b"a", "a", "", 1, 0.0)
    assert dispatch(d, unit(0), group) == [b"a"]
    d.seen(b"b", "b", "", 10, 0.0)
    assert d.choose(unit(10), group) is None
    assert d.choose(unit(10, scan="s2"), group) == [b"b"]
    assert dispatch(d, unit(100), group) == [b"b"]
    d.seen(b"a", "a", "", 1, 0.0)
    assert dispatch(d, unit(10), group) == [b"a"]
    assert dispatch(d, unit(110), group) == [b"b"]


def test_a_group_moves_when_its_owner_is_removed() -> None:
    group = Affinity(group=100)
    d = Dispatcher(TIMEOUT)
    d.seen(b"a", "a", "", 1, 0.0)
    d.seen(b"b", "b", "", 0, 0.0)
    assert dispatch(d, unit(0), group) == [b"a"]
    d.seen(b"b", "b", "", 5, 0.0)
    assert d.choose(unit(10), group) is None
    d.remove(b"a")
    assert d.group_owner == {}
    retry = d.next_retry()
    assert dispatch(d, retry.unit, group) == [b"b"]
    d.pop_retry()
    assert dispatch(d, unit(10), group) == [b"b"]
    assert d.workers[b"b"].in_flight == {("s1", 0), ("s1", 10)}


def test_end_scan_forgets_group_owners() -> None:
    group = Affinity(group=100)
    d = Dispatcher(TIMEOUT)
    d.seen(b"a", "a", "", 1, 0.0)
    d.seen(b"b", "b", "", 2, 0.0)
    dispatch(d, unit(0), group)
    owner = d.group_owner[("s1", 0)]
    other = b"b" if owner == b"a" else b"a"
    d.workers[owner].credit = 0
    assert d.choose(unit(10), group) is None
    d.end_scan("s1")
    assert d.choose(unit(10), group) == [other]


def test_copies_go_to_every_copy_worker_and_wait_for_them() -> None:
    copy = Affinity(copy_to="debug")
    d = Dispatcher(TIMEOUT)
    d.seen(b"w", "w", "", 2, 0.0)
    d.seen(b"d1", "d1", "debug", 5, 0.0)
    d.seen(b"d2", "d2", "debug", 1, 0.0)
    u = unit(0)
    chosen = dispatch(d, u, copy)
    assert chosen[0] == b"w" and sorted(chosen[1:]) == [b"d1", b"d2"]
    assert {w: d.workers[w].credit for w in d.workers} == {b"w": 1, b"d1": 4, b"d2": 0}
    assert d.workers[b"w"].in_flight == {("s1", 0)}
    assert d.workers[b"d1"].in_flight == d.workers[b"d2"].in_flight == set()
    assert d.workers[b"d1"].points == u.count
    assert d.in_flight_bytes == u.nbytes
    assert d.choose(unit(10), copy) is None
    d.seen(b"d2", "d2", "debug", 1, 0.0)
    chosen = d.choose(unit(10), copy)
    assert chosen[0] == b"w" and sorted(chosen[1:]) == [b"d1", b"d2"]
    assert d.choose(unit(10), NONE)[0] == b"d1"


def test_copy_workers_never_process_for_real() -> None:
    copy = Affinity(copy_to="debug")
    d = Dispatcher(TIMEOUT)
    d.seen(b"d1", "d1", "debug", 5, 0.0)
    assert d.choose(unit(0), copy) is None
    d.seen(b"w", "w", "", 1, 0.0)
    assert d.choose(unit(0), copy) == [b"w", b"d1"]
    assert [w.identity for w in d.processing_workers("debug")] == [b"w"]


def test_drop_scan_forgets_its_units() -> None:
    group = Affinity(group=10)
    d = Dispatcher(TIMEOUT)
    d.seen(b"a", "a", "", 10, 0.0)
    for i in (0, 10):
        dispatch(d, unit(i), group)
    keep = unit(0, scan="s2")
    dispatch(d, keep, group)
    d.remove(b"a")
    d.seen(b"b", "b", "", 10, 0.0)
    dispatch(d, unit(20), group)
    assert d.drop_scan("s1") == 3
    assert set(d.in_flight) == {("s2", 0)}
    assert d.in_flight_bytes == keep.nbytes
    assert d.workers[b"b"].in_flight == set()
    assert all(scan != "s1" for scan, _ in d.group_owner)
    assert d.next_retry().unit is keep
    d.pop_retry()
    assert d.next_retry() is None
    assert d.drop_scan("s1") == 0


def test_a_restarted_sorters_scan_has_every_unacknowledged_unit_queued_again_oldest_first() -> None:
    d = Dispatcher(TIMEOUT)
    d.seen(b"w1", "worker/1", "", 10, now=0.0)
    d.seen(b"w2", "worker/2", "", 10, now=0.0)
    for index in range(0, 60, 10):
        dispatch(d, unit(index))
    dispatch(d, unit(0, scan="other"))
    d.ack("s1", [(0, 20)])  # what the old sorter had delivered and acknowledged
    assert d.requeue_scan("s1") == 4
    order = []
    while (entry := d.next_retry()) is not None:
        order.append((entry.unit.scan, entry.unit.index))
        dispatch(d, entry.unit)
        d.pop_retry()
    assert order == [("s1", 20), ("s1", 30), ("s1", 40), ("s1", 50)]
    assert d.outstanding("s1") == 4 and d.outstanding("other") == 1  # still kept until the new sorter acks
    assert all(e.attempts == 2 for k, e in d.in_flight.items() if k[0] == "s1")
    assert d.requeue_scan("nothing") == 0
