"""How a product is shown (services/display.py): the decision table per
geometry and per-point shape, live and final, and that the sink's viewers and
the image writer both follow it."""

from __future__ import annotations

import numpy as np
import pytest

from services import display
from services.display import FRAME, LATEST, MAP, PRODUCT, SPECTRUM, STACK, SUM, TRACE
from support.documents import profile_document
from services.scan import parse_scan


def scan(kind: str, rows: int = 3, cols: int = 4):
    geometries = {
        "raster": {"type": "raster", "axes": [
            {"name": "samx", "units": "um", "start": -3.0, "stop": 3.0, "points": cols},
            {"name": "samy", "units": "um", "start": 10.0, "stop": 12.0, "points": rows}]},
        "line": {"type": "line", "axes": [{"name": "samz", "units": "mm", "start": 1.0, "stop": 2.0,
                                          "points": rows * cols}]},
        "points": {"type": "points", "points": rows * cols, "axes": [  # a spiral's positions are no scale
            {"name": "samx", "units": "um", "positions": np.random.default_rng(0).random(rows * cols).tolist()}]},
    }
    return parse_scan(profile_document(f"d-{kind}", 1, rows * cols, "p", geometry=geometries[kind]))


TABLE = [  # geometry, per-point shape, (kind, source) live, (kind, source) final
    ("raster", (), (MAP, PRODUCT), (MAP, PRODUCT)),
    ("line", (), (TRACE, PRODUCT), (TRACE, PRODUCT)),
    ("points", (), (TRACE, PRODUCT), (TRACE, PRODUCT)),
    ("raster", (64,), (SPECTRUM, SUM), (SPECTRUM, SUM)),
    ("line", (64,), (STACK, PRODUCT), (STACK, PRODUCT)),
    ("points", (64,), (STACK, PRODUCT), (STACK, PRODUCT)),
    ("raster", (8, 6), (FRAME, LATEST), (FRAME, SUM)),  # live: what the detector sees now; final: the overview
    ("line", (8, 6), (FRAME, LATEST), (FRAME, SUM)),
    ("points", (8, 6), (FRAME, LATEST), (FRAME, SUM)),
]


@pytest.mark.parametrize("kind, point_shape, live, final", TABLE)
def test_the_decision_table(kind: str, point_shape: tuple, live: tuple, final: tuple) -> None:
    meta = scan(kind)
    for moment, want in ((True, live), (False, final)):
        picture = display.picture(meta, point_shape, live=moment)
        assert (picture.kind, picture.source) == want, (kind, point_shape, moment)
        assert (picture.y is None) == (picture.kind in (TRACE, SPECTRUM))  # curves have no y axis
    for moment in (True, False):
        assert display.picture(meta, (2, 3, 4), live=moment) is None  # 3-D points: no picture


def test_axes_carry_motors_units_and_positions() -> None:
    picture = display.picture(scan("raster"), (), live=True)
    assert (picture.x.label, picture.x.unit, picture.y.label, picture.y.unit) == ("samx", "um", "samy", "um")
    assert picture.x.scale() == (-3.0, 2.0) and picture.y.scale() == (10.0, 1.0)
    line = display.picture(scan("line"), (64,), live=False)
    assert (line.x.label, line.x.unit, line.y.label) == ("samz", "mm", "channel")
    assert line.x.scale() == pytest.approx((1.0, 1 / 11))
    points = display.picture(scan("points"), (), live=True)  # arbitrary positions are no scale
    assert points.x.label == "acquisition index" and points.x.values is None and points.x.scale() == (0.0, 1.0)
    frame = display.picture(scan("raster"), (8, 6), live=False)
    assert frame.y_down and frame.log and (frame.x.label, frame.y.label) == ("pixel x", "pixel y")
    assert display.picture(scan("raster"), (64,), live=True).log  # a sum spectrum spans decades


def test_images_are_rows_along_y_and_columns_along_x() -> None:
    stack = np.arange(12 * 5.0).reshape(12, 5)  # stored point x channel
    picture = display.picture(scan("line"), (5,), live=True)
    assert picture.image(stack).shape == (5, 12) and np.shares_memory(picture.image(stack), stack)
    square = np.arange(12.0).reshape(3, 4)  # a map is stored rows = slow = y already
    assert display.picture(scan("raster"), (), live=True).image(square) is square


@pytest.mark.parametrize("kind, point_shape, live, final", TABLE)
def test_the_sink_and_the_image_writer_follow_the_table(tmp_path, kind, point_shape, live, final) -> None:
    from services.ledger import PointLedger
    from sink.store import ScanStore
    from sink.views import live_frame
    from writers.component import ScanRun
    from writers.images import ImageFiles, ImageSettings
    from writers.layout import OutputLayout

    meta = scan(kind)
    values = np.random.default_rng(2).random((meta.points, *point_shape)) + 1.0
    store = ScanStore(10**7)
    store.start(meta, "p")
    store.add_result(meta.scan_id, "p", 0, meta.points, {"r": values})
    frame = live_frame(*store.product(meta.scan_id, "p/r"))
    run = ScanRun(meta, "p", OutputLayout(tmp_path).stem(meta, "p"), "test/writer/unit",
                  PointLedger.for_points(meta.points))
    images = ImageFiles(run, ImageSettings())
    images.write(0, meta.points, {"r": values}, np.zeros(0, np.int64))
    acc = images.products["r"]
    assert (acc.picture.kind, acc.picture.source) == final
    source = live[1]
    if source == LATEST:
        np.testing.assert_allclose(frame.xy, values[-1].T)  # Lavue: x first
        np.testing.assert_allclose(acc.values, values.sum(axis=0))
    elif source == SUM:
        np.testing.assert_allclose(frame.xy, values.sum(axis=0))
        np.testing.assert_allclose(acc.values, values.sum(axis=0))
    else:
        stored = store.product(meta.scan_id, "p/r")[1].data
        np.testing.assert_allclose(acc.values, stored)  # the same picture from the same values
        picture = display.picture(meta, point_shape, live=True)
        image = picture.image(stored)
        np.testing.assert_allclose(frame.xy, image.T if image.ndim == 2 else image)
    images.abandon()
