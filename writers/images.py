"""PNG images and plots of a scan's products, for a browser or the e-log.

Per scan and pipeline, one PNG per product, ``<stem>_<result>.png``:

* a scalar per point on a raster: the map, in motor units (row 0 = slow axis
  start at the bottom, as the sample lies), with a colour bar;
* a scalar per point on a line or point list: a line plot against the motor
  (or the acquisition index);
* a 1-D pattern or spectrum per point: the pattern summed over the scan;
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

from services.ledger import PENDING, fill_value
from services.placement import cells
from services.scan import axis_values
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
    """What a product's image needs: the map of a scalar, or the sum of the
    per-point arrays (and how many points went into it)."""

    def __init__(self, map_shape: tuple[int, ...], point_shape: tuple[int, ...]) -> None:
        self.point_shape = point_shape
        if point_shape:
            self.total = np.zeros(point_shape, np.float64)
            self.count = 0
        else:
            self.map = np.full(map_shape, fill_value(np.float64))

    @property
    def nbytes(self) -> int:
        return self.total.nbytes if self.point_shape else self.map.nbytes

    def add(self, cells: np.ndarray, values: np.ndarray, good: np.ndarray) -> None:
        if self.point_shape:
            kept = values[good]
            if kept.size:
                self.total += np.nansum(kept, axis=0, dtype=np.float64)
                self.count += int(kept.shape[0])
        else:
            column = values.astype(np.float64)
            column[~good] = fill_value(column.dtype)
            self.map.reshape(-1)[cells] = column


class ImageFiles(ScanFile):
    def __init__(self, run: ScanRun, settings: ImageSettings) -> None:
        super().__init__(run)
        self.settings = settings
        self.claim = FileClaim(run.stem.with_name(run.stem.name + SUFFIX), owner_info(run.owner))
        self.products: dict[str, Accumulator] = {}
        self.refused: set[str] = set()
        self._rendered = time.monotonic()

    def write(self, index: int, stop: int, arrays: dict[str, np.ndarray], failed: np.ndarray) -> None:
        meta = self.run.meta
        for result, arr in arrays.items():
            acc = self.products.get(result)
            if acc is not None and arr.shape[1:] != acc.point_shape:
                raise ValueError(f"result {result!r}: per-point shape {arr.shape[1:]} differs from the "
                                 f"{acc.point_shape} of this scan's earlier points")
        where = cells(meta, np.arange(index, stop))
        good = self.run.ledger.state[index:stop] == PENDING  # a point delivered twice is summed once
        good[failed - index] = False
        for result, arr in arrays.items():
            acc = self.products.get(result) or self._accumulator(result, arr)
            if acc is not None:
                acc.add(where, arr, good)

    def _accumulator(self, result: str, arr: np.ndarray) -> Accumulator | None:
        if result in self.refused or arr.ndim > 3:
            return None
        acc = Accumulator(self.run.meta.map_shape, arr.shape[1:])
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
        meta = self.run.meta
        names, units = meta.axis_names, meta.axis_units
        if not acc.point_shape and meta.geometry_type == "raster":
            self._draw_map(fig, ax, acc.map, result)
        elif not acc.point_shape:
            if meta.geometry_type == "line":
                x, label = axis_values(meta)[0], _label(names[0], units[0])
            else:
                x, label = np.arange(meta.points), "acquisition index"
            ax.plot(x, acc.map, ".-", ms=3, lw=0.8)
            ax.set_xlabel(label)
            ax.set_ylabel(result)
            ax.set_title(self.title(result), fontsize=9)
            ax.grid(alpha=0.3)
        elif len(acc.point_shape) == 1:
            ax.plot(np.arange(acc.point_shape[0]), acc.total, lw=0.8)
            if acc.total.max(initial=0) > 0 and acc.total.max(initial=0) > 1000 * max(acc.total.min(initial=0), 1e-300):
                ax.set_yscale("log")
            ax.set_xlabel("channel")
            ax.set_ylabel(f"{result}, summed")
            ax.set_title(self.title(result, f" · sum of {acc.count} points"), fontsize=9)
            ax.grid(alpha=0.3)
        else:
            positive = acc.total[acc.total > 0]
            norm = LogNorm(vmin=max(positive.min(), 1e-12), vmax=positive.max()) if positive.size else None
            image = ax.imshow(acc.total, origin="upper", cmap=s.colormap, norm=norm, interpolation="nearest")
            fig.colorbar(image, ax=ax, label=f"{result}, summed")
            ax.set_xlabel("pixel x")
            ax.set_ylabel("pixel y")
            ax.set_title(self.title(result, f" · sum of {acc.count} points"), fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=s.dpi)
        return buf.getvalue()

    def _draw_map(self, fig: Figure, ax, data: np.ndarray, result: str) -> None:
        meta = self.run.meta
        (fast_name, slow_name), (fast_unit, slow_unit) = meta.axis_names, meta.axis_units
        fast, slow = axis_values(meta)
        extent = [*_edges(fast), *_edges(slow)]
        finite = data[np.isfinite(data)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        if vmax <= vmin:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        width, height = abs(extent[1] - extent[0]), abs(extent[3] - extent[2])
        equal = fast_unit == slow_unit and width > 0 and height > 0 and 1 / 20 < height / width < 20
        image = ax.imshow(data, origin="lower", extent=extent, cmap=self.settings.colormap, vmin=vmin, vmax=vmax,
                          aspect="equal" if equal else "auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=result)
        ax.set_xlabel(_label(fast_name, fast_unit))
        ax.set_ylabel(_label(slow_name, slow_unit))
        ax.set_title(self.title(result), fontsize=9)


def _label(name: str, unit: str) -> str:
    return f"{name} ({unit})" if unit else name


def _edges(values: np.ndarray) -> tuple[float, float]:
    """Outer edges of the first and last pixel centred on the nominal positions."""
    if values.size < 2:
        return float(values[0]) - 0.5, float(values[0]) + 0.5
    half = (values[-1] - values[0]) / (values.size - 1) / 2
    if half == 0 or not math.isfinite(half):
        half = 0.5
    return float(values[0] - half), float(values[-1] + half)
