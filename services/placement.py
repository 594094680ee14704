"""Where an acquisition index lands in a map: the one placement rule.

docs/scan-metadata.md ("Geometry") is the reference for integrators:

* raster: ``axes = [fast, slow]``; the map has shape ``(rows, cols) =
  (slow.points, fast.points)``; index ``i`` lands in row ``i // cols``, column
  ``i % cols``, and with ``snake`` odd rows run backwards (column
  ``cols - 1 - i % cols``). Column 0 is the fast axis' ``start``, row 0 the
  slow axis' ``start``, whichever way the motors ran.
* line and points: index ``i`` is cell ``i`` of a 1-D map.

Every consumer that puts points into a map (the sink's store, the NeXus and
image writers, the FIO writer's motor columns, the simulator's truth maps)
uses this module, so a map can never disagree with another about a cell.
Two forms, both vectorised because whole blocks arrive at kHz rates:

* :func:`cells` for scattered indices (failed points, the latest point);
* :func:`blocks` and :func:`place` for a chunk of consecutive indices,
  written as a few rectangular regions: slice copies are several times
  cheaper than fancy indexing for spectra and frames, and an HDF5 dataset
  takes a region as one hyperslab. ``place(map, blocks(meta, index, stop),
  values)``; a chunk's blocks serve all its products.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from services.scan import ScanError, ScanMeta


def cells(meta: ScanMeta, indices: Any) -> np.ndarray:
    """Flat (row-major) map cells of acquisition indices, snake rows unfolded:
    int64, the shape of ``indices``. ``np.unravel_index(cells, meta.map_shape)``
    gives (rows, cols). ScanError for a non-integer or out-of-range index,
    because a wrong cell would silently corrupt a map."""
    idx = np.asarray(indices)
    if idx.size == 0:
        idx = idx.astype(np.int64)
    if idx.dtype.kind not in "iu":
        raise ScanError(f"scan {meta.scan_id}: acquisition indices must be integers, not {idx.dtype}")
    points = meta.points
    if idx.size and (idx.min() < 0 or idx.max() >= points):
        bad = idx[(idx < 0) | (idx >= points)].flat[0]
        raise ScanError(f"scan {meta.scan_id}: acquisition index {bad} outside [0, {points})")
    idx = idx.astype(np.int64)
    if not meta.snake:
        return idx
    n_fast = meta.map_shape[1]
    rows, cols = np.divmod(idx, n_fast)
    return np.where(rows % 2 == 1, rows * n_fast + (n_fast - 1 - cols), idx)


class Block(NamedTuple):
    """A rectangular map region filled by consecutive points of a chunk."""

    region: tuple[slice, ...]  # indexes the map: (rows, cols) slices for a raster, one slice otherwise
    shape: tuple[int, ...]  # the region's shape
    points: slice  # the chunk's points (positions within the chunk) that fill it
    reverse: bool  # they run right to left (a snake's odd row)


def blocks(meta: ScanMeta, index: int, stop: int) -> list[Block]:
    """Rectangular map regions covering acquisition indices [index, stop):
    one for a line or points, at most three for a plain raster (head row,
    whole rows, tail row), one per row touched for a snake. A chunk's blocks
    serve every product of the chunk: compute them once."""
    if not 0 <= index < stop <= meta.points:
        raise ScanError(f"scan {meta.scan_id}: points [{index}, {stop}) outside [0, {meta.points})")
    if meta.geometry_type != "raster":
        return [Block((slice(index, stop),), (stop - index,), slice(0, stop - index), False)]
    cols = meta.map_shape[1]
    out: list[Block] = []
    start = index
    while start < stop:
        row, col = divmod(start, cols)
        if col == 0 and not meta.snake and stop - start >= cols:
            rows = (stop - start) // cols  # whole rows at once
            end = start + rows * cols
            out.append(Block((slice(row, row + rows), slice(0, cols)), (rows, cols),
                             slice(start - index, end - index), False))
        else:
            end = min(stop, (row + 1) * cols)
            backwards = meta.snake and row % 2 == 1
            span = slice(cols - (end - row * cols), cols - col) if backwards else slice(col, col + end - start)
            out.append(Block((slice(row, row + 1), span), (1, end - start), slice(start - index, end - index),
                             backwards))
        start = end
    return out


def place(target: Any, parts: list[Block], values: np.ndarray) -> None:
    """Write a chunk's ``values`` (one row per point) into ``target``, shaped
    ``map_shape + point_shape``: a numpy array or an h5py dataset (each block
    is one slice assignment, so one hyperslab). ``parts`` are the chunk's
    :func:`blocks`."""
    point_shape = values.shape[1:]
    for block in parts:
        part = values[block.points].reshape(*block.shape, *point_shape)
        target[block.region] = part[:, ::-1] if block.reverse else part
