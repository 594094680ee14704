"""Where acquisition indices land in a map (services/placement.py): hand-written
maps of every geometry, snake unfolding against a brute-force loop, cells as a
bijection onto the map, and chunk placement by blocks against single cells."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.placement import blocks, cells, place
from services.scan import ScanError, ScanMeta, parse_scan
from support.documents import axis, minimal, raster


def grid_position(meta: ScanMeta, indices: Any) -> tuple[np.ndarray, ...]:
    """(rows, cols) of a raster, (indices,) otherwise: the cells unravelled."""
    return np.unravel_index(cells(meta, indices), meta.map_shape)


def geometry(kind: str, rows: int, cols: int) -> ScanMeta:
    if kind == "points":
        return parse_scan(minimal({"type": "points", "points": rows * cols}))
    if kind == "line":
        return parse_scan(minimal({"type": "line", "axes": [axis("samx", rows * cols)]}))
    return raster(cols, rows, snake=kind == "snake")


BY_HAND = {  # 3 rows x 4 columns, index i written where a beamline scientist expects it
    "raster": [[0, 1, 2, 3],
               [4, 5, 6, 7],
               [8, 9, 10, 11]],
    "snake": [[0, 1, 2, 3],
              [7, 6, 5, 4],
              [8, 9, 10, 11]],
    "line": list(range(12)),
    "points": list(range(12)),
}


@pytest.mark.parametrize("kind", sorted(BY_HAND))
def test_placement_matches_the_hand_written_map(kind: str) -> None:
    meta = geometry(kind, 3, 4)
    want = np.array(BY_HAND[kind])
    values = np.arange(12) * 10
    for chunks in ([12], [1] * 12, [5, 7], [3, 1, 6, 2]):  # however the scan is cut into chunks
        got = np.full(meta.map_shape, -1)
        start = 0
        for size in chunks:
            place(got, blocks(meta, start, start + size), values[start:start + size])
            start += size
        np.testing.assert_array_equal(got, want * 10, err_msg=f"{kind} in chunks {chunks}")
    flat = np.full(12, -1)
    flat[cells(meta, np.arange(12))] = np.arange(12)
    np.testing.assert_array_equal(flat.reshape(meta.map_shape), want)


@pytest.mark.parametrize("kind", ["raster", "snake", "line"])
def test_place_writes_spectra_and_frames_like_single_cells(kind: str) -> None:
    meta = geometry(kind, 6, 5)
    spectra = np.random.default_rng(4).random((30, 3, 2))
    got = np.full((*meta.map_shape, 3, 2), np.nan)
    place(got, blocks(meta, 7, 23), spectra[7:23])
    want = np.full((30, 3, 2), np.nan)
    want[cells(meta, np.arange(7, 23))] = spectra[7:23]
    np.testing.assert_array_equal(got, want.reshape(got.shape))


@pytest.mark.parametrize("snake", [False, True])
@pytest.mark.parametrize("rows, cols", [(3, 4), (5, 1), (4, 7), (1, 6)])
def test_blocks_of_every_chunk_agree_with_cells(rows: int, cols: int, snake: bool) -> None:
    meta = raster(cols, rows, snake)
    n = rows * cols
    for start in range(n):
        for stop in range(start + 1, n + 1):
            src = np.arange(start, stop)
            got = np.full(meta.map_shape, -1)
            place(got, blocks(meta, start, stop), src)
            want = np.full(n, -1)
            want[cells(meta, src)] = src
            np.testing.assert_array_equal(got.reshape(-1), want, err_msg=f"[{start}, {stop})")


def test_a_plain_raster_chunk_is_at_most_three_blocks() -> None:
    assert len(blocks(raster(7, 50), 3, 340)) == 3  # head, whole rows, tail
    assert len(blocks(raster(7, 50, snake=True), 3, 340)) == 49  # a snake: one per row touched
    with pytest.raises(ScanError, match=r"points \[3, 351\) outside \[0, 350\)"):
        blocks(raster(7, 50), 3, 351)


def brute_force(n_fast: int, n_slow: int, snake: bool) -> list[tuple[int, int]]:
    """The scan as the motors run it: cell of every acquisition index in order."""
    order = []
    for row in range(n_slow):
        cols = range(n_fast)
        if snake and row % 2 == 1:
            cols = reversed(cols)
        order.extend((row, col) for col in cols)
    return order


@pytest.mark.parametrize("snake", [False, True])
@pytest.mark.parametrize("n_slow, n_fast", [(1, 1), (1, 6), (6, 1), (3, 4), (4, 3), (5, 7)])
def test_snake_unfolding_matches_brute_force(n_slow: int, n_fast: int, snake: bool) -> None:
    meta = raster(n_fast, n_slow, snake)
    assert meta.map_shape == (n_slow, n_fast)
    rows, cols = grid_position(meta, np.arange(meta.points))
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert list(zip(rows.tolist(), cols.tolist())) == brute_force(n_fast, n_slow, snake)
    # a block in the middle, any integer dtype, and a scalar
    block = np.arange(meta.points // 2, meta.points, dtype=np.uint32)
    r, c = grid_position(meta, block)
    assert list(zip(r.tolist(), c.tolist())) == brute_force(n_fast, n_slow, snake)[meta.points // 2:]
    r, c = grid_position(meta, meta.points - 1)
    assert (int(r), int(c)) == brute_force(n_fast, n_slow, snake)[-1]


def test_line_and_points_positions_are_the_indices() -> None:
    for geometry in ({"type": "line", "axes": [axis("x", 5)]}, {"type": "points", "points": 5}):
        meta = parse_scan(minimal(geometry))
        (pos,) = grid_position(meta, np.array([4, 0, 2], dtype=np.int32))
        assert pos.dtype == np.int64 and pos.tolist() == [4, 0, 2]


@pytest.mark.parametrize("bad", [[-1], [12], [0, 5, 12], np.array([2**40], dtype=np.uint64)])
def test_out_of_range_indices_are_refused(bad: Any) -> None:
    meta = raster(4, 3)
    with pytest.raises(ScanError, match=r"scan scan-1: acquisition index -?\d+ outside \[0, 12\)"):
        grid_position(meta, bad)
    line = parse_scan(minimal({"type": "line", "axes": [axis("x", 12)]}))
    with pytest.raises(ScanError, match="outside"):
        grid_position(line, bad)


@pytest.mark.parametrize("bad", [[0.0, 1.0], [True], ["1"]])
def test_non_integer_indices_are_refused(bad: Any) -> None:
    with pytest.raises(ScanError, match="must be integers"):
        grid_position(raster(4, 3), bad)


def test_empty_indices() -> None:
    rows, cols = grid_position(raster(4, 3, snake=True), [])
    assert rows.shape == cols.shape == (0,)


@settings(max_examples=200, deadline=None)
@given(n_fast=st.integers(1, 40), n_slow=st.integers(1, 40), snake=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_cells_are_a_bijection_onto_the_map(n_fast: int, n_slow: int, snake: bool, seed: int) -> None:
    meta = raster(n_fast, n_slow, snake)
    order = np.random.default_rng(seed).permutation(meta.points)  # arrival order does not matter
    rows, cols = grid_position(meta, order)
    assert ((rows >= 0) & (rows < n_slow) & (cols >= 0) & (cols < n_fast)).all()
    hits = np.zeros(meta.map_shape, dtype=np.int64)
    np.add.at(hits, (rows, cols), 1)
    assert (hits == 1).all()
    # consecutive indices are neighbouring cells: the motors never jump (except a row change without snake)
    rows, cols = grid_position(meta, np.arange(meta.points))
    steps = np.abs(np.diff(rows)) + np.abs(np.diff(cols))
    same_row = np.diff(rows) == 0
    assert (steps[same_row] == 1).all()
    if snake:
        assert (steps == 1).all()
