"""How to show a product: one decision for every viewer and image.

The sink's viewers (Lavue's stream and the Tango preview, sink/views.py) and
the image writer (writers/images.py) draw the same picture of a product; each
renders it its own way. The picture depends only on the scan geometry and the
product's per-point shape:

==================  ==============================  ==============================
per point           raster                          line / points
==================  ==============================  ==============================
scalar              MAP: the 2-D map, motor axes    TRACE: value against the motor
                                                    (points: the acquisition index)
1-D (spectrum)      SPECTRUM: the sum over the      STACK: point x channel image
                    points received
2-D (frame)         FRAME: live, the latest point   the same
                    received; final, the sum
more                nothing                         nothing
==================  ==============================  ==============================

Why. A map of spectra cannot be one picture, and a single spectrum at a
millisecond dwell is mostly noise, so the scan's sum spectrum is what users
watch, live and afterwards. Along a line, the stack shows how the pattern
changes from point to point, which the sum would hide. For frames the moment
decides: watching a scan live, the latest frame tells what the detector sees
now (beam on the sample, beamstop, saturation) and a sum would hide a change
for minutes; the final image of the scan is the summed frame, the overview of
everything the scan saw. docs/sink.md and docs/writers.md say the same.

A points scan's positions are arbitrary (a spiral, a list of spots), so its
trace and stack run against the acquisition index, never a motor scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.scan import ScanMeta, axis_values

# what is drawn
MAP, TRACE, STACK, SPECTRUM, FRAME = "map", "trace", "stack", "spectrum", "frame"
# which values it is drawn from
PRODUCT = "product"  # the product as stored, in map shape
SUM = "sum"  # the sum over the points received, failed points left out
LATEST = "latest"  # the value of the latest point received


@dataclass(frozen=True, eq=False)
class Axis:
    """One axis of a picture: what it is, its unit, and the positions of the
    samples along it (``None``: 0, 1, 2, ...)."""

    label: str
    unit: str = ""
    values: np.ndarray | None = None

    def scale(self) -> tuple[float, float]:
        """(origin, step) of evenly spaced positions, (0, 1) without them."""
        if self.values is None or len(self.values) == 0:
            return 0.0, 1.0
        step = float(self.values[1] - self.values[0]) if len(self.values) > 1 else 1.0
        return float(self.values[0]), step or 1.0


@dataclass(frozen=True, eq=False)
class Picture:
    """What to draw of a product. ``y`` is None for a curve (values against
    ``x``). ``log``: summed counts, best on a log scale where they span
    decades. ``y_down``: image row 0 at the top (a detector frame), else at
    the bottom (a map or stack, as the sample and the channels lie)."""

    kind: str
    source: str
    x: Axis
    y: Axis | None = None
    log: bool = False
    y_down: bool = False

    def image(self, values: np.ndarray) -> np.ndarray:
        """``values`` (the product, its sum or its latest point) as the picture
        wants it: rows along ``y`` and columns along ``x`` for an image (a
        stack is stored point x channel, so it is transposed; a view, no copy),
        unchanged for a curve."""
        return values.T if self.kind == STACK else values


def picture(meta: ScanMeta, point_shape: tuple[int, ...], live: bool) -> Picture | None:
    """The picture of a product of ``meta`` whose points have ``point_shape``;
    ``live`` for a viewer during the scan, false for the scan's final image.
    None for points of more than two dimensions."""
    ndim = len(point_shape)
    raster = meta.geometry_type == "raster"
    if ndim == 0 and raster:
        fast, slow = _motor_axes(meta)
        return Picture(MAP, PRODUCT, fast, slow)
    if ndim == 0:
        return Picture(TRACE, PRODUCT, _point_axis(meta))
    if ndim == 1 and raster:
        return Picture(SPECTRUM, SUM, Axis("channel"), log=True)
    if ndim == 1:
        return Picture(STACK, PRODUCT, _point_axis(meta), Axis("channel"))
    if ndim == 2:
        return Picture(FRAME, LATEST if live else SUM, Axis("pixel x"), Axis("pixel y"), log=not live, y_down=True)
    return None


def _motor_axes(meta: ScanMeta) -> tuple[Axis, Axis]:
    (fast_name, slow_name), (fast_unit, slow_unit) = meta.axis_names, meta.axis_units
    fast, slow = axis_values(meta)
    return Axis(fast_name, fast_unit, fast), Axis(slow_name, slow_unit, slow)


def _point_axis(meta: ScanMeta) -> Axis:
    """The motor of a line; the acquisition index of a points scan."""
    if meta.geometry_type == "line":
        return Axis(meta.axis_names[0], meta.axis_units[0], axis_values(meta)[0])
    return Axis("acquisition index")
