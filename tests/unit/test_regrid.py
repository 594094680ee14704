"""Regridding a map onto the positions the beam really had (sink.regrid and
the store's query): exact for a plane, NaN where the beam never was, clear
errors where the positions cannot carry it."""

from __future__ import annotations

import numpy as np
import pytest

from support import scan_geometry
from services.sim.profiles import PROFILES, ProfileScan
from services.scan import axis_values, parse_scan
from sink.regrid import RegridError, regrid
from sink.store import ScanStore, StoreError


def plane(x, y):
    return 3.0 * x - 2.0 * y + 1.0


def test_a_plane_sampled_at_shifted_positions_comes_back_exactly() -> None:
    gx, gy = np.linspace(0, 10, 11), np.linspace(0, 5, 6)
    x, y = np.meshgrid(gx, gy)
    rng = np.random.default_rng(1)
    # the beam lagged by 0.3 on even rows and led by 0.3 on odd ones (a snake's zig-zag), plus jitter
    x_true = x + np.where(np.arange(6)[:, None] % 2, 0.3, -0.3) + rng.normal(0, 0.02, x.shape)
    y_true = y + rng.normal(0, 0.02, y.shape)
    out = regrid(plane(x_true, y_true), x_true, y_true, gx, gy)
    inside = np.isfinite(out)
    assert inside.sum() > 0.8 * out.size
    np.testing.assert_allclose(out[inside], plane(x, y)[inside], atol=1e-9)
    nominal = plane(x_true, y_true)  # what the nominal map shows at the cells: off by the lag
    assert np.abs(nominal - plane(x, y)).max() > 0.8
    assert not np.isfinite(out[:, 0]).all() or not np.isfinite(out[:, -1]).all()  # outside: NaN, not invented


def test_positions_that_cannot_carry_a_regrid_are_refused() -> None:
    g = np.linspace(0, 1, 3)
    with pytest.raises(RegridError, match="needs 3"):
        regrid(np.array([1.0, np.nan, 2.0]), np.arange(3.0), np.arange(3.0), g, g)
    with pytest.raises(RegridError, match="span no area"):
        regrid(np.ones(5), np.arange(5.0), np.arange(5.0), g, g)  # on a line
    with pytest.raises(RegridError, match="values for"):
        regrid(np.ones(4), np.arange(5.0), np.arange(5.0), g, g)


def snake_store(scan_id: str, rows: int, cols: int, *pipelines: str):
    """A store with a snake raster started for ``pipelines``, and each index's (row, col) by hand."""
    doc = ProfileScan(PROFILES["counters"], pipelines[0], rows * cols,
                      geometry=scan_geometry("snake", rows, cols)).document(scan_id, 1)
    meta = parse_scan(doc)
    store = ScanStore(64 * 2**20)
    for pipeline in pipelines:
        store.start(meta, pipeline)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return store, meta, r, np.where(r % 2 == 1, cols - 1 - c, c)


def test_the_store_regrids_a_product_on_a_position_pipeline() -> None:
    store, meta, r, c = snake_store("r1", 5, 7, "p1", "pos")
    grid_x, grid_y = axis_values(meta)
    idx = np.arange(meta.points)
    x, y = grid_x[c] + 0.1, grid_y[r]  # every point 0.1 um right of its nominal cell
    store.add_result("r1", "pos", 0, len(idx), {"samx": x, "samy": y})
    store.add_result("r1", "p1", 0, len(idx), {"v": plane(x, y), "spectrum": np.ones((len(idx), 3))})
    _, _, out = store.regridded("r1", "p1/v", "pos")
    gx, gy = np.meshgrid(grid_x, grid_y)
    ok = np.isfinite(out)
    assert ok[:, 1:].all() and not ok[:, 0].any()  # the first column was never reached
    np.testing.assert_allclose(out[ok], plane(gx, gy)[ok], atol=1e-9)
    with pytest.raises(StoreError, match="only raster maps of scalars"):
        store.regridded("r1", "p1/spectrum", "pos")
    with pytest.raises(StoreError, match="no product 'nope/samx'"):
        store.regridded("r1", "p1/v", "nope")


def test_the_store_integrates_dpc_gradients_when_asked_and_at_scan_end() -> None:
    from sink.queries import answer

    store, meta, r, c = snake_store("d1", 6, 8, "dpc")
    grid_x, grid_y = axis_values(meta)
    gx, gy = np.meshgrid(grid_x, grid_y)
    phase = 0.2 * gx**2 - 0.5 * gy  # gradients 0.4 x and -0.5
    idx = np.arange(meta.points)
    store.add_result("d1", "dpc", 0, len(idx), {"gradient_x": 0.4 * gx[r, c], "gradient_y": np.full(len(idx), -0.5)})
    meta_reply, arrays = answer(store, {"op": "get", "scan": "d1", "product": "dpc/phase"})  # while running
    assert "dpc/phase" not in store.entry("d1").products
    truth = phase - phase.mean()
    assert np.corrcoef(arrays["data"].ravel(), truth.ravel())[0, 1] > 0.99
    store.end("d1", "dpc")
    _, stored = store.product("d1", "dpc/phase")
    np.testing.assert_allclose(stored.data, arrays["data"])
    with pytest.raises(StoreError, match="no DPC gradients"):
        store.derive("d1", "other", "phase")
