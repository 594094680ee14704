"""What a viewer is shown of a product: the live picture and its axes.

services.display decides the picture (the same decision as the image
writer's); this module renders it for Lavue's ZMQ stream and the Tango preview
attribute, so both show the same thing. Live, a 2-D result per point shows
the latest received point's frame (docs/sink.md says why).

Arrays come back in Lavue's orientation (``xy[x, y]``, x = fast axis); a Tango
image attribute wants rows first, which is ``xy.T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from services import display
from services.ledger import RECEIVED
from services.placement import cells
from sink import derived
from sink.store import Product, ScanEntry


@dataclass(frozen=True)
class LiveFrame:
    xy: np.ndarray  # a copy, safe to send while the store moves on
    meta: dict[str, Any]  # name, axisscales, axislabels and scan facts (Lavue passes them through)


def live_frame(entry: ScanEntry, product: Product) -> LiveFrame | None:
    """The product's current picture; ``None`` when nothing can be shown yet
    (no point received) or the product has no picture (3-D points)."""
    picture = display.picture(entry.meta, product.point_shape, live=True)
    if picture is None:
        return None
    info: dict[str, Any] = {"scan": entry.scan_id, "product": product.name, "version": product.version,
                            **{k: v for k, v in entry.counts().items() if k in ("expected", "received")}}
    if picture.source == display.PRODUCT:
        values = product.data
    elif picture.source == display.SUM:
        running = product.running.get(derived.SUM)
        if running is None or not running.points:
            return None
        values = running.value
        info["points"] = running.points
    else:  # display.LATEST
        received = np.flatnonzero(entry.runs[product.pipeline].state == RECEIVED)
        if not received.size:
            return None
        last = int(received[-1])
        values = product.flat[int(cells(entry.meta, last))]
        info["index"] = last
    image = picture.image(values)
    xy = np.array(image.T if image.ndim == 2 else image, order="C")  # one copy, in Lavue's x-first order
    x, y = picture.x, picture.y or display.Axis("")
    info["axislabels"] = [x.label, y.label, x.unit, y.unit]
    if x.values is not None or y.values is not None:
        (x0, dx), (y0, dy) = x.scale(), y.scale()
        info["axisscales"] = [x0, y0, dx, dy]
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
