"""``counters``: scaler channels normalised by the incident flux, and their sums.

Settings: ``counters`` (array names, bare like ``"i1"`` when one stream has it,
or ``"stream/i1"``), ``normalise_by`` (the monitor, usually ``"i0"``),
``transmission`` (the counter behind the sample, e.g. ``"it"``; needs the
monitor), ``sum`` (default true), ``not_normalised`` (counters reported as
read only, e.g. a beam-induced voltage, which is not proportional to flux). Results per point: every counter as float64
(XBIC, XEOL, XBIV and the like are counters too), ``<name>_norm`` = counter /
monitor for the others (NaN where the monitor read 0: no beam is not a
failure), ``sum`` / ``sum_norm`` over those others, and ``transmission`` =
``-ln(it / i0)``, the sample's absorbance up to the detectors' gain ratio
(NaN where either read 0 or less).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.processors import Batch, Processor


def _base(name: str) -> str:
    """``i0`` of ``counters/i0``."""
    return name.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class _Layout:
    """Which counter is read, divided by the monitor, or the transmitted beam."""

    monitor: str | None  # bare name
    names: list[str]  # as given, the monitor appended if it is not among the counters
    channels: list[str]  # bare names normalised and summed
    transmitted: str | None

    @classmethod
    def of(cls, settings: dict) -> "_Layout":
        """ValueError for settings whose names do not fit together."""
        monitor = settings.get("normalise_by")
        names = list(settings["counters"])
        if monitor is not None and _base(monitor) not in map(_base, names):
            names.append(monitor)
        bases = [_base(n) for n in names]
        clashes = sorted({b for b in bases if bases.count(b) > 1})
        if clashes:
            raise ValueError(f"counters {clashes} named twice (from different streams?): "
                             "results are named by the bare counter name, so each must be unique")
        monitor = None if monitor is None else _base(monitor)
        raw = {_base(n) for n in settings.get("not_normalised", [])}
        if raw - set(bases):
            raise ValueError(f"not_normalised names {sorted(raw - set(bases))}, which are not among the counters")
        channels = [b for b in bases if b != monitor and b not in raw]
        transmitted = settings.get("transmission")
        if transmitted is not None:
            if monitor is None:
                raise ValueError("transmission needs normalise_by: the incident-flux monitor")
            if _base(transmitted) not in channels:
                raise ValueError(f"transmission counter {transmitted!r} is not one of the counters {channels}")
        return cls(monitor, names, channels, None if transmitted is None else _base(transmitted))


class Counters(Processor):
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["counters"],
        "properties": {
            "counters": {"type": "array", "minItems": 1, "uniqueItems": True,
                         "items": {"type": "string", "minLength": 1}},
            "normalise_by": {"type": "string", "minLength": 1},
            "transmission": {"type": "string", "minLength": 1},
            "sum": {"type": "boolean", "default": True},
            "not_normalised": {"type": "array", "uniqueItems": True, "items": {"type": "string", "minLength": 1}},
        },
    }

    @classmethod
    def check_settings(cls, scan, settings) -> dict:
        settings = super().check_settings(scan, settings)
        _Layout.of(settings)  # the names must be consistent
        return settings

    def start_scan(self, scan, settings) -> None:
        super().start_scan(scan, settings)
        layout = _Layout.of(self.settings)
        self.monitor, self.names, self.channels, self.transmitted = (
            layout.monitor, layout.names, layout.channels, layout.transmitted)
        self.with_sum = self.settings.get("sum", True)

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
        if self.with_sum:
            out["sum"] = np.sum([values[c] for c in channels], axis=0) if channels else np.zeros(batch.count)
        if self.monitor is not None:
            monitor = values[self.monitor]
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(monitor != 0, 1.0 / monitor, np.nan)
                for c in channels:
                    out[f"{c}_norm"] = values[c] * scale
                if self.with_sum:
                    out["sum_norm"] = out["sum"] * scale
                if self.transmitted is not None:
                    ratio = values[self.transmitted] * scale
                    out["transmission"] = -np.log(np.where((ratio > 0) & (monitor > 0), ratio, np.nan))
        return out
