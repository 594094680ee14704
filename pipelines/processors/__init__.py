"""Processor plugins: the modalities a worker runs, and their tiny interface.

A processor is a class registered under the entry-point group
``tangomesh.processors`` (setup.cfg); the scan's ``analysis.<pipeline>.processor``
names it. At StartScan the master calls the classmethod
``check_settings(scan, settings)``, which refuses bad settings with a message
before any data moves. Per scan the worker calls ``start_scan(scan, settings)``
once (it runs the same ``check_settings`` first),
``process(batch)`` for every unit of work, ``end_scan()`` at the end. ``process``
gets a whole :class:`Batch` (``count`` consecutive acquisition indices, arrays
with that leading axis) and returns a dict of arrays with the same leading
axis: write it vectorised over the points. The worker owns sockets, credit,
acknowledgement and error isolation (a point whose processing raises becomes
a failed point with the message, the rest of the batch is kept).

Adding a modality is one module here plus its test; docs/processors.md shows how.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from services.compression import CompressedFrames
from services.scan import ScanMeta
from services.schema import validate_against

ENTRY_POINT_GROUP = "tangomesh.processors"


@dataclass(frozen=True)
class Batch:
    """Consecutive events of one scan; ``arrays`` are named ``stream/array``."""

    scan: ScanMeta
    index: int
    count: int
    arrays: dict[str, np.ndarray]
    missing: frozenset[str] = frozenset()

    @property
    def indices(self) -> np.ndarray:
        return np.arange(self.index, self.index + self.count, dtype=np.int64)

    def stream(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of one source stream, by array name; KeyError naming the
        stream if it is absent from these events (an incomplete event)."""
        if name in self.missing:
            raise KeyError(f"stream {name!r} is missing from events [{self.index}, {self.index + self.count})")
        prefix = name + "/"
        arrays = {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}
        if not arrays:
            raise KeyError(f"no stream {name!r} in this batch (streams: {sorted(self.streams)})")
        return arrays

    @property
    def streams(self) -> set[str]:
        return {k.split("/", 1)[0] for k in self.arrays}

    def array(self, name: str, point_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The array ``stream/array``, checked: KeyError naming what is absent,
        ValueError for a per-point shape other than ``point_shape`` or for
        non-finite values (a detector's NaN must fail the point, not poison a map)."""
        stream, _, array = name.partition("/")
        values = self.stream(stream).get(array)
        if values is None:
            raise KeyError(f"no array {name!r} in these events (stream {stream!r} has {sorted(self.stream(stream))})")
        if point_shape is not None and values.shape[1:] != tuple(point_shape):
            raise ValueError(f"{name} has shape {values.shape[1:]} per point, expected {tuple(point_shape)}")
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = np.flatnonzero(~np.isfinite(values.reshape(self.count, -1)).all(axis=1))
            raise ValueError(f"{name} has non-finite values at points {(bad + self.index)[:10].tolist()}")
        return values

    def point(self, j: int) -> "Batch":
        """Event ``j`` of the batch alone (views), to isolate a failing point."""
        return Batch(self.scan, self.index + j, 1, {k: v[j:j + 1] for k, v in self.arrays.items()}, self.missing)


class Processor:
    """Base class of modality plugins. Override :meth:`process`; declare
    ``settings_schema`` (JSON schema) and extend :meth:`check_settings` with
    the processor's semantic checks, so that bad settings refuse the scan at
    StartScan with a message instead of failing every point."""

    settings_schema: dict[str, Any] = {"type": "object"}
    #: True: the worker hands over frames that travelled compressed as they
    #: came (services.compression.CompressedFrames), undecoded; a processor
    #: that only passes raw frames on (to a writer that stores the chunks
    #: directly) sets it in start_scan. Every other processor gets numpy arrays.
    keeps_compressed: bool = False

    def __init__(self) -> None:
        self.scan: ScanMeta | None = None
        self.settings: dict[str, Any] = {}

    @classmethod
    def check_settings(cls, scan: ScanMeta, settings: dict[str, Any]) -> dict[str, Any]:
        """The settings, checked: against ``settings_schema``, then (in
        subclasses) the cheap semantic checks ``start_scan`` would otherwise
        fail on (lines not excited, a geometry pyFAI cannot load, an unreadable
        mask, inconsistent names). ValueError (SchemaError for the schema)
        naming the problem.

        The master calls it on every StartScan, in a Tango request thread and
        without an instance: keep it fast (no data read, heavy work cached)
        and free of side effects. ``start_scan`` calls it too, so a check is
        written once and holds for both."""
        return validate_against(cls.settings_schema, f"{cls.__name__} settings", settings)

    def start_scan(self, scan: ScanMeta, settings: dict[str, Any]) -> None:
        """Check the settings (:meth:`check_settings`) and set the scan up;
        subclasses call this first, then build what the scan needs."""
        self.scan = scan
        self.settings = type(self).check_settings(scan, settings)

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def end_scan(self) -> None:
        pass

    @classmethod
    def prepare(cls) -> None:
        """Import heavy dependencies ahead of the first scan (a worker calls it
        at start-up for every installed processor), so that the first scan of
        a fresh worker does not wait for them."""


@lru_cache(maxsize=None)
def _registered() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names of the installed processors."""
    return sorted(_registered())


def preload(names: tuple[str, ...] | list[str] = ("*",)) -> dict[str, str]:
    """Load and prepare the named processors (``"*"``: every installed one);
    processor name -> why it failed, for those that did (they fail again,
    loudly, when a scan asks for them)."""
    problems = {}
    for name in (available() if "*" in names else names):
        try:
            load(name).prepare()
        except Exception as exc:  # a broken plugin must not stop the worker
            problems[name] = f"{type(exc).__name__}: {exc}"
    return problems


def load(name: str) -> type[Processor]:
    """The processor class registered as ``name``; ValueError if there is none."""
    ep = _registered().get(name)
    if ep is None:
        raise ValueError(f"processor {name!r} is not installed (available: {', '.join(available()) or 'none'})")
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Processor)):
        raise ValueError(f"entry point {name!r} is {cls!r}, not a Processor subclass")
    return cls


def declared_shape(scan: ScanMeta, name: str) -> tuple[int, ...] | None:
    """Per-point shape of ``stream/array`` as the scan document declares it, if it does."""
    stream, _, array = name.partition("/")
    spec = scan.raw.get("streams", {}).get(stream, {}).get("arrays", {}).get(array)
    return tuple(spec["shape"]) if spec else None


def declared_frames(scan: ScanMeta, settings: dict[str, Any], modality: str) -> tuple[str, tuple[int, ...] | None]:
    """(``detector/image`` array name, its declared per-point shape or None)
    of a frame-based modality's settings; ValueError if the scan declares
    that array other than 2-D (XRD, DPC, ptychography need frames)."""
    name = f"{settings['detector']}/{settings.get('image', 'image')}"
    shape = declared_shape(scan, name)
    if shape is not None and len(shape) != 2:
        raise ValueError(f"{name} is declared with shape {list(shape)} per point; {modality} needs 2-D frames")
    return name, shape


def monitor_scale(batch: Batch, name: str | None) -> np.ndarray:
    """1 / monitor per point (NaN where it read 0 or less: no beam is not a
    failure), or ones without a monitor."""
    if name is None:
        return np.ones(batch.count)
    monitor = batch.array(name).astype(np.float64).reshape(batch.count, -1)[:, 0]
    with np.errstate(divide="ignore"):
        return np.where(monitor > 0, 1.0 / monitor, np.nan)


def check_results(results: Any, count: int) -> dict[str, np.ndarray]:
    """What a processor returned, as numeric arrays with leading axis ``count``;
    ValueError saying what is wrong otherwise (a processor bug)."""
    if not isinstance(results, dict):
        raise ValueError(f"process() returned {type(results).__name__}, not a dict of arrays")
    out = {}
    for name, value in results.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"result name {name!r} is not a non-empty string")
        if isinstance(value, CompressedFrames):  # raw frames passed on as they came
            if len(value) != count:
                raise ValueError(f"result {name!r} has {len(value)} compressed frames, not the {count} points")
            out[name] = value
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            raise ValueError(f"result {name!r} has non-numeric dtype {arr.dtype}")
        if arr.ndim == 0 or arr.shape[0] != count:
            raise ValueError(f"result {name!r} has shape {arr.shape}, leading axis must be the {count} points")
        out[name] = arr
    return out
