"""Small scan geometries and where each point lands, written out by hand."""

from __future__ import annotations


def scan_geometry(kind: str, rows: int = 5, cols: int = 7) -> dict:
    """A small scan geometry: ``raster``, ``snake`` (rows x cols) or ``line``."""
    if kind == "line":
        return {"type": "line", "axes": [{"name": "samx", "units": "mm", "start": 1.0, "stop": 2.0,
                                          "points": rows * cols}]}
    return {"type": "raster", "snake": kind == "snake", "axes": [
        {"name": "samx", "units": "um", "start": -3.0, "stop": 3.0, "points": cols},
        {"name": "samy", "units": "um", "start": 10.0, "stop": 12.0, "points": rows}]}


def map_by_hand(kind: str, values, rows: int, cols: int):
    """Where a beamline scientist expects each point of :func:`scan_geometry`,
    written out point by point rather than with the code under test."""
    import numpy as np

    values = np.asarray(values)
    if kind == "line":
        return values.copy()
    out = np.empty((rows, cols, *values.shape[1:]), values.dtype)
    for i, v in enumerate(values):
        r, c = divmod(i, cols)
        if kind == "snake" and r % 2:
            c = cols - 1 - c
        out[r, c] = v
    return out
