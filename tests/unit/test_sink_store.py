"""The sink's store: maps assembled by the scan geometry, the byte budget and
LRU eviction, and the query answers (no sockets, no Tango)."""

from __future__ import annotations

import numpy as np
import pytest

from services import codec, protocol
from services.sim import profiles
from support import map_by_hand, scan_geometry
from services.scan import parse_scan
from services.schema import SchemaError
from sink.component import SinkComponent, SinkConfig
from sink.queries import answer
from sink.store import EvictedError, ScanStore, StoreError, storage_dtype
from sink.views import live_frame, preview_image

PIPE = "counters"


def meta(scan_id: str, kind: str = "raster", rows: int = 5, cols: int = 7):
    return parse_scan(profiles.ProfileScan(profiles.PROFILES["counters"], PIPE, rows * cols,
                                           geometry=scan_geometry(kind, rows, cols)).document(scan_id, 1))


def feed(store: ScanStore, scan_id: str, points: int, sizes: list[int], names=("i0", "i1_norm")) -> None:
    truth = profiles.expected_counters(np.arange(points))
    start = 0
    for size in sizes:
        stop = min(points, start + size)
        store.add_result(scan_id, PIPE, start, stop - start, {n: truth[n][start:stop] for n in names})
        start = stop
        if start >= points:
            break


@pytest.mark.parametrize("kind", ["raster", "snake", "line"])
def test_maps_follow_the_geometry_point_by_point(kind) -> None:
    rows, cols = 5, 7
    store = ScanStore(10**6)
    store.start(meta("a", kind, rows, cols), PIPE)
    feed(store, "a", rows * cols, [3, 1, 9, 4, 30])  # chunks cut across rows
    truth = profiles.expected_counters(np.arange(rows * cols))
    for name in ("i0", "i1_norm"):
        _, product = store.product("a", f"{PIPE}/{name}")
        want = map_by_hand(kind, truth[name], rows, cols)
        assert product.data.shape == want.shape
        np.testing.assert_array_equal(product.data, want)
    info = store.info("a")
    assert (info["expected"], info["received"], info["missing"], info["duplicates"]) == (35, 35, 0, 0)
    assert info["status"] == "running" and info["metadata"]["scan"]["id"] == "a"


def test_unmeasured_failed_and_gap_points_are_nan_and_counted() -> None:
    store = ScanStore(10**6)
    store.start(meta("a", "snake", 3, 4), PIPE)
    store.add_result("a", PIPE, 0, 4, {"v": np.arange(4, dtype=np.uint16)},
                     {"errors": {"1": "bad frame"}, "incomplete": {"diode": [[2, 4]]}})
    store.add_gap("a", PIPE, 4, 3)
    store.add_result("a", PIPE, 7, 1, {"v": np.array([70], np.uint16)})
    _, product = store.product("a", f"{PIPE}/v")
    assert product.data.dtype == np.float32  # uint16 held exactly, with NaN for "not measured"
    want = np.full((3, 4), np.nan, np.float32)
    want[0, [0, 2, 3]] = [0, 2, 3]
    want[1, 0] = 70  # index 7: second row runs backwards
    np.testing.assert_array_equal(product.data, want)
    info = store.info("a")
    assert info["received"] == 5 and info["failed"] == 1 and info["gaps"] == 3 and info["missing"] == 7
    assert info["runs"][PIPE]["incomplete"] == 2 and info["runs"][PIPE]["errors"] == {"1": "bad frame"}
    store.add_result("a", PIPE, 7, 1, {"v": np.array([71], np.uint16)})  # delivered twice
    assert store.info("a")["duplicates"] == 1
    store.end("a", PIPE, {"delivered": 8})
    assert store.info("a")["status"] == "complete"
    with pytest.raises(StoreError, match="already ended"):
        store.add_result("a", PIPE, 8, 1, {"v": np.array([1], np.uint16)})


def test_bad_chunks_are_refused_without_changing_anything() -> None:
    store = ScanStore(10**6)
    store.start(meta("a"), PIPE)
    store.add_result("a", PIPE, 0, 2, {"spec": np.ones((2, 8))})
    before = store.info("a")
    for index, count, arrays, why in [
        (34, 2, {"spec": np.ones((2, 8))}, "outside"),
        (2, 2, {"spec": np.ones((2, 9))}, "per-point shape"),
        (2, 2, {"spec": np.ones((3, 8))}, "points, the chunk"),
        (2, 1, {"spec": np.ones((1, 8)), "s": np.array(["x"])}, "cannot be stored"),
    ]:
        with pytest.raises(StoreError, match=why):
            store.add_result("a", PIPE, index, count, arrays)
    with pytest.raises(StoreError, match="outside the chunk"):
        store.add_result("a", PIPE, 2, 2, {"spec": np.ones((2, 8))}, {"errors": {"9": "x"}})
    with pytest.raises(StoreError, match="no scan 'b'"):
        store.add_result("b", PIPE, 0, 1, {"spec": np.ones((1, 8))})
    with pytest.raises(StoreError, match="not started for pipeline"):
        store.add_result("a", "xrf", 0, 1, {"spec": np.ones((1, 8))})
    assert store.info("a")["received"] == before["received"] == 2


def test_storage_dtypes_hold_values_exactly() -> None:
    assert storage_dtype(np.dtype("<u2")) == np.float32
    assert storage_dtype(np.dtype("<i4")) == np.float64
    assert storage_dtype(np.dtype("<f4")) == np.float32
    assert storage_dtype(np.dtype("<c8")) == np.complex64
    assert storage_dtype(np.dtype("?")) == np.float32


def test_two_pipelines_share_one_scan_entry() -> None:
    store = ScanStore(10**6)
    m = meta("a")
    store.start(m, "counters")
    store.start(m, "xrf")
    store.add_result("a", "counters", 0, 35, {"i0": np.ones(35)})
    assert store.info("a")["received"] == 0  # a point is whole when every pipeline has it
    store.add_result("a", "xrf", 0, 10, {"Fe": np.ones(10)})
    assert store.info("a")["received"] == 10
    assert sorted(store.info("a")["products"]) == ["counters/i0", "xrf/Fe"]
    with pytest.raises(StoreError, match="already started"):
        store.start(m, "xrf")
    with pytest.raises(StoreError, match="geometry"):
        store.start(meta("a", rows=2, cols=3), "dpc")


# --------------------------------------------------------------------------- budget and LRU

SCAN_BYTES = 35 * 8 * 2 + 35  # two float64 products and the point states of a 5 x 7 scan


def run_scan(store: ScanStore, scan_id: str, end: bool = True) -> None:
    store.start(meta(scan_id), PIPE)
    feed(store, scan_id, 35, [35])
    if end:
        store.end(scan_id, PIPE)
    assert store.resident <= store.budget


def test_lru_evicts_exactly_the_least_recently_touched_and_reads_refresh() -> None:
    store = ScanStore(3 * SCAN_BYTES + 10)
    for scan in "abc":
        run_scan(store, scan)
    assert store.evictions == 0 and store.resident == 3 * SCAN_BYTES
    answer(store, {"op": "get", "scan": "a", "product": f"{PIPE}/i0"})  # a read: "a" is fresh again
    run_scan(store, "d")
    assert list(store.scans) == ["c", "a", "d"] and list(store.evicted) == ["b"]
    store.info("c")
    run_scan(store, "e")
    run_scan(store, "f")
    assert list(store.evicted) == ["b", "a", "d"] and list(store.scans) == ["c", "e", "f"]
    assert store.evictions == 3 and store.peak <= store.budget
    with pytest.raises(EvictedError, match="evicted"):
        store.product("a", f"{PIPE}/i0")
    listing = answer(store, {"op": "list"})[0]
    assert [s["scan"] for s in listing["scans"]] == ["c", "e", "f"] and "a" in listing["evicted"]
    run_scan(store, "a")  # the same id again is a new scan, no longer "evicted"
    assert "a" not in store.evicted and store.info("a")["received"] == 35


def test_scans_being_written_are_never_evicted() -> None:
    store = ScanStore(3 * SCAN_BYTES + 300)
    run_scan(store, "open1", end=False)
    run_scan(store, "open2", end=False)
    run_scan(store, "done")
    run_scan(store, "new", end=False)  # evicts "done" although the open ones are older
    assert list(store.evicted) == ["done"]
    store.start(meta("big", rows=10, cols=20), PIPE)  # its product cannot fit beside three open scans
    store.add_result("big", PIPE, 0, 1, {"i0": np.ones(1)})
    info = store.info("big")
    assert "does not fit" in info["refused"][f"{PIPE}/i0"] and store.refused_products == 1
    assert set(store.scans) == {"open1", "open2", "new", "big"} and store.resident <= store.budget
    with pytest.raises(StoreError, match="refused"):
        store.product("big", f"{PIPE}/i0")


def test_an_open_scan_idle_past_the_stale_time_can_be_evicted() -> None:
    now = [0.0]
    store = ScanStore(2 * SCAN_BYTES + 10, stale_seconds=60, clock=lambda: now[0])
    run_scan(store, "abandoned", end=False)  # its pipeline died before scan_end
    run_scan(store, "b")
    now[0] = 30.0
    run_scan(store, "c")
    assert list(store.evicted) == ["b"]
    now[0] = 100.0
    run_scan(store, "d")
    assert list(store.evicted) == ["b", "abandoned"]


# --------------------------------------------------------------------------- queries


def test_queries_answer_slices_and_latest_points() -> None:
    store = ScanStore(10**6)
    store.start(meta("a", "snake"), PIPE)
    feed(store, "a", 20, [20])
    store.add_result("a", PIPE, 20, 2, {"i0": np.ones(2), "i1_norm": np.ones(2), "spec": np.ones((2, 4))})
    full = store.product("a", f"{PIPE}/i0")[1].data
    meta_, arrays = answer(store, {"op": "get", "scan": "a", "product": f"{PIPE}/i0"})
    assert meta_["shape"] == [5, 7] and np.shares_memory(arrays["data"], full)  # no copy of the map
    _, arrays = answer(store, {"op": "get", "scan": "a", "product": f"{PIPE}/i0", "rows": [1, 3], "cols": [2, 6]})
    np.testing.assert_array_equal(arrays["data"], full[1:3, 2:6])
    _, arrays = answer(store, {"op": "latest", "scan": "a", "product": f"{PIPE}/i0", "n": 4})
    np.testing.assert_array_equal(arrays["indices"], [18, 19, 20, 21])
    truth = profiles.expected_counters(np.arange(20))["i0"]
    np.testing.assert_array_equal(arrays["values"], [truth[18], truth[19], 1, 1])
    _, arrays = answer(store, {"op": "latest", "scan": "a", "product": f"{PIPE}/spec", "n": 5})
    assert arrays["values"].shape == (5, 4)  # the pipeline's last five points; three lack this result
    assert np.isnan(arrays["values"][:3]).all() and (arrays["values"][3:] == 1).all()
    assert answer(store, {"op": "stats"})[0]["scans"] == 1
    assert answer(store, {"op": "info", "scan": "a"})[0]["products"][f"{PIPE}/spec"]["shape"] == [5, 7, 4]


@pytest.mark.parametrize("query, error, why", [
    ({"op": "drop"}, SchemaError, "is not one of"),
    ({}, SchemaError, "'op' is a required property"),
    ({"op": "get", "scan": "a"}, SchemaError, "'product' is a required property"),
    ({"op": "get", "scan": "a", "product": "counters/i0", "rows": [2, "x"]}, SchemaError, "rows/1"),
    ({"op": "get", "scan": "a", "product": "counters/i0", "rows": [-1, 3]}, SchemaError, "rows/0"),
    ({"op": "list", "extra": 1}, SchemaError, "Additional properties"),
    ({"op": "latest", "scan": "a", "product": "counters/i0", "n": 0}, SchemaError, "n"),
    ("list", SchemaError, "is not of type 'object'"),
    ({"op": "info", "scan": "nope"}, StoreError, "no scan 'nope'"),
    ({"op": "get", "scan": "a", "product": "counters/none"}, StoreError, "no product"),
    ({"op": "get", "scan": "a", "product": "counters/i0", "rows": [3, 9]}, StoreError, r"outside \[0, 5\]"),
    ({"op": "get", "scan": "a", "product": "counters/i0", "cols": [5, 5]}, StoreError, "outside"),
])
def test_malformed_queries_get_clear_errors(query, error, why) -> None:
    store = ScanStore(10**6)
    store.start(meta("a"), PIPE)
    feed(store, "a", 35, [35])
    with pytest.raises(error, match=why):
        answer(store, query)


def test_cols_on_a_one_dimensional_product_is_refused() -> None:
    store = ScanStore(10**6)
    store.start(meta("l", "line"), PIPE)
    feed(store, "l", 35, [35])
    _, arrays = answer(store, {"op": "get", "scan": "l", "product": f"{PIPE}/i0"})
    np.testing.assert_array_equal(arrays["data"], profiles.expected_counters(np.arange(35))["i0"])
    with pytest.raises(StoreError, match="1-D product"):
        answer(store, {"op": "get", "scan": "l", "product": f"{PIPE}/i0", "cols": [0, 1]})


# --------------------------------------------------------------------------- views


def test_live_frames_are_in_lavue_orientation_with_motor_axes() -> None:
    store = ScanStore(10**6)
    store.start(meta("a", "raster", 5, 7), PIPE)
    feed(store, "a", 35, [35])
    entry, product = store.product("a", f"{PIPE}/i0")
    frame = live_frame(entry, product)
    np.testing.assert_array_equal(frame.xy, product.data.T)  # lavue shows data[x, y]; x = fast axis
    assert frame.meta["axisscales"] == [-3.0, 10.0, 1.0, 0.5]
    assert frame.meta["axislabels"] == ["samx", "samy", "um", "um"]
    assert frame.meta["name"].endswith(f"#{product.version}")
    np.testing.assert_array_equal(preview_image(frame, 512), product.data)  # Tango image: rows first
    assert preview_image(frame, 3).shape == (3, 3)  # decimated, never above the limit

    store.start(meta("l", "line"), PIPE)
    store.add_result("l", PIPE, 0, 3, {"spec": np.arange(12.0).reshape(3, 4)})
    frame = live_frame(*store.product("l", f"{PIPE}/spec"))
    assert frame.xy.shape == (35, 4) and frame.meta["axisscales"][:3] == pytest.approx([1.0, 0.0, 1 / 34])


def test_spectra_on_a_raster_keep_a_running_sum_without_failed_points() -> None:
    from services import protocol
    from sink.queries import answer

    store = ScanStore(10**7)
    store.start(meta("sp", "snake", 4, 5), PIPE)
    spectra = np.arange(20 * 6, dtype=np.float64).reshape(20, 6)
    store.add_result("sp", PIPE, 0, 8, {"mca": spectra[:8]})
    store.add_result("sp", PIPE, 8, 12, {"mca": spectra[8:]}, meta={protocol.META_ERRORS: {"9": "bad frame"}})
    entry, product = store.product("sp", f"{PIPE}/mca")
    total = product.running["sum"]
    good = np.delete(np.arange(20), 9)
    np.testing.assert_allclose(total.value, spectra[good].sum(axis=0))
    assert total.points == 19
    np.testing.assert_allclose(total.value, np.nansum(product.flat, axis=0))  # the map agrees
    frame = live_frame(entry, product)
    np.testing.assert_allclose(frame.xy, total.value)
    assert frame.meta["points"] == 19
    result, arrays = answer(store, {"op": "get", "scan": "sp", "product": f"{PIPE}/mca", "reduce": "sum"})
    assert result["points"] == 19
    np.testing.assert_allclose(arrays["data"], total.value)


def test_a_scan_ends_complete_only_when_every_point_came_else_incomplete_or_aborted() -> None:
    store = ScanStore(10**6)
    for scan in ("whole", "short", "cut"):
        store.start(meta(scan), PIPE)
        feed(store, scan, 35, [35] if scan == "whole" else [20] if scan == "short" else [10])
    store.end("whole", PIPE, {"points": 35})
    store.end("short", PIPE, {"points": 35})  # 15 points never delivered: not a whole scan
    store.end("cut", PIPE, {"points": 35, "reason": "master gone"}, aborted=True)
    infos = {scan: store.info(scan) for scan in ("whole", "short", "cut")}
    assert {s: i["status"] for s, i in infos.items()} == {"whole": "complete", "short": "incomplete", "cut": "aborted"}
    assert (infos["short"]["received"], infos["short"]["missing"]) == (20, 15)
    assert infos["cut"]["runs"][PIPE]["summary"]["reason"] == "master gone"


def test_a_restarted_sorters_scan_start_continues_the_entry_and_redeliveries_count_once() -> None:
    sink = SinkComponent("test/sink/resume", "", "127.0.0.1", "127.0.0.1", SinkConfig())
    try:
        doc = meta("r").raw
        truth = profiles.expected_counters(np.arange(35))["i0"]

        def result(start: int, stop: int) -> codec.Message:
            return codec.Message(codec.RESULT, scan="r", stream=PIPE, index=start, count=stop - start,
                                 arrays={"i0": truth[start:stop]})

        sink._ingest(codec.Message(codec.SCAN_START, scan="r", stream=PIPE, meta={protocol.META_SCAN: doc}))
        sink._ingest(result(0, 20))
        sink._ingest(codec.Message(codec.SCAN_START, scan="r", stream=PIPE,
                                   meta={protocol.META_SCAN: doc, protocol.META_RESUME: 15}))
        sink._ingest(result(15, 35))  # [15, 20) again: the old sorter delivered it, the master never had the ack
        sink._ingest(codec.Message(codec.SCAN_END, scan="r", stream=PIPE, meta={"points": 35}))
        info = sink.store.info("r")
        assert (info["status"], info["received"], info["missing"], info["duplicates"]) == ("complete", 35, 0, 5)
        _, product = sink.store.product("r", f"{PIPE}/i0")
        np.testing.assert_array_equal(product.data.reshape(-1), map_by_hand("raster", truth, 5, 7).reshape(-1))
        with pytest.raises(StoreError, match="resume_from"):
            sink._ingest(codec.Message(codec.SCAN_START, scan="r", stream=PIPE,
                                       meta={protocol.META_SCAN: doc, protocol.META_RESUME: -1}))
    finally:
        sink.stop()
