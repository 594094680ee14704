"""Event formation (pipelines/formation.py): blocks of any size per stream
joined by acquisition index into units of work, zero-copy where one block
covers a unit, bounded by points, bytes and affinity groups; blocks that do
not belong are refused; a stalled stream is declared missing after the
timeout; and the scan completes when every planned (or announced) point is cut.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from services import protocol
from pipelines.formation import EventFormer
from services import codec
from services.sim.profiles import PROFILES, ProfileScan
from services.scan import ScanMeta, parse_scan

PROFILE = PROFILES["counters"]
STREAMS = list(PROFILE.streams)  # pandabox, scaler, diode
TIMEOUT = 2.0
#: Extra streams some tests declare besides the counters profile: a per-point spectrum.
MCA = {"mca": {"spectrum": ("<u4", (8,)), "dead": ("<f4", ())}}


def scan_meta(points: int = 100, extra: dict[str, dict[str, tuple[str, tuple[int, ...]]]] | None = None,
              declared: list[str] | None = None) -> ScanMeta:
    """A valid scan of ``points`` points declaring the counters profile's streams
    (or only ``declared`` of them) plus ``extra`` ones."""
    doc = ProfileScan(PROFILE, "p1", points, streams=declared).document("s1", 1)
    for stream, arrays in (extra or {}).items():
        doc["streams"][stream] = {"arrays": {n: {"dtype": dt, "shape": list(shape)} for n, (dt, shape) in arrays.items()}}
    return parse_scan(doc)


def spec_of(stream: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {**PROFILE.streams, **MCA}[stream]


def values(stream: str, start: int, stop: int) -> dict[str, np.ndarray]:
    """Arrays of ``stream`` for indices [start, stop): every element differs
    between indices, arrays and streams, so a misplaced slice shows."""
    idx = np.arange(start, stop)
    out = {}
    for k, (name, (dtype, shape)) in enumerate(spec_of(stream).items()):
        salt = STREAMS.index(stream) * 10 + k if stream in STREAMS else 90 + k
        base = idx * 1000 + salt * 10
        per_point = np.arange(math.prod(shape)).reshape(shape)
        out[name] = (base.reshape(-1, *[1] * len(shape)) + per_point).astype(dtype)
    return out


def block(stream: str, start: int, stop: int, arrays: dict[str, np.ndarray] | None = None) -> codec.Message:
    return codec.Message(codec.DATA, scan="s1", stream=stream, index=start, count=stop - start,
                         arrays=values(stream, start, stop) if arrays is None else arrays)


def expected_unit(streams: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
    return {protocol.array_key(s, n): a for s in streams for n, a in values(s, start, stop).items()}


def assert_unit(unit: codec.Message, streams: list[str], start: int, stop: int) -> None:
    assert (unit.type, unit.scan, unit.index, unit.count) == (codec.DATA, "s1", start, stop - start)
    expected = expected_unit(streams, start, stop)
    assert unit.arrays.keys() == expected.keys()
    for key, arr in expected.items():
        assert unit.arrays[key].dtype == arr.dtype
        np.testing.assert_array_equal(unit.arrays[key], arr, err_msg=key)


def take_all(former: EventFormer, max_points: int = 10**6, max_bytes: int = 10**12,
             align: int = 0) -> list[codec.Message]:
    units = []
    while (unit := former.take_unit(max_points, max_bytes, align)) is not None:
        units.append(unit)
    return units


def per_point_bytes(streams: list[str]) -> int:
    return sum(np.dtype(dt).itemsize * math.prod(shape) for s in streams for dt, shape in spec_of(s).values())


# --------------------------------------------------------------------------- joining


def test_blocks_of_different_sizes_join_into_exact_units() -> None:
    """Streams with block sizes 7, 13 and 50 delivered in acquisition order
    (by block end, as detectors send them); units are cut as soon as every
    stream has an index, never beyond the slowest stream."""
    points, sizes = 1000, {"pandabox": 7, "scaler": 13, "diode": 50}
    former = EventFormer(scan_meta(points), STREAMS, TIMEOUT, now=0.0)
    plan = sorted(((start, min(points, start + n), s) for s, n in sizes.items() for start in range(0, points, n)),
                  key=lambda b: (b[1], b[0]))
    delivered = dict.fromkeys(STREAMS, 0)
    units: list[codec.Message] = []
    for t, (start, stop, stream) in enumerate(plan):
        former.add_block(block(stream, start, stop), now=t * 1e-3)
        delivered[stream] = stop
        for unit in take_all(former, max_points=64):
            assert unit.stop <= min(delivered.values())
            assert unit.count <= 64
            units.append(unit)
    assert units[0].index == 0 and units[-1].stop == points
    for before, after in zip(units, units[1:]):
        assert after.index == before.stop
    for unit in units:
        assert_unit(unit, STREAMS, unit.index, unit.stop)
        assert unit.meta == {}
    assert former.formed_points == points and former.incomplete_points == 0
    assert former.nbytes == 0
    assert former.is_complete(now=10.0)


def test_out_of_order_blocks_wait_until_the_hole_fills() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in ("pandabox", "diode"):
        former.add_block(block(s, 0, 30), now=0.0)
    former.add_block(block("scaler", 20, 30), now=0.1)
    former.add_block(block("scaler", 10, 20), now=0.2)
    scaler = former.streams["scaler"]
    assert sorted(scaler.early) == [10, 20] and scaler.frontier == 0
    assert former.frontier == 0 and former.lagging() == ["scaler"]
    assert former.take_unit(100, 10**9) is None
    former.add_block(block("scaler", 0, 10), now=0.3)
    assert scaler.early == {} and scaler.frontier == 30 and former.frontier == 30
    (unit,) = take_all(former)
    assert_unit(unit, STREAMS, 0, 30)


def test_a_unit_inside_one_block_is_a_view() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    blocks = {s: block(s, 0, 100) for s in STREAMS}
    for msg in blocks.values():
        former.add_block(msg, now=0.0)
    first, second = former.take_unit(40, 10**9), former.take_unit(40, 10**9)
    for unit, lo in ((first, 0), (second, 40)):
        assert_unit(unit, STREAMS, lo, lo + 40)
        for s, msg in blocks.items():
            for name, arr in msg.arrays.items():
                assert np.shares_memory(unit.arrays[protocol.array_key(s, name)], arr)


def test_a_unit_across_blocks_is_joined_in_order() -> None:
    """Two blocks cannot be one view: the unit is their concatenation."""
    former = EventFormer(scan_meta(), ["scaler"], TIMEOUT, now=0.0)
    a, b = block("scaler", 0, 10), block("scaler", 10, 25)
    former.add_block(b, now=0.0)
    former.add_block(a, now=0.0)
    (unit,) = take_all(former)
    for name in a.arrays:
        np.testing.assert_array_equal(unit.arrays[f"scaler/{name}"], np.concatenate([a.arrays[name], b.arrays[name]]))


# --------------------------------------------------------------------------- unit size


def test_max_points_bounds_every_unit() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in STREAMS:
        former.add_block(block(s, 0, 100), now=0.0)
    units = take_all(former, max_points=30)
    assert [(u.index, u.count) for u in units] == [(0, 30), (30, 30), (60, 30), (90, 10)]
    for u in units:
        assert_unit(u, STREAMS, u.index, u.stop)


@pytest.mark.parametrize("points_per_unit", [1, 5, 17])
def test_max_bytes_counts_the_bytes_of_every_present_stream(points_per_unit: int) -> None:
    streams = [*STREAMS, "mca"]
    former = EventFormer(scan_meta(extra=MCA), streams, TIMEOUT, now=0.0)
    for s in streams:
        former.add_block(block(s, 0, 100), now=0.0)
    per_point = per_point_bytes(streams)
    unit = former.take_unit(1000, points_per_unit * per_point + per_point - 1)
    assert unit.count == points_per_unit
    assert unit.nbytes == points_per_unit * per_point


def test_max_bytes_below_one_point_still_cuts_one_point() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in STREAMS:
        former.add_block(block(s, 0, 10), now=0.0)
    for max_bytes in (0, 1, per_point_bytes(STREAMS) - 1):
        assert former.take_unit(1000, max_bytes).count == 1


def test_max_bytes_ignores_a_missing_stream() -> None:
    """With the spectrum stream declared missing the per-point size shrinks,
    so the same byte budget holds more points."""
    streams = [*STREAMS, "mca"]
    former = EventFormer(scan_meta(extra=MCA), streams, TIMEOUT, now=0.0)
    for s in STREAMS:
        former.add_block(block(s, 0, 100), now=0.0)
    assert former.check_timeouts(now=TIMEOUT) != []
    full, without = per_point_bytes(streams), per_point_bytes(STREAMS)
    budget = 3 * full
    unit = former.take_unit(1000, budget)
    assert unit.meta == {protocol.META_MISSING: ["mca"]}
    assert unit.count == budget // without > budget // full


@pytest.mark.parametrize("align", [1, 10, 16])
def test_align_keeps_a_unit_within_one_group(align: int) -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    units: list[codec.Message] = []
    for start, stop in ((0, 35), (35, 37), (37, 100)):
        for s in STREAMS:
            former.add_block(block(s, start, stop), now=0.0)
        units += take_all(former, max_points=1000, align=align)
    assert sum(u.count for u in units) == 100
    for u in units:
        assert u.index // align == (u.stop - 1) // align
        assert_unit(u, STREAMS, u.index, u.stop)
    groups_cut = {u.index // align for u in units}
    assert len(units) >= len(groups_cut) == math.ceil(100 / align)


# --------------------------------------------------------------------------- refusals


def _with(stream: str, start: int, stop: int, **changes: Any) -> codec.Message:
    """A block of ``stream`` whose arrays are changed: name -> array, or None to drop."""
    arrays = values(stream, start, stop)
    for name, arr in changes.items():
        if arr is None:
            del arrays[name]
        else:
            arrays[name] = arr
    return block(stream, start, stop, arrays)


REFUSED = {
    "unknown stream": (codec.Message(codec.DATA, scan="s1", stream="eiger", index=40, count=1,
                                     arrays={"image": np.zeros((1, 2, 2), np.uint16)}), "eiger"),
    "empty block": (codec.Message(codec.DATA, scan="s1", stream="scaler", index=40, count=0,
                                  arrays={"i0": np.zeros(0), "i1": np.zeros(0)}), "empty"),
    "beyond the scan": (block("scaler", 95, 101), "outside the scan's 100 points"),
    "below the frontier": (block("scaler", 5, 15), "already received"),
    "same block again": (block("scaler", 0, 10), "already received"),
    "overlapping an early block from below": (block("scaler", 15, 25), "overlap"),
    "overlapping an early block from above": (block("scaler", 25, 35), "overlap"),
    "inside an early block": (block("scaler", 22, 24), "overlap"),
    "wrong dtype": (_with("scaler", 10, 20, i0=np.zeros(10, np.float32)), "scaler/i0"),
    "wrong per-point shape": (_with("scaler", 10, 20, i1=np.zeros((10, 2))), "scaler/i1"),
    "spectrum of the wrong length": (_with("mca", 0, 5, spectrum=np.zeros((5, 9), np.uint32)), "mca/spectrum"),
    "array missing": (_with("scaler", 10, 20, i1=None), "expected"),
    "array extra": (_with("scaler", 10, 20, i2=np.zeros(10)), "expected"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_blocks_that_do_not_belong_are_refused_and_change_nothing(case: str) -> None:
    """Scaler has [0, 10) and an early block [20, 30); the refused block leaves
    every counter and frontier as it was."""
    msg, match = REFUSED[case]
    streams = [*STREAMS, "mca"]
    former = EventFormer(scan_meta(extra=MCA), streams, TIMEOUT, now=0.0)
    former.add_block(block("scaler", 0, 10), now=0.0)
    former.add_block(block("scaler", 20, 30), now=0.0)
    before = (former.nbytes, {s: (st.frontier, sorted(st.early), st.highest) for s, st in former.streams.items()},
              former.last_data)
    with pytest.raises(ValueError, match=match):
        former.add_block(msg, now=1.0)
    after = (former.nbytes, {s: (st.frontier, sorted(st.early), st.highest) for s, st in former.streams.items()},
             former.last_data)
    assert after == before


def test_an_undeclared_stream_is_fixed_by_its_first_block() -> None:
    meta = scan_meta(declared=["scaler"])
    former = EventFormer(meta, ["scaler", "diode"], TIMEOUT, now=0.0)
    assert former.streams["diode"].spec is None
    with pytest.raises(ValueError, match="without arrays"):
        former.add_block(block("diode", 0, 10, arrays={}), now=0.0)
    first = block("diode", 0, 10, arrays={"d": np.zeros((10, 3), np.int16)})
    former.add_block(first, now=0.0)
    assert former.streams["diode"].spec == {"d": (np.dtype(np.int16), (3,))}
    for wrong in ({"d": np.zeros((10, 3), np.int32)}, {"d": np.zeros((10, 4), np.int16)},
                  {"d": np.zeros((10, 3), np.int16), "e": np.zeros(10)}, {"e": np.zeros((10, 3), np.int16)}):
        with pytest.raises(ValueError, match="diode"):
            former.add_block(block("diode", 10, 20, arrays=wrong), now=0.0)
    former.add_block(block("diode", 10, 20, arrays={"d": np.ones((10, 3), np.int16)}), now=0.0)
    assert former.streams["diode"].frontier == 20


def test_a_former_needs_a_stream() -> None:
    with pytest.raises(ValueError):
        EventFormer(scan_meta(), [], TIMEOUT, now=0.0)


# --------------------------------------------------------------------------- memory


def test_nbytes_counts_held_blocks_until_they_are_taken() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    held = 0
    for s in STREAMS:
        for start, stop in ((50, 100), (0, 20), (20, 50)):
            msg = block(s, start, stop)
            former.add_block(msg, now=0.0)
            held += msg.nbytes
            assert former.nbytes == held
    assert held == 100 * per_point_bytes(STREAMS)
    unit = former.take_unit(20, 10**9)
    assert former.nbytes == held - unit.nbytes
    take_all(former, max_points=7)
    assert former.taken == 100 and former.nbytes == 0


# --------------------------------------------------------------------------- incomplete events


def test_a_stalled_stream_is_declared_missing_after_the_timeout() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in STREAMS:
        former.add_block(block(s, 0, 10), now=0.0)
    for t, start in enumerate(range(10, 60, 10), start=1):
        for s in ("pandabox", "scaler"):
            former.add_block(block(s, start, start + 10), now=t * 0.1)
    # diode is waited for from when pandabox got ahead of it, at 0.1
    assert former.check_timeouts(now=0.1 + TIMEOUT - 1e-6) == []
    assert former.frontier == 10
    warnings = former.check_timeouts(now=0.1 + TIMEOUT)
    assert len(warnings) == 1
    assert "diode" in warnings[0] and "[10, 60)" in warnings[0]
    assert former.frontier == 60
    complete, incomplete = take_all(former)
    assert_unit(complete, STREAMS, 0, 10)
    assert complete.meta == {}
    assert_unit(incomplete, ["pandabox", "scaler"], 10, 60)
    assert incomplete.meta == {protocol.META_MISSING: ["diode"]}
    assert former.incomplete_points == 50 and former.formed_points == 60
    with pytest.raises(ValueError, match="declared missing"):
        former.add_block(block("diode", 10, 20), now=3.0)
    with pytest.raises(ValueError, match="declared missing"):
        former.add_block(block("diode", 55, 65), now=3.0)
    for s in STREAMS:
        former.add_block(block(s, 60, 70), now=3.0)
    (resumed,) = take_all(former)
    assert_unit(resumed, STREAMS, 60, 70)
    assert resumed.meta == {}


@pytest.mark.parametrize("quiet_until", [0, 10])
def test_a_stream_is_waited_for_from_when_the_others_went_on(quiet_until: int) -> None:
    """Every stream is quiet for 100 s (detectors arming at the scan's start
    when ``quiet_until`` is 0, a paused scan after index 10 otherwise); then
    pandabox and scaler deliver the next block 10 ms before diode. Diode did
    not stop while the others went on: it is 10 ms behind, not missing."""
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    if quiet_until:
        for s in STREAMS:
            former.add_block(block(s, 0, quiet_until), now=0.0)
    for s in ("pandabox", "scaler"):
        former.add_block(block(s, quiet_until, quiet_until + 10), now=100.0)
    assert former.check_timeouts(now=100.005) == []
    former.add_block(block("diode", quiet_until, quiet_until + 10), now=100.01)
    (unit,) = take_all(former, max_points=100)
    assert_unit(unit, STREAMS, 0, quiet_until + 10)
    assert former.incomplete_points == 0


def test_a_hole_before_an_early_block_is_declared_up_to_that_block() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in ("pandabox", "scaler"):
        former.add_block(block(s, 0, 50), now=0.0)
    former.add_block(block("diode", 0, 10), now=0.0)
    former.add_block(block("diode", 30, 40), now=0.5)
    (warning,) = former.check_timeouts(now=TIMEOUT)
    assert "diode" in warning and "[10, 30)" in warning
    assert former.streams["diode"].frontier == 40
    units = take_all(former)
    assert [(u.index, u.stop, u.meta.get(protocol.META_MISSING)) for u in units] == [
        (0, 10, None), (10, 30, ["diode"]), (30, 40, None)]
    assert_unit(units[2], STREAMS, 30, 40)
    assert former.incomplete_points == 20


def test_each_stream_has_its_own_missing_ranges() -> None:
    """pandabox misses [10, 30), diode misses [20, 40): units never mix a
    stream's presence, so the cuts fall at 10, 20, 30 and 40."""
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    former.add_block(block("scaler", 0, 50), now=0.0)
    former.add_block(block("pandabox", 0, 10), now=0.0)
    former.add_block(block("pandabox", 30, 50), now=0.0)
    former.add_block(block("diode", 0, 20), now=0.0)
    former.add_block(block("diode", 40, 50), now=0.0)
    warnings = former.check_timeouts(now=TIMEOUT)
    assert len(warnings) == 2
    units = take_all(former)
    assert [(u.index, u.stop, u.meta.get(protocol.META_MISSING, [])) for u in units] == [
        (0, 10, []), (10, 20, ["pandabox"]), (20, 30, ["diode", "pandabox"]), (30, 40, ["diode"]), (40, 50, [])]
    for u in units:
        present = [s for s in STREAMS if s not in u.meta.get(protocol.META_MISSING, [])]
        assert_unit(u, present, u.index, u.stop)
    assert former.incomplete_points == 30
    assert former.nbytes == 0


def test_stream_end_declares_the_rest_missing_without_waiting() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in ("pandabox", "scaler"):
        former.add_block(block(s, 0, 40), now=0.0)
    former.add_block(block("diode", 0, 25), now=0.0)
    former.stream_end("diode", 25)
    assert former.check_timeouts(now=0.0) == []
    assert former.streams["diode"].frontier == 40
    units = take_all(former)
    assert [(u.index, u.stop, u.meta.get(protocol.META_MISSING)) for u in units] == [(0, 25, None), (25, 40, ["diode"])]
    assert_unit(units[1], ["pandabox", "scaler"], 25, 40)


def test_stream_end_is_checked() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    former.add_block(block("diode", 0, 25), now=0.0)
    for stream, count in (("eiger", 10), ("diode", 24), ("diode", 101), ("diode", -1)):
        with pytest.raises(ValueError):
            former.stream_end(stream, count)
    assert former.streams["diode"].end is None


# --------------------------------------------------------------------------- completion


def test_complete_once_every_planned_point_is_taken() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in STREAMS:
        former.add_block(block(s, 0, 100), now=0.0)
    assert not former.is_complete(now=0.0)
    former.take_unit(99, 10**9)
    assert not former.is_complete(now=100.0)
    former.take_unit(99, 10**9)
    assert former.is_complete(now=0.0)


def test_end_requested_with_every_stream_announced_completes_at_once() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in STREAMS:
        former.add_block(block(s, 0, 60), now=1.0)
    former.request_end(now=1.0)
    take_all(former)
    former.stream_end("pandabox", 60)
    former.stream_end("scaler", 60)
    assert not former.is_complete(now=1.0)
    former.stream_end("diode", 60)
    assert former.is_complete(now=1.0)


def test_end_requested_with_points_still_to_cut_is_not_complete() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in STREAMS:
        former.add_block(block(s, 0, 60), now=0.0)
        former.stream_end(s, 60)
    former.request_end(now=0.0)
    former.take_unit(30, 10**9)
    assert not former.is_complete(now=100.0)
    former.take_unit(30, 10**9)
    assert former.is_complete(now=0.0)


def test_end_requested_without_announcements_waits_for_quiet() -> None:
    former = EventFormer(scan_meta(), STREAMS, TIMEOUT, now=0.0)
    for s in STREAMS:
        former.add_block(block(s, 0, 60), now=0.0)
    former.request_end(now=1.0)
    for s in STREAMS:
        former.add_block(block(s, 60, 70), now=1.5)
    take_all(former)
    assert former.taken == 70
    assert not former.is_complete(now=1.5 + TIMEOUT - 1e-6)
    assert former.is_complete(now=1.5 + TIMEOUT)


def test_a_source_declares_a_hole_missing_and_the_events_go_on_without_waiting():
    """A gap from the source (missed detector frames) ends the wait at once, ahead of the
    frontier or at it, and is refused where it overlaps what arrived or lies outside the scan."""
    former = EventFormer(scan_meta(10, declared=["pandabox"]), ["pandabox"], incomplete_timeout=3600, now=0.0)
    former.add_block(block("pandabox", 0, 3), now=0.0)
    former.add_block(block("pandabox", 5, 8), now=0.0)
    former.declare_missing("pandabox", 8, 10, now=0.0)  # beyond the hole at 3..5: kept until the frontier gets there
    assert former.frontier == 3
    for bad in ((0, 2), (6, 7), (9, 11), (4, 4)):
        with pytest.raises(ValueError):
            former.declare_missing("pandabox", *bad, now=0.0)
    with pytest.raises(ValueError, match="not a source"):
        former.declare_missing("xspress", 3, 5, now=0.0)
    former.declare_missing("pandabox", 3, 5, now=0.0)
    assert former.frontier == 10 and former.check_timeouts(now=0.1) == []
    units = take_all(former)
    assert [(u.index, u.count, u.meta.get(protocol.META_MISSING)) for u in units] == [
        (0, 3, None), (3, 2, ["pandabox"]), (5, 3, None), (8, 2, ["pandabox"])]
    assert_unit(units[2], ["pandabox"], 5, 8)
    assert former.is_complete() and former.incomplete_points == 4
    early = EventFormer(scan_meta(10, declared=["pandabox"]), ["pandabox"], incomplete_timeout=3600, now=0.0)
    early.declare_missing("pandabox", 4, 6, now=0.0)
    with pytest.raises(ValueError, match="declared missing"):
        early.add_block(block("pandabox", 5, 7), now=0.0)
