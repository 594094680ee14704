"""The one failed-point policy (services/ledger.py): what a point without a
value holds, per dtype, and that every consumer follows it: the worker's
failed rows, the sink's maps, the NeXus datasets, the image maps, FIO columns."""

from __future__ import annotations

import numpy as np
import pytest

from services.ledger import PointLedger, blank_failed, fill_value, marks_missing, nan_dtype, sum_of_points

POLICY = [  # dtype, fill, marks the point by itself, the NaN-holding dtype
    ("<f8", np.nan, True, "<f8"),
    ("<f4", np.nan, True, "<f4"),
    (">f4", np.nan, True, "<f4"),
    ("<c8", complex(np.nan, np.nan), True, "<c8"),
    ("<i4", 0, False, "<f8"),
    ("<u2", 0, False, "<f4"),
    ("|u1", 0, False, "<f4"),
    ("<i8", 0, False, "<f8"),
    ("|b1", False, False, "<f4"),
]


@pytest.mark.parametrize("dtype, fill, marks, holder", POLICY)
def test_the_fill_value_per_dtype(dtype: str, fill, marks: bool, holder: str) -> None:
    value = fill_value(dtype)
    assert value.dtype == np.dtype(dtype).newbyteorder("=")  # a scalar: native byte order
    if np.dtype(dtype).kind == "c":
        assert np.isnan(value.real) and np.isnan(value.imag)  # no part of it is a measurement
    elif marks:
        assert np.isnan(value)
    else:
        assert value == fill and not np.isnan(value)
    assert marks_missing(dtype) is marks
    assert nan_dtype(dtype) == np.dtype(holder)
    assert marks_missing(nan_dtype(dtype))  # what the sink stores always shows a missing point


def test_non_numeric_dtypes_have_no_fill() -> None:
    for dtype in ("<U3", "O"):
        with pytest.raises(ValueError, match="not numeric"):
            fill_value(dtype)
        with pytest.raises(ValueError, match="not numeric"):
            nan_dtype(dtype)


def test_blank_failed_marks_floats_and_leaves_integers_as_sent() -> None:
    spectra = np.arange(12.0).reshape(4, 3)
    spectra.setflags(write=False)  # decoded arrays are read-only: blanking must copy
    out = blank_failed(spectra, np.array([1, 3]))
    assert np.isnan(out[[1, 3]]).all() and (out[[0, 2]] == spectra[[0, 2]]).all()
    assert spectra[1, 0] == 3.0
    counts = np.array([5, 6, 7], np.uint32)
    assert blank_failed(counts, np.array([1])) is counts  # 0 would mark nothing; the state says "failed"
    assert blank_failed(spectra, np.zeros(0, np.int64)) is spectra


def test_the_worker_sends_failed_rows_with_the_fill_value() -> None:
    from pipelines.processors import Batch, Processor
    from pipelines.worker import run_isolated
    from support.documents import profile_document
    from services.scan import parse_scan

    class OddFails(Processor):
        def process(self, batch: Batch) -> dict[str, np.ndarray]:
            if (batch.indices % 2 == 1).any():
                raise ValueError("odd point")
            n = batch.count
            return {name: np.ones(n, name) for name, *_ in POLICY}

    meta = parse_scan(profile_document("w", 1, 10, "counters"))
    arrays, errors = run_isolated(OddFails(), Batch(meta, 0, 4, {"scaler/i0": np.zeros(4)}))
    assert sorted(errors) == ["1", "3"]
    for name, *_ in POLICY:
        np.testing.assert_array_equal(arrays[name][[1, 3]], np.full(2, fill_value(name)), err_msg=name)
        assert (arrays[name][[0, 2]] == 1).all()


def test_a_running_sum_leaves_out_failed_points_and_counts_a_point_once() -> None:
    ledger = PointLedger.for_points(10)
    ledger.mark_result(0, 4, np.zeros(0, np.int64))
    failed = np.array([5])
    skip = ledger.unsummed(2, 7, failed)  # points 2, 3 came before, 5 failed
    assert skip.tolist() == [0, 1, 3]
    chunk = np.arange(5 * 3, dtype=np.uint16).reshape(5, 3)
    np.testing.assert_array_equal(sum_of_points(chunk, skip), chunk[[2, 4]].sum(axis=0))
    with_nan = chunk.astype(np.float64)
    with_nan[4, 0] = np.nan
    np.testing.assert_array_equal(sum_of_points(with_nan, np.zeros(0, np.int64)), np.nansum(with_nan, axis=0))


def test_the_sink_and_the_image_writer_sum_the_same_points(tmp_path) -> None:
    from support.documents import profile_document
    from services.scan import parse_scan
    from sink.store import ScanStore
    from writers.component import ScanRun
    from writers.images import ImageFiles, ImageSettings
    from writers.layout import OutputLayout

    meta = parse_scan(profile_document("sum", 1, 12, "p"))
    spectra = np.random.default_rng(3).random((12, 4))
    chunks = [(0, 6, {}), (4, 4, {}), (8, 4, {"errors": {"9": "bad"}})]  # 4, 5 delivered twice; 9 failed
    store = ScanStore(10**6)
    store.start(meta, "p")
    run = ScanRun(meta, "p", OutputLayout(tmp_path).stem(meta, "p"), "test/writer/unit",
                  PointLedger.for_points(meta.points))
    images = ImageFiles(run, ImageSettings())
    for index, count, extra in chunks:
        store.add_result("sum", "p", index, count, {"mca": spectra[index:index + count]}, extra)
        stop, failed = run.ledger.check(index, count, extra)
        images.write(index, stop, {"mca": spectra[index:stop]}, failed)
        run.ledger.mark_result(index, stop, failed, extra)
    _, _, total, points = store.reduced("sum", "p/mca", "sum")
    assert points == images.products["mca"].count == 11
    np.testing.assert_allclose(total, np.delete(spectra, 9, axis=0).sum(axis=0))
    np.testing.assert_allclose(images.products["mca"].values, total)
    images.abandon()
