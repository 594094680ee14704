"""Maps on the positions the beam really had, resampled onto a regular grid.

A raster map puts point ``i`` into the cell its *commanded* position names.
When the stage lags, drifts or the encoders lie, that cell is wrong: snake
scans zig-zag, long scans shear. With the measured (corrected) positions of
every point (the ``position`` pipeline's products) the sink can place each
value where it was taken and resample onto the scan's nominal grid, in motor
units: piecewise-linear interpolation on the Delaunay triangulation of the
measured positions. Cells outside the measured area stay NaN: no value is
invented where the beam never was.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import LinearNDInterpolator


class RegridError(ValueError):
    """The positions cannot carry a regrid; the message says why."""


def regrid(values: np.ndarray, x: np.ndarray, y: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray) -> np.ndarray:
    """``values`` taken at (``x``, ``y``) (any shape, same for all three),
    resampled at every (grid_x[col], grid_y[row]): shape (len(grid_y), len(grid_x))."""
    values, x, y = (np.asarray(a, dtype=np.float64).ravel() for a in (values, x, y))
    if not values.shape == x.shape == y.shape:
        raise RegridError(f"{values.size} values for {x.size} x and {y.size} y positions")
    ok = np.isfinite(values) & np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        raise RegridError(f"only {int(ok.sum())} points have a value and a position; a regrid needs 3")
    points = np.column_stack([x[ok], y[ok]])
    try:
        interpolate = LinearNDInterpolator(points, values[ok], fill_value=np.nan)
    except Exception as exc:  # scipy's Qhull refuses collinear or degenerate positions
        raise RegridError(f"the measured positions span no area: {exc}") from None
    gx, gy = np.meshgrid(np.asarray(grid_x, float), np.asarray(grid_y, float))
    return interpolate(gx, gy)
