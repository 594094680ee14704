"""Comparing products of two runs of the same data (a replay, another host layout)."""

from __future__ import annotations

import numpy as np

#: Relative rounding allowed between two runs of the same events in
#: floating-point results: the events are cut into other units of work, and
#: batched float32 products (xrf's projections) round by the batch's size,
#: to about 1e-5 of a product's largest value.
BATCH_ROUNDING = 1e-5


def same_product(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal: integers bit for bit, floating point to :data:`BATCH_ROUNDING`, NaN where NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        scale = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 0.0  # float32 rounds by the largest term
        return bool(np.allclose(a, b, rtol=BATCH_ROUNDING, atol=BATCH_ROUNDING * scale, equal_nan=True))
    return bool(np.array_equal(a, b))
