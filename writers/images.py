"""PNG images and plots of a scan's products, for a browser or the e-log.

Per scan and pipeline, one PNG per product, ``<stem>_<result>.png``. What each
shows is services.display's decision (the one the sink's viewers follow too),
as the scan's final picture:

* a scalar per point on a raster: the map, in motor units (row 0 = slow axis
  start at the bottom, as the sample lies), with a colour bar;
* a scalar per point on a line or point list: a line plot against the motor
  (or the acquisition index);
* a 1-D pattern or spectrum per point: on a raster the pattern summed over
  the scan; on a line or point list the stack, point x channel;
* a 2-D frame per point: the summed frame (log colour scale).

Colour scales span the 1st to 99th percentile of the finite values, so one
hot pixel does not flatten a map. Images are written at scan end, and, with
``interval_seconds``, refreshed during the scan; each write replaces the file
atomically. Only the final images get a checksum.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from services import display
from services.ledger import blank_failed, fill_value, sum_of_points
from services.placement import Block, blocks, place
from services.scan import ScanMeta
from writers.component import ScanFile, ScanRun
from writers.layout import FileClaim, owner_info, record_checksum, safe_file_part, write_atomically

SUFFIX = ".png"
log = logging.getLogger("tangomesh.writer.images")


@dataclass(frozen=True)
class ImageSettings:
    width: int = 800
    height: int = 600
    dpi: int = 100
    colormap: str = "viridis"
    interval_seconds: float = 0.0  # 0: at scan end only
    max_bytes: int = 256 << 20  # memory for one scan's maps and sums

    def __post_init__(self) -> None:
        if not (200 <= self.width <= 4000 and 150 <= self.height <= 4000 and 50 <= self.dpi <= 600):
            raise ValueError("image size must be 200..4000 x 150..4000 pixels at 50..600 dpi")
        if self.interval_seconds < 0 or self.max_bytes < 1:
            raise ValueError("IntervalSeconds must be >= 0 and MaxBytes positive")
        from matplotlib import colormaps

        if self.colormap not in colormaps:
            raise ValueError(f"unknown colormap {self.colormap!r}")


class Accumulator:
    """What a product's picture needs (services.display): the product in map
    shape (float64, missing points NaN), or the sum of its points and how many
    went into it."""

    def __init__(self, meta: ScanMeta, point_shape: tuple[int, ...], picture: display.Picture) -> None:
        self.point_shape = point_shape
        self.picture = picture
        self.count = 0
        if picture.source == display.SUM:
            self.values = np.zeros(point_shape, np.float64)
        else:
            self.values = np.full((*meta.map_shape, *point_shape), fill_value(np.float64))

    @property
    def nbytes(self) -> int:
        return self.values.nbytes

    def add(self, parts: list[Block], values: np.ndarray, failed: np.ndarray, unsummed: np.ndarray) -> None:
        """A chunk's points (``parts``: its placement blocks); ``failed`` rows
        have no value, ``unsummed`` rows are left out of a sum
        (services.ledger.PointLedger.unsummed)."""
        if self.picture.source == display.SUM:
            self.values += sum_of_points(values, unsummed)
            self.count += len(values) - len(unsummed)
        else:
            place(self.values, parts, blank_failed(values.astype(np.float64), failed))


class ImageFiles(ScanFile):
    def __init__(self, run: ScanRun, settings: ImageSettings) -> None:
        super().__init__(run)
        self.settings = settings
        self.claim = FileClaim(run.stem.with_name(run.stem.name + SUFFIX), owner_info(run.owner), part=False)
        self.products: dict[str, Accumulator] = {}
        self.refused: set[str] = set()  # results that get no image (no picture for them, or beyond MaxBytes)
        self._rendered = time.monotonic()

    def write(self, index: int, stop: int, arrays: dict[str, np.ndarray], failed: np.ndarray) -> None:
        meta = self.run.meta
        for result, arr in arrays.items():
            acc = self.products.get(result)
            if acc is not None and arr.shape[1:] != acc.point_shape:
                raise ValueError(f"result {result!r}: per-point shape {arr.shape[1:]} differs from the "
                                 f"{acc.point_shape} of this scan's earlier points")
        parts = blocks(meta, index, stop)
        unsummed = self.run.ledger.unsummed(index, stop, failed)  # the component records the chunk after this
        for result, arr in arrays.items():
            acc = self.products.get(result) or self._accumulator(result, arr)
            if acc is not None:
                acc.add(parts, arr, failed - index, unsummed)

    def _accumulator(self, result: str, arr: np.ndarray) -> Accumulator | None:
        if result in self.refused:
            return None
        picture = display.picture(self.run.meta, arr.shape[1:], live=False)
        if picture is None:
            self.refused.add(result)  # decided once, not again for every chunk
            return None
        acc = Accumulator(self.run.meta, arr.shape[1:], picture)
        used = sum(a.nbytes for a in self.products.values())
        if used + acc.nbytes > self.settings.max_bytes:
            self.refused.add(result)
            log.error("scan %s: no image of %s: %d bytes beyond MaxBytes %d", self.run.meta.scan_id, result,
                      acc.nbytes, self.settings.max_bytes)
            return None
        self.products[result] = acc
        return acc

    def tick(self, now: float) -> None:
        if self.settings.interval_seconds and now - self._rendered >= self.settings.interval_seconds:
            for result in self.products:
                write_atomically(self.path(result), self.render(result))
            self._rendered = now

    def path(self, result: str) -> Path:
        stem = self.run.stem
        return stem.with_name(f"{stem.name}_{safe_file_part(result)}{SUFFIX}")

    def finish(self) -> list[tuple[Path, str]]:
        written = []
        try:
            for result in self.products:
                path = self.path(result)
                write_atomically(path, self.render(result))
                written.append((path, record_checksum(path)))
        finally:
            self.claim.release()
        return written

    def abandon(self) -> None:
        self.claim.release()

    # ------------------------------------------------------------ drawing
    def title(self, result: str, extra: str = "") -> str:
        raw = self.run.meta.raw
        product = f"{self.run.pipeline}/{result}" if self.run.pipeline else result
        return f"{self.run.meta.scan_id} · {raw['sample']['name']} · {product}{extra}"

    def render(self, result: str) -> bytes:
        s = self.settings
        fig = Figure(figsize=(s.width / s.dpi, s.height / s.dpi), dpi=s.dpi, layout="constrained")
        ax = fig.add_subplot()
        acc = self.products[result]
        picture = acc.picture
        summed = picture.source == display.SUM
        label = f"{result}, summed" if summed else result
        image = picture.image(acc.values)
        if picture.y is None:
            self._draw_curve(ax, picture, image, label)
        else:
            self._draw_image(fig, ax, picture, image, label)
        extra = f" · sum of {acc.count} points" if summed else ""
        if self.run.status not in ("complete", "running"):  # an image of a part of a scan says so
            ledger = self.run.ledger
            extra += f" · {self.run.status}: {ledger.received} of {ledger.points} points"
        ax.set_title(self.title(result, extra), fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=s.dpi)
        return buf.getvalue()

    @staticmethod
    def _draw_curve(ax, picture: display.Picture, values: np.ndarray, label: str) -> None:
        x = picture.x.values if picture.x.values is not None else np.arange(len(values))
        ax.plot(x, values, ".-" if picture.kind == display.TRACE else "-", ms=3, lw=0.8)
        top, bottom = values.max(initial=0), max(values.min(initial=0), 1e-300)
        if picture.log and top > 0 and top > 1000 * bottom:
            ax.set_yscale("log")
        ax.set_xlabel(_label(picture.x))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)

    def _draw_image(self, fig: Figure, ax, picture: display.Picture, data: np.ndarray, label: str) -> None:
        x, y = picture.x, picture.y
        (x0, x1), (y0, y1) = _edges(x, data.shape[1]), _edges(y, data.shape[0])
        extent = [x0, x1, y1, y0] if picture.y_down else [x0, x1, y0, y1]
        finite = data[np.isfinite(data)]
        if picture.log:
            positive = finite[finite > 0]
            limits = dict(norm=LogNorm(vmin=max(positive.min(), 1e-12), vmax=positive.max())) if positive.size else {}
        else:
            vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
            if vmax <= vmin:
                vmin, vmax = vmin - 0.5, vmax + 0.5
            limits = dict(vmin=vmin, vmax=vmax)
        width, height = abs(x1 - x0), abs(y1 - y0)
        equal = x.unit == y.unit and width > 0 and height > 0 and 1 / 20 < height / width < 20
        shown = ax.imshow(data, origin="upper" if picture.y_down else "lower", extent=extent,
                          cmap=self.settings.colormap, aspect="equal" if equal else "auto",
                          interpolation="nearest", **limits)
        fig.colorbar(shown, ax=ax, label=label)
        ax.set_xlabel(_label(x))
        ax.set_ylabel(_label(y))


def _label(axis: display.Axis) -> str:
    return f"{axis.label} ({axis.unit})" if axis.unit else axis.label


def _edges(axis: display.Axis, n: int) -> tuple[float, float]:
    """Outer edges of the first and last pixel, centred on the axis' positions
    (on 0 .. n - 1 without them)."""
    values = axis.values if axis.values is not None else np.arange(n, dtype=np.float64)
    if values.size < 2:
        return float(values[0]) - 0.5, float(values[0]) + 0.5
    half = (values[-1] - values[0]) / (values.size - 1) / 2
    if half == 0 or not math.isfinite(half):
        half = 0.5
    return float(values[0] - half), float(values[-1] + half)
