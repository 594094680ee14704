"""``counters``: scaler channels normalised by the incident flux, and their sums.

Settings: ``counters`` (array names, bare like ``"i1"`` when one stream has it,
or ``"stream/i1"``), ``normalise_by`` (the monitor, usually ``"i0"``). Results
per point: every counter as float64, ``<name>_norm`` = counter / monitor for
the others (NaN where the monitor read 0: no beam is not a failure), and
``sum`` / ``sum_norm`` over those others.
"""

from __future__ import annotations

import numpy as np

from pipelines.processors import Batch, Processor


def _base(name: str) -> str:
    """``i0`` of ``counters/i0``."""
    return name.rsplit("/", 1)[-1]


class Counters(Processor):
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["counters"],
        "properties": {
            "counters": {"type": "array", "minItems": 1, "uniqueItems": True,
                         "items": {"type": "string", "minLength": 1}},
            "normalise_by": {"type": "string", "minLength": 1},
        },
    }

    def start_scan(self, scan, settings) -> None:
        super().start_scan(scan, settings)
        monitor = self.settings.get("normalise_by")
        names = list(self.settings["counters"])
        if monitor is not None and _base(monitor) not in map(_base, names):
            names.append(monitor)
        bases = [_base(n) for n in names]
        clashes = sorted({b for b in bases if bases.count(b) > 1})
        if clashes:
            raise ValueError(f"counters {clashes} named twice (from different streams?): "
                             "results are named by the bare counter name, so each must be unique")
        self.monitor = None if monitor is None else _base(monitor)
        self.names = names
        self.channels = [_base(n) for n in names if _base(n) != self.monitor]

    def _find(self, batch: Batch, name: str) -> np.ndarray:
        if "/" in name:
            stream, array = name.split("/", 1)
            arr = batch.stream(stream).get(array)
            if arr is None:
                raise KeyError(f"no array {name!r} in these events")
            return arr
        hits = [k for k in batch.arrays if k.rsplit("/", 1)[-1] == name]
        if len(hits) != 1:
            raise KeyError(f"counter {name!r} is in {len(hits)} streams of these events "
                           f"({hits or 'none'}); name it as stream/{name}")
        return batch.arrays[hits[0]]

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        values = {}
        for name in self.names:
            arr = self._find(batch, name)
            if arr.ndim != 1:
                raise ValueError(f"counter {name!r} has shape {arr.shape[1:]} per point; counters are scalars")
            values[_base(name)] = arr.astype(np.float64, copy=False)
        out = dict(values)
        channels = self.channels
        out["sum"] = np.sum([values[c] for c in channels], axis=0) if channels else np.zeros(batch.count)
        if self.monitor is not None:
            monitor = values[self.monitor]
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(monitor != 0, 1.0 / monitor, np.nan)
            for c in channels:
                out[f"{c}_norm"] = values[c] * scale
            out["sum_norm"] = out["sum"] * scale
        return out
