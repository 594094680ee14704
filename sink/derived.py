"""What the sink derives from the results it holds: one table, applied by the store.

The store (sink/store.py) knows nothing about any entry here; it applies the
table generically. Adding a derived product is one entry.

``REDUCTIONS`` are kept per product and updated with every chunk, so that a
viewer or a query has them at once while the scan runs (a viewer at 5 Hz sees
one point in hundreds and could not sum them itself). A query asks for one
with ``get``'s ``reduce`` (services/schemas/sink-query.json lists the names).

* ``sum``, kept for every product of 1-D points: the chunk's points are
  added as they arrive, failed points left out and a point delivered twice
  summed once (the sum spectrum or pattern).

``MAP_PRODUCTS`` are computed from whole maps of the same pipeline's
products. Each is stored as ``<pipeline>/<name>`` when that pipeline ends the
scan normally (not on abort: a half scan's integral misleads), and computed on
demand by a query before that.

* ``phase`` from ``gradient_x`` and ``gradient_y`` on a raster: the DPC phase,
  Fourier-integrated (sink/phase.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from services.ledger import sum_of_points
from services.scan import ScanMeta, axis_values
from sink.phase import integrate_gradients

SUM = "sum"


@dataclass
class Running:
    """The current value of one reduction of one product, and its points."""

    value: np.ndarray
    points: int = 0


@dataclass(frozen=True)
class RunningReduction:
    name: str  # the query's "reduce"
    kept_for: Callable[[tuple[int, ...]], bool]  # per-point shapes that have it
    refusal: str  # why a product without it has none, for the error
    start: Callable[[tuple[int, ...]], np.ndarray]  # the value before any point, from the per-point shape
    add: Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (value, chunk, rows left out), in place


@dataclass(frozen=True)
class MapProduct:
    name: str  # the product is <pipeline>/<name>
    inputs: tuple[str, ...]  # results of the same pipeline, as maps, in this order
    needs: str  # what it needs, in words, for the error when it cannot be computed
    applies: Callable[[ScanMeta], bool]  # geometries it is defined for
    compute: Callable[[ScanMeta, list[np.ndarray]], np.ndarray]  # maps -> map_shape (+ point shape)


def _add_sum(total: np.ndarray, chunk: np.ndarray, skip: np.ndarray) -> None:
    total += sum_of_points(chunk, skip)


def _phase(meta: ScanMeta, maps: list[np.ndarray]) -> np.ndarray:
    fast, slow = axis_values(meta)
    steps = [float(v[1] - v[0]) if len(v) > 1 else 1.0 for v in (fast, slow)]
    return integrate_gradients(*maps, *steps)


REDUCTIONS: tuple[RunningReduction, ...] = (
    RunningReduction(SUM, kept_for=lambda point_shape: len(point_shape) == 1, refusal="sums are kept for 1-D ones",
                     start=lambda point_shape: np.zeros(point_shape), add=_add_sum),
)

MAP_PRODUCTS: tuple[MapProduct, ...] = (
    MapProduct("phase", ("gradient_x", "gradient_y"), "DPC gradients (gradient_x, gradient_y) on a raster",
               applies=lambda meta: meta.geometry_type == "raster", compute=_phase),
)


def reduction(name: str) -> RunningReduction | None:
    return next((r for r in REDUCTIONS if r.name == name), None)


def map_product(name: str) -> MapProduct | None:
    return next((m for m in MAP_PRODUCTS if m.name == name), None)
