"""The sink's table of derived products (sink/derived.py), applied by the
store without knowing any entry: a new entry works as one line of the table."""

from __future__ import annotations

import numpy as np
import pytest

from services import protocol
from support.documents import profile_document
from services.scan import parse_scan
from sink import derived
from sink.queries import answer
from sink.store import ScanStore, StoreError

PIPE = "xrf"


def raster_store(rows: int = 3, cols: int = 4) -> ScanStore:
    geometry = {"type": "raster", "snake": True, "axes": [
        {"name": "samx", "units": "um", "start": 0.0, "stop": 3.0, "points": cols},
        {"name": "samy", "units": "um", "start": 0.0, "stop": 2.0, "points": rows}]}
    store = ScanStore(10**7)
    store.start(parse_scan(profile_document("s", 1, rows * cols, PIPE, geometry=geometry)), PIPE)
    return store


def test_a_new_map_product_is_one_entry(monkeypatch) -> None:
    ratio = derived.MapProduct("fe_over_zn", ("Fe", "Zn"), "Fe and Zn maps", applies=lambda meta: True,
                               compute=lambda meta, maps: maps[0] / maps[1])
    monkeypatch.setattr(derived, "MAP_PRODUCTS", (*derived.MAP_PRODUCTS, ratio))
    monkeypatch.setattr("sink.store.MAP_PRODUCTS", derived.MAP_PRODUCTS)
    store = raster_store()
    fe, zn = np.arange(1.0, 13.0), np.full(12, 2.0)
    store.add_result("s", PIPE, 0, 12, {"Fe": fe, "Zn": zn})
    _, arrays = answer(store, {"op": "get", "scan": "s", "product": f"{PIPE}/fe_over_zn"})  # while running
    fe_map = store.product("s", f"{PIPE}/Fe")[1].data
    np.testing.assert_array_equal(arrays["data"], fe_map / 2.0)
    assert f"{PIPE}/fe_over_zn" not in store.entry("s").products
    store.end("s", PIPE)
    np.testing.assert_array_equal(store.product("s", f"{PIPE}/fe_over_zn")[1].data, fe_map / 2.0)
    with pytest.raises(StoreError, match="no Fe and Zn maps from 'other'"):
        store.derive("s", "other", "fe_over_zn")


def test_an_aborted_scan_stores_no_derived_product() -> None:
    store = raster_store()
    store.add_result("s", PIPE, 0, 12, {"gradient_x": np.ones(12), "gradient_y": np.zeros(12)})
    store.end("s", PIPE, aborted=True)
    assert f"{PIPE}/phase" not in store.entry("s").products


def test_running_sums_are_kept_for_1d_points_only() -> None:
    store = raster_store()
    spectra = np.arange(12 * 5, dtype=np.uint16).reshape(12, 5)
    store.add_result("s", PIPE, 0, 12, {"mca": spectra, "Fe": np.ones(12), "frame": np.ones((12, 2, 2))},
                     {protocol.META_ERRORS: {"4": "fit failed"}})
    entry, product, total, points = store.reduced("s", f"{PIPE}/mca", derived.SUM)
    np.testing.assert_array_equal(total, np.delete(spectra, 4, axis=0).sum(axis=0))
    assert points == 11 and total.dtype == np.float64
    for name, ndim in (("Fe", 0), ("frame", 2)):
        assert not store.product("s", f"{PIPE}/{name}")[1].running
        with pytest.raises(StoreError, match=f"{ndim}-D points; sums are kept for 1-D ones"):
            answer(store, {"op": "get", "scan": "s", "product": f"{PIPE}/{name}", "reduce": "sum"})
