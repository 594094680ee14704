"""One NeXus/HDF5 file per scan and pipeline, written as the results arrive.

Layout (docs/writers.md has the full tree)::

    /                         NXroot, @default=entry
    /entry                    NXentry: identifiers, times, title, @default=<first product>
    /entry/scan               NXcollection: id, number, command, geometry
    /entry/scan_document      NXnote: the StartScan JSON, whole
    /entry/instrument         NXinstrument: detectors (settings), monochromator, devices snapshot
    /entry/sample             NXsample
    /entry/process            NXprocess: software, processor, settings, times, point counts and states
    /entry/<result>           NXdata: the product in map shape, with motor axes

Products are stored in map shape (``map_shape + point_shape``; snake rows
unfolded, so a viewer shows the map as the sample lies) and in the dtype the
processor produced. Points without a value hold services.ledger.fill_value
(NaN for floating point; blank_failed for failed points: integers keep what
the worker sent, its fill); ``process/point_status`` says which points are which.
Chunks follow the acquisition order (whole map rows, or single points for
big ones), so each HDF5 chunk is completed once and compressed once.

Raw frames that arrive still compressed (``passthrough`` with
``keep_compressed``: an EIGER's bitshuffle-LZ4 or LZ4 chunks) are stored as
they came, one chunk per frame with the matching HDF5 filter (Bitshuffle
32008 / LZ4 32004, as DECTRIS' own files have them), by direct chunk write:
no decompression, no recompression. Any HDF5 reader with hdf5plugin reads
them as plain frames.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import hdf5plugin
import numpy as np

from services.compression import CompressedFrames, hdf5_filter
from services.ledger import STATE_NAMES, blank_failed, fill_value
from services.placement import blocks, cells, place
from services.scan import axis_values
from writers.component import ScanFile, ScanRun
from writers.layout import FileClaim, owner_info

SUFFIX = ".nxs"
COMPRESSIONS = ("bitshuffle-lz4", "gzip", "none")
PROGRAM = "tangomesh"


def program_version() -> str:
    try:
        from importlib.metadata import version

        return version("tangomesh")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


@dataclass(frozen=True)
class NexusSettings:
    compression: str = "bitshuffle-lz4"
    chunk_bytes: int = 1 << 20
    flush_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"Compression must be one of {', '.join(COMPRESSIONS)}, not {self.compression!r}")
        if not 4096 <= self.chunk_bytes <= 64 << 20:
            raise ValueError("ChunkBytes must be in [4 KiB, 64 MiB]")
        if self.flush_seconds <= 0:
            raise ValueError("FlushSeconds must be positive")

    def filter_args(self, dtype: np.dtype) -> dict[str, Any]:
        if self.compression == "none":
            return {}
        if self.compression == "bitshuffle-lz4" and dtype.kind in "biuf":
            return dict(hdf5plugin.Bitshuffle(cname="lz4"))
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def chunk_shape(map_shape: tuple[int, ...], point_shape: tuple[int, ...], itemsize: int, target: int) -> tuple:
    """Chunks that fill in acquisition order: whole map rows while a point is
    small, part of a row, or one point per chunk for frames."""
    point_bytes = max(1, math.prod(point_shape) * itemsize)
    per_chunk = max(1, target // point_bytes)  # points per chunk
    if len(map_shape) == 1:
        return (min(map_shape[0], per_chunk), *point_shape)
    rows, cols = map_shape
    if per_chunk >= cols:
        return (min(rows, per_chunk // cols), cols, *point_shape)
    return (1, per_chunk, *point_shape)


def hdf5_name(name: str) -> str:
    """A result name as an HDF5 link name (no '/', not '.')."""
    cleaned = name.replace("/", "_").strip()
    return cleaned if cleaned not in ("", ".", "..") else "unnamed"


def write_tree(group: h5py.Group, values: Mapping[str, Any], nx_class: str = "NXcollection") -> None:
    """Free-form metadata (JSON-like) as HDF5: numbers and strings become
    datasets, homogeneous lists arrays, objects NXcollection subgroups; what
    has no natural HDF5 form is stored as JSON text with ``@json=1``."""
    group.attrs.setdefault("NX_class", nx_class)
    for key, value in values.items():
        name = hdf5_name(str(key))
        if name in group or value is None:
            continue
        if isinstance(value, Mapping):
            write_tree(group.create_group(name), value)
            continue
        data = _as_dataset_value(value)
        if data is None:
            group.create_dataset(name, data=json.dumps(value, ensure_ascii=False)).attrs["json"] = 1
        else:
            group.create_dataset(name, data=data)


def _as_dataset_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value if not isinstance(value, int) or abs(value) < 2**63 else None
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            try:
                return np.asarray(value, dtype=np.float64 if any(isinstance(v, float) for v in value) else np.int64)
            except OverflowError:
                return None
    return None


class NexusFile(ScanFile):
    keeps_compressed = True

    def __init__(self, run: ScanRun, settings: NexusSettings) -> None:
        super().__init__(run)
        self.settings = settings
        self.claim = FileClaim(run.stem.with_name(run.stem.name + SUFFIX), owner_info(run.owner))
        self.datasets: dict[str, h5py.Dataset] = {}
        self._flushed = time.monotonic()
        try:
            # room for the few chunks being filled (chunks fill in acquisition
            # order); more would only defer their compression to close()
            self.h5 = h5py.File(self.claim.part, "w", rdcc_nbytes=4 * settings.chunk_bytes, rdcc_nslots=10007)
            self._write_header()
        except BaseException:
            self.claim.release()
            raise

    # ------------------------------------------------------------ metadata
    def _write_header(self) -> None:
        meta, raw = self.run.meta, self.run.meta.raw
        f = self.h5
        f.attrs.update({"NX_class": "NXroot", "default": "entry", "file_name": self.claim.final.name,
                        "file_time": self.run.start_time, "creator": f"{PROGRAM} NexusWriter {program_version()}",
                        "HDF5_Version": h5py.version.hdf5_version, "h5py_version": h5py.version.version})
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        scan, beamtime = raw["scan"], raw["beamtime"]
        entry["title"] = scan.get("name") or meta.scan_id
        entry["entry_identifier"] = meta.scan_id
        entry["experiment_identifier"] = beamtime["id"]
        entry["start_time"] = scan.get("start_time", self.run.start_time)
        entry["program_name"] = PROGRAM
        entry["program_name"].attrs["version"] = program_version()
        write_tree(entry.create_group("beamtime"), beamtime)

        group = entry.create_group("scan")
        group.attrs["NX_class"] = "NXcollection"
        for key in ("id", "number", "name", "command", "start_time"):
            if key in scan:
                group[key] = scan[key]
        geometry = meta.geometry
        group["geometry_type"] = meta.geometry_type
        group["snake"] = meta.snake
        group["map_shape"] = np.asarray(meta.map_shape, dtype=np.int64)
        group["points"] = meta.points
        write_tree(group.create_group("geometry"), geometry)

        note = entry.create_group("scan_document")
        note.attrs["NX_class"] = "NXnote"
        note["type"] = "application/json"
        note["description"] = "the scan metadata exactly as StartScan delivered it"
        note["data"] = meta.to_json()

        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        instrument["name"] = beamtime["beamline"]
        acquisition = raw["acquisition"]
        if "energy_keV" in acquisition:
            mono = instrument.create_group("monochromator")
            mono.attrs["NX_class"] = "NXmonochromator"
            mono["energy"] = acquisition["energy_keV"]
            mono["energy"].attrs["units"] = "keV"
        for name, detector_settings in acquisition["detectors"].items():
            detector = instrument.create_group(hdf5_name(name))
            detector.attrs["NX_class"] = "NXdetector"
            if "dwell_s" in acquisition:
                detector["count_time"] = acquisition["dwell_s"]
                detector["count_time"].attrs["units"] = "s"
            write_tree(detector, detector_settings, "NXdetector")
        write_tree(instrument.create_group("acquisition"),
                   {k: v for k, v in acquisition.items() if k != "detectors"})
        write_tree(instrument.create_group("devices"), raw["devices"])

        write_tree(entry.create_group("sample"), raw["sample"], "NXsample")
        if "user" in raw:
            write_tree(entry.create_group("user_metadata"), raw["user"])

        process = entry.create_group("process")
        process.attrs["NX_class"] = "NXprocess"
        processor, settings = self.run.processor
        process["program"] = PROGRAM
        process["version"] = program_version()
        process["sequence_index"] = 1
        process["pipeline"] = self.run.pipeline
        process["processor"] = processor
        process["start_time"] = self.run.start_time
        note = process.create_group("settings")
        note.attrs["NX_class"] = "NXnote"
        note["type"] = "application/json"
        note["data"] = json.dumps(settings, ensure_ascii=False)
        write_tree(process.create_group("parameters"), settings, "NXparameters")

    # ------------------------------------------------------------ data
    def _dataset(self, result: str, arr: np.ndarray) -> h5py.Dataset:
        name = hdf5_name(result)
        ds = self.datasets.get(name)
        point_shape = arr.shape[1:]
        if ds is not None:
            earlier = ds.shape[len(self.run.meta.map_shape):]
            if earlier != point_shape:
                raise ValueError(f"result {result!r}: per-point shape {point_shape} differs from the "
                                 f"{earlier} of this scan's earlier points")
            return ds
        return self._create(name, result, arr)

    def _create(self, name: str, result: str, arr: np.ndarray) -> h5py.Dataset:
        meta = self.run.meta
        dtype = np.dtype(np.uint8) if arr.dtype == np.bool_ else arr.dtype.newbyteorder("=")
        point_shape = arr.shape[1:]
        shape = (*meta.map_shape, *point_shape)
        group = self.h5["entry"].create_group(name)
        group.attrs["NX_class"] = "NXdata"
        group.attrs["signal"] = name
        if isinstance(arr, CompressedFrames):  # the detector's chunks, stored as they are: one per frame
            chunks, filters = (*(1,) * len(meta.map_shape), *point_shape), hdf5_filter(arr.codec)
        else:
            chunks = chunk_shape(meta.map_shape, point_shape, dtype.itemsize, self.settings.chunk_bytes)
            filters = self.settings.filter_args(dtype)
        ds = group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill_value(dtype), chunks=chunks,
                                  **filters)
        ds.attrs["long_name"] = f"{self.run.pipeline}/{result}" if self.run.pipeline else result
        ds.attrs["source_dtype"] = arr.dtype.str
        axes = self._axes(group, name)
        group.attrs["axes"] = [*axes, *(["."] * len(point_shape))]
        entry = self.h5["entry"]
        if "default" not in entry.attrs:
            entry.attrs["default"] = name
        self.datasets[name] = ds
        return ds

    def _axes(self, group: h5py.Group, signal: str) -> list[str]:
        """NXdata axes in map dimension order, with their nominal positions."""
        meta = self.run.meta
        names, units, values = meta.axis_names, meta.axis_units, axis_values(meta)

        def add(name: str, data: np.ndarray, unit: str, dim: int) -> str:
            link = hdf5_name(name)
            if link == signal or link in group:
                link = f"axis_{link}"
            group[link] = data
            if unit:
                group[link].attrs["units"] = unit
            group[link].attrs["long_name"] = f"{name} ({unit})" if unit else name
            group.attrs[f"{link}_indices"] = dim
            return link

        if meta.geometry_type == "raster":  # map rows follow the slow axis (axes[1]), columns the fast
            return [add(names[1], values[1], units[1], 0), add(names[0], values[0], units[0], 1)]
        if meta.geometry_type == "line":
            return [add(names[0], values[0], units[0], 0)]
        index = add("index", np.arange(meta.points, dtype=np.int64), "", 0)
        for name, unit, positions in zip(names, units, values):
            if positions is not None:
                add(name, positions, unit, 0)
        return [index]

    def write(self, index: int, stop: int, arrays: dict[str, np.ndarray], failed: np.ndarray) -> None:
        targets = [(self._dataset(result, arr), arr) for result, arr in arrays.items()]  # all checked first
        parts = blocks(self.run.meta, index, stop)
        for ds, arr in targets:
            if isinstance(arr, CompressedFrames):
                self._write_chunks(ds, index, arr, failed)
                continue
            if arr.dtype == np.bool_:
                arr = arr.view(np.uint8)
            place(ds, parts, blank_failed(arr, failed - index))

    def _write_chunks(self, ds: h5py.Dataset, index: int, frames: CompressedFrames, failed: np.ndarray) -> None:
        """One frame per chunk, each the chunk as it came; a failed point's
        frame is left out (the cell keeps the fill value)."""
        if ds.chunks != (*(1,) * len(self.run.meta.map_shape), *frames.frame_shape) \
                or ds.dtype != frames.dtype.newbyteorder("="):
            raise ValueError(f"{ds.name}: compressed frames cannot go into a dataset chunked {ds.chunks} "
                             f"of {ds.dtype} (its first points came decoded)")
        skip = set((failed - index).tolist())
        where = np.unravel_index(cells(self.run.meta, np.arange(index, index + len(frames))), self.run.meta.map_shape)
        zeros = (0,) * len(frames.frame_shape)
        for j in range(len(frames)):
            if j not in skip:
                ds.id.write_direct_chunk((*(int(axis[j]) for axis in where), *zeros), frames.chunk(j))

    def tick(self, now: float) -> None:
        if now - self._flushed >= self.settings.flush_seconds:
            self.h5.flush()
            self._flushed = now

    def finish(self) -> list[tuple[Path, str]]:
        run, meta = self.run, self.run.meta
        entry = self.h5["entry"]
        entry["end_time"] = run.end_time
        process = entry["process"]
        process["end_time"] = run.end_time
        process["date"] = run.end_time
        process["status"] = run.status
        ledger = run.ledger
        for key, value in ledger.describe().items():
            if key != "errors":
                process[f"points_{key}" if key != "points" else "points_expected"] = value
        status = np.zeros(meta.map_shape, np.uint8)
        place(status, blocks(meta, 0, meta.points), ledger.state)
        ds = process.create_dataset("point_status", data=status, chunks=True, compression="gzip")
        ds.attrs["states"] = json.dumps(STATE_NAMES)
        ds.attrs["description"] = "per map cell: " + ", ".join(f"{k} {v}" for k, v in STATE_NAMES.items())
        for name, payload in (("errors", ledger.errors), ("summary", run.summary)):
            note = process.create_group(name)
            note.attrs["NX_class"] = "NXnote"
            note["type"] = "application/json"
            note["data"] = json.dumps(payload, ensure_ascii=False, default=str)
        self.h5.close()
        return [(self.claim.final, self.claim.publish())]

    def abandon(self) -> None:
        try:
            self.h5.close()
        finally:
            self.claim.release()

