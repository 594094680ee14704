"""The sorter's per-scan logic (pipelines/reorder.py): in-order delivery exactly
once, duplicates, refused results, gaps after a timeout, the scan's end; the
Chunker's merging of consecutive results; and the range helpers of
services/protocol.py that acknowledgements rely on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services import protocol
from pipelines.reorder import Chunker, ScanOrder
from services import codec

GAP_TIMEOUT = 1.0


def result(index: int, count: int, meta: dict[str, Any] | None = None, width: int = 0,
           dtype: str = "<f8", names: tuple[str, ...] = ("sum", "n")) -> codec.Message:
    """A result whose values encode their index (per array), so joins can be checked."""
    idx = np.arange(index, index + count)
    arrays = {}
    for k, name in enumerate(names):
        base = (idx * 10 + k).astype(dtype)
        arrays[name] = np.repeat(base[:, None], width, axis=1) if width else base
    return codec.Message(codec.RESULT, scan="s1", stream="p1", index=index, count=count, arrays=arrays,
                         meta=meta or {})


def spans(msgs: list[codec.Message]) -> list[tuple[int, int]]:
    return [(m.index, m.stop) for m in msgs]


def mask_ranges(mask: np.ndarray) -> list[list[int]]:
    """[[start, stop], ...] of the True runs of a boolean mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2])]


# --------------------------------------------------------------------------- ScanOrder


def test_out_of_order_results_are_delivered_in_order_once() -> None:
    rng = np.random.default_rng(7)
    cuts = np.unique(np.concatenate([[0, 500], rng.choice(np.arange(1, 500), 60, replace=False)]))
    msgs = [result(int(a), int(b - a)) for a, b in zip(cuts, cuts[1:])]
    order = ScanOrder("s1", 500, GAP_TIMEOUT, now=0.0)
    delivered: list[codec.Message] = []
    for k in rng.permutation(len(msgs)):
        out = order.add(msgs[k], now=0.0)
        delivered += out
        assert order.next == (delivered[-1].stop if delivered else 0)
    assert [m.index for m in delivered] == [m.index for m in msgs]
    assert all(a is b for a, b in zip(delivered, msgs))
    assert order.delivered == 500 and order.duplicates == 0 and order.pending == {}
    assert order.pending_bytes == 0


def test_pending_bytes_follow_what_waits() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    late, early = result(0, 10), result(10, 20)
    assert order.add(early) == []
    assert order.pending_bytes == early.nbytes
    assert order.add(late) == [late, early]
    assert order.pending_bytes == 0


def test_duplicates_are_counted_and_dropped() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    order.add(result(0, 10))
    order.add(result(30, 10))
    assert order.add(result(0, 10)) == []
    assert order.add(result(3, 5)) == []
    assert order.add(result(30, 10)) == []
    assert order.duplicates == 10 + 5 + 10
    assert spans(order.add(result(10, 20))) == [(10, 30), (30, 40)]
    assert order.next == 40 and order.delivered == 40 and order.duplicates == 25


def test_a_duplicate_is_not_delivered_twice() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    first = result(10, 10)
    again = result(10, 10)
    assert order.add(first) == []
    assert order.add(again) == []
    out = order.add(result(0, 10))
    assert spans(out) == [(0, 10), (10, 20)] and out[1] is first
    assert order.delivered == 20 and order.duplicates == 10


@pytest.mark.parametrize("index, count, match", [
    (5, 10, "straddles"),
    (25, 10, "overlaps"),
    (35, 10, "overlaps"),
    (32, 2, "overlaps"),
    (25, 20, "overlaps"),
    (95, 10, "outside"),
    (100, 1, "outside"),
    (50, 0, "outside"),
])
def test_results_that_cannot_belong_are_refused(index: int, count: int, match: str) -> None:
    """next is 10, [30, 40) is pending."""
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    order.add(result(0, 10))
    order.add(result(30, 10))
    with pytest.raises(ValueError, match=match):
        order.add(result(index, count))
    assert order.next == 10 and sorted(order.pending) == [30] and order.duplicates == 0


def test_no_gap_before_the_timeout() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    order.add(result(20, 10), now=0.5)
    assert order.check_gap(now=GAP_TIMEOUT - 1e-6) == (None, [])
    assert order.next == 0 and order.gap_points == 0


def test_nothing_pending_and_no_end_is_no_gap() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    assert order.check_gap(now=100.0) == (None, [])
    order.add(result(0, 10), now=0.0)
    assert order.check_gap(now=100.0) == (None, [])


def test_a_gap_unblocks_the_results_after_it() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    assert spans(order.add(result(0, 10), now=0.2)) == [(0, 10)]
    order.add(result(40, 10), now=0.25)
    order.add(result(25, 15), now=0.4)
    order.add(result(60, 5), now=0.4)
    # the wait for index 10 starts when [40, 50) arrives and has to wait for it, at 0.25
    assert order.check_gap(now=0.25 + GAP_TIMEOUT - 1e-6) == (None, [])
    first_gap_at = 0.25 + GAP_TIMEOUT  # times exact in binary: the boundaries are tested to the tick
    gap, out = order.check_gap(now=first_gap_at)
    assert gap.type == codec.GAP and gap.scan == "s1" and (gap.index, gap.stop) == (10, 25)
    assert spans(out) == [(25, 40), (40, 50)]
    assert order.next == 50 and order.gap_points == 15
    # [60, 65) now waits for index 50, from the moment of the first gap
    assert order.check_gap(now=first_gap_at + GAP_TIMEOUT - 1e-6) == (None, [])
    gap, out = order.check_gap(now=first_gap_at + GAP_TIMEOUT)
    assert (gap.index, gap.stop) == (50, 60) and spans(out) == [(60, 65)]
    assert order.gap_points == 25 and order.delivered == 10 + 15 + 10 + 5
    assert order.add(result(10, 15)) == [] and order.add(result(50, 5)) == []
    assert order.duplicates == 20


def test_the_gap_timer_starts_when_later_results_wait() -> None:
    """Index 10 is awaited once a later result waits for it: after a 100 s
    pause in the scan, a result that overtakes [10, 20) by 10 ms does not
    make [10, 20) a gap."""
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    order.add(result(0, 10), now=0.0)
    assert order.add(result(20, 10), now=100.0) == []
    assert order.check_gap(now=100.005) == (None, [])
    assert spans(order.add(result(10, 10), now=100.01)) == [(10, 20), (20, 30)]
    assert order.gap_points == 0 and order.duplicates == 0


def test_a_gap_up_to_the_end() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    order.add(result(0, 30), now=0.0)
    assert order.set_end(50, now=0.5) == []
    assert not order.finished
    # the wait for index 30 starts when the end becomes known, at 0.5
    assert order.check_gap(now=0.5 + GAP_TIMEOUT - 1e-6) == (None, [])
    gap, out = order.check_gap(now=0.5 + GAP_TIMEOUT)
    assert (gap.index, gap.stop) == (30, 50) and out == []
    assert order.finished and order.gap_points == 20
    assert order.summary() == {"scan": "s1", "points": 50, "delivered": 30, "gaps": 20, "duplicates": 0,
                               "failed": 0}


def test_finished_once_every_index_up_to_the_end_is_delivered() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    order.add(result(20, 20))
    assert order.set_end(40) == []
    assert not order.finished
    with pytest.raises(ValueError, match="outside"):
        order.add(result(40, 5))
    out = order.add(result(0, 20, meta={protocol.META_ERRORS: {"3": "ValueError: x", "7": "KeyError: y"}}))
    assert spans(out) == [(0, 20), (20, 40)]
    assert order.finished and order.failed_points == 2


def test_set_end_is_checked() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    order.add(result(40, 20))
    for points in (59, 101, -1):
        with pytest.raises(ValueError):
            order.set_end(points)
    assert order.end is None
    order.set_end(60)
    assert order.end == 60


def test_set_end_delivers_nothing_new_but_allows_the_end_gap() -> None:
    order = ScanOrder("s1", 100, GAP_TIMEOUT, now=0.0)
    order.set_end(0)
    assert order.finished and order.check_gap(now=10.0) == (None, [])


# --------------------------------------------------------------------------- Chunker


def test_consecutive_results_merge_up_to_max_points() -> None:
    chunker = Chunker(max_points=25, max_age=10.0)
    parts = [result(i, 5, width=3) for i in range(0, 60, 5)]
    chunks = []
    for p in parts:
        chunks += chunker.add(p, now=0.0)
    chunks.append(chunker.flush())
    assert spans(chunks) == [(0, 25), (25, 50), (50, 60)]
    for chunk in chunks:
        assert chunk.type == codec.RESULT and (chunk.scan, chunk.stream) == ("s1", "p1")
        members = [p for p in parts if chunk.index <= p.index < chunk.stop]
        assert chunk.arrays.keys() == members[0].arrays.keys()
        for name in chunk.arrays:
            np.testing.assert_array_equal(chunk.arrays[name], np.concatenate([p.arrays[name] for p in members]))


def test_a_part_that_would_overflow_closes_the_chunk_first() -> None:
    chunker = Chunker(max_points=25, max_age=10.0)
    assert chunker.add(result(0, 20), now=0.0) == []
    (closed,) = chunker.add(result(20, 10), now=0.0)
    assert (closed.index, closed.count) == (0, 20)
    big = result(30, 40)
    closed, alone = chunker.add(big, now=0.0)
    assert (closed.index, closed.count) == (20, 10)
    assert alone is big
    assert chunker.parts == [] and chunker.points == 0


def test_meta_errors_and_incomplete_ranges_merge() -> None:
    metas = [
        {protocol.META_ERRORS: {"1": "ValueError: a"}, protocol.META_INCOMPLETE: {"diode": [[0, 5]]}},
        {},
        {protocol.META_ERRORS: {"12": "KeyError: b", "13": "KeyError: c"},
         protocol.META_INCOMPLETE: {"diode": [[10, 12], [13, 15]], "scaler": [[11, 12]]}},
        {protocol.META_INCOMPLETE: {"diode": [[15, 20]]}},
    ]
    parts = [result(5 * k, 5, meta=m) for k, m in enumerate(metas)]
    chunker = Chunker(max_points=100, max_age=10.0)
    for p in parts:
        assert chunker.add(p, now=0.0) == []
    chunk = chunker.flush()
    errors = {i: why for m in metas for i, why in m.get(protocol.META_ERRORS, {}).items()}
    incomplete = {}
    for stream in ("diode", "scaler"):
        mask = np.zeros(20, bool)
        for m in metas:
            for a, b in m.get(protocol.META_INCOMPLETE, {}).get(stream, []):
                mask[a:b] = True
        incomplete[stream] = mask_ranges(mask)
    assert chunk.meta == {protocol.META_ERRORS: errors, protocol.META_INCOMPLETE: incomplete}
    assert incomplete["diode"] == [[0, 5], [10, 12], [13, 20]]


def test_merged_chunk_without_errors_has_no_error_meta() -> None:
    chunker = Chunker(max_points=100, max_age=10.0)
    chunker.add(result(0, 5), now=0.0)
    chunker.add(result(5, 5), now=0.0)
    assert chunker.flush().meta == {}


@pytest.mark.parametrize("other", [
    {"names": ("sum",)},
    {"names": ("n", "sum")},
    {"names": ("sum", "m")},
    {"dtype": "<f4"},
    {"dtype": "<i8"},
    {"width": 2},
])
def test_a_different_array_layout_starts_a_new_chunk(other: dict[str, Any]) -> None:
    chunker = Chunker(max_points=100, max_age=10.0)
    first, second = result(0, 5), result(5, 5)
    assert chunker.add(first, now=0.0) == []
    assert chunker.add(second, now=0.0) == []
    odd = result(10, 5, **other)
    (closed,) = chunker.add(odd, now=0.0)
    assert (closed.index, closed.count) == (0, 10)
    assert chunker.flush() is odd


def test_due_after_max_age_of_the_first_part() -> None:
    chunker = Chunker(max_points=100, max_age=2.0)
    assert not chunker.due(now=100.0)
    chunker.add(result(0, 5), now=10.0)
    chunker.add(result(5, 5), now=11.5)
    assert not chunker.due(now=12.0 - 1e-6)
    assert chunker.due(now=12.0)
    chunk = chunker.flush()
    assert (chunk.index, chunk.count) == (0, 10)
    assert not chunker.due(now=100.0)
    chunker.add(result(10, 5), now=50.0)
    assert not chunker.due(now=51.0) and chunker.due(now=52.0)


def test_flush_of_one_part_returns_it_unchanged() -> None:
    chunker = Chunker(max_points=100, max_age=1.0)
    only = result(0, 7, meta={protocol.META_ERRORS: {"3": "ZeroDivisionError: x"}, "extra": 1})
    chunker.add(only, now=0.0)
    assert chunker.flush() is only
    assert only.meta == {protocol.META_ERRORS: {"3": "ZeroDivisionError: x"}, "extra": 1}
    assert chunker.parts == [] and chunker.points == 0


# --------------------------------------------------------------------------- protocol ranges


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)).map(lambda t: (t[0], t[0] + t[1])), max_size=12))
def test_merge_ranges_covers_the_same_indices(ranges: list[tuple[int, int]]) -> None:
    merged = protocol.merge_ranges(ranges)
    mask = np.zeros(81, bool)
    for a, b in ranges:
        mask[a:b] = True
    assert merged == mask_ranges(mask)


def test_merge_ranges_joins_touching_ranges() -> None:
    assert protocol.merge_ranges([(5, 7), (0, 5), (7, 8), (10, 12)]) == [[0, 8], [10, 12]]
    assert protocol.merge_ranges([]) == []


def test_merge_incomplete_per_stream() -> None:
    into = {"diode": [[0, 5]]}
    protocol.merge_incomplete(into, {"diode": [[5, 9], [20, 21]], "scaler": [[3, 4]]})
    assert into == {"diode": [[0, 9], [20, 21]], "scaler": [[3, 4]]}


def test_ack_ranges_round_trip_through_the_codec() -> None:
    ranges = [(0, 10), (20, 21), (5, codec.MAX_INDEX)]
    msg = codec.decode(codec.encode(protocol.ack("s1", ranges, gap=True)))
    assert msg.type == codec.ACK and msg.scan == "s1" and msg.meta["gap"] is True
    assert protocol.ack_ranges(msg) == ranges


@pytest.mark.parametrize("ranges", [
    None, "0-10", {"0": 10}, [(0, 10)], [[0]], [[0, 10, 20]], [[10, 10]], [[10, 5]], [[-1, 5]],
    [[0, codec.MAX_INDEX + 1]], [[0.0, 10]], [[0, 10.0]], [[False, True]], [["0", "10"]], [[0, 10], None],
])
def test_ack_ranges_refuses_bad_ranges(ranges: Any) -> None:
    msg = codec.Message(codec.ACK, scan="s1", meta={protocol.META_RANGES: ranges})
    with pytest.raises(ValueError, match="ack"):
        protocol.ack_ranges(msg)


def test_ack_without_ranges_is_refused() -> None:
    with pytest.raises(ValueError, match="ranges"):
        protocol.ack_ranges(codec.Message(codec.ACK, scan="s1"))
