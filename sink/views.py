"""What a viewer is shown of a product: the live picture and its axes.

One function decides it for Lavue's ZMQ stream and for the Tango preview
attribute, so both show the same thing:

* a scalar per point: the map (2-D for a raster, 1-D for a line or points);
* a 1-D result per point on a line or points scan: the stack, point x channel;
* a 1-D result per point on a raster (spectra, patterns): its sum over the
  points received so far (the sum spectrum or pattern of the scan);
* a 2-D result per point (frames): the latest received point's value.

Arrays come back in Lavue's orientation (``xy[x, y]``, x = fast axis); a Tango
image attribute wants rows first, which is ``xy.T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from services.ledger import RECEIVED
from services.placement import cells
from services.scan import axis_values
from sink.derived import SUM
from sink.store import Product, ScanEntry


@dataclass(frozen=True)
class LiveFrame:
    xy: np.ndarray  # a copy, safe to send while the store moves on
    meta: dict[str, Any]  # name, axisscales, axislabels and scan facts (Lavue passes them through)


def _scale(values: np.ndarray | None) -> tuple[float, float]:
    """(origin, step) of evenly spaced set points, (0, 1) without them."""
    if values is None or len(values) == 0:
        return 0.0, 1.0
    step = float(values[1] - values[0]) if len(values) > 1 else 1.0
    return float(values[0]), step or 1.0


def live_frame(entry: ScanEntry, product: Product) -> LiveFrame | None:
    """The product's current picture; ``None`` when nothing can be shown yet
    (no point received) or the product has no picture (3-D points)."""
    meta = entry.meta
    names, units = meta.axis_names, meta.axis_units
    info: dict[str, Any] = {"scan": entry.scan_id, "product": product.name, "version": product.version,
                            **{k: v for k, v in entry.counts().items() if k in ("expected", "received")}}
    point_ndim = len(product.point_shape)
    if point_ndim == 0 and meta.geometry_type == "raster":
        fast, slow = axis_values(meta)
        (x0, dx), (y0, dy) = _scale(fast), _scale(slow)
        xy = np.ascontiguousarray(product.data.T)
        info |= {"axisscales": [x0, y0, dx, dy], "axislabels": [names[0], names[1], units[0], units[1]]}
    elif point_ndim == 0:
        values = axis_values(meta)
        x0, dx = _scale(values[0] if values else None)
        xy = product.data.copy()
        info |= {"axisscales": [x0, 0.0, dx, 1.0],
                 "axislabels": [names[0] if names else "point", "", units[0] if units else "", ""]}
    elif point_ndim == 1 and meta.geometry_type != "raster":
        values = axis_values(meta)
        x0, dx = _scale(values[0] if values else None)
        xy = product.data.copy()
        info |= {"axisscales": [x0, 0.0, dx, 1.0],
                 "axislabels": [names[0] if names else "point", "channel", units[0] if units else "", ""]}
    elif point_ndim == 1:  # spectra or patterns on a raster: the scan's sum so far, what users watch
        running = product.running.get(SUM)
        if running is None or not running.points:
            return None
        xy = running.value.copy()
        info |= {"points": running.points, "axislabels": ["channel", "", "", ""]}
    elif point_ndim == 2:
        received = np.flatnonzero(entry.runs[product.pipeline].state == RECEIVED)
        if not received.size:
            return None
        last = int(received[-1])
        cell = int(cells(meta, last))
        value = product.flat[cell]
        xy = np.ascontiguousarray(value.T)
        info |= {"index": last, "axislabels": ["channel" if point_ndim == 1 else "x", "y", "", ""]}
    else:
        return None
    info["name"] = f"{entry.scan_id} {product.name} #{product.version}"
    return LiveFrame(xy, info)


def decimate(image: np.ndarray, max_side: int) -> np.ndarray:
    """Every k-th row and column so that no side exceeds ``max_side`` (a
    preview must stay small whatever the scan size)."""
    steps = tuple(max(1, -(-n // max_side)) for n in image.shape)
    return np.ascontiguousarray(image[tuple(slice(None, None, s) for s in steps)])


def preview_image(frame: LiveFrame, max_side: int) -> np.ndarray:
    """The frame as a Tango image (rows first, float64, at most ``max_side`` a side)."""
    image = frame.xy.T if frame.xy.ndim == 2 else frame.xy.reshape(1, -1)
    image = decimate(image, max_side)
    return image.real.astype(np.float64) if image.dtype.kind == "c" else image.astype(np.float64, copy=False)
