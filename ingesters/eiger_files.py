"""An EIGER's HDF5 output (DECTRIS master + data files) read as a SIMPLON series, frames still compressed.

A DECTRIS detector's file writer leaves one master file
(``<name>_master.h5``) whose ``/entry/data/data_NNNNNN`` entries are
external links to data files (``<name>_data_NNNNNN.h5``, dataset
``/entry/data/data``, shape (frames, y, x), one chunk per frame, filtered
with bitshuffle-LZ4 (HDF5 filter 32008) or LZ4 (32004), or not at all).
:class:`EigerMaster` reads the chunks as stored (``read_direct_chunk``): a
filtered chunk is exactly the HDF5 filter chunk the mesh carries
(:class:`services.compression.CompressedFrames`), so nothing is decoded
here; the worker decompresses once, as for a live stream.

The series comes out as the SIMPLON decoder's events (:mod:`ingesters.simplon`),
so :class:`ingesters.series.SeriesMapper` maps it to a scan exactly like a
live detector's: a :class:`~ingesters.simplon.SeriesStart` (its
``expected`` the file's frame count), one :class:`~ingesters.simplon.Frame`
per frame numbered from 0, a :class:`~ingesters.simplon.SeriesEnd`.

Anything not laid out so raises :class:`FileLayoutError` (a ``ValueError``)
naming the entry and what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ingesters.simplon import Frame, SeriesEnd, SeriesStart
from services.compression import BSLZ4, LZ4, CompressedFrames, CompressionError

FILTER_BITSHUFFLE, FILTER_LZ4 = 32008, 32004
BITSHUFFLE_LZ4 = 2  # bitshuffle's cd_values[4]: its LZ4 compression
DATA_ENTRY = re.compile(r"^data_\d{6}$")
FRAME_TIME = "/entry/instrument/detector/frame_time"
MAX_PIXELS = 1 << 28


class FileLayoutError(ValueError):
    """A file that is not an EIGER master/data file as DECTRIS writes them."""


@dataclass(frozen=True)
class DataBlock:
    """One data file's dataset: frames ``first .. first + count - 1`` of the series."""

    entry: str
    first: int
    count: int


class EigerMaster:
    """An open master file and its data files (closed with :meth:`close` or ``with``)."""

    def __init__(self, path: str | Path, channel: str = "image") -> None:
        self.path = Path(path)
        self.channel = channel
        try:
            self.file = h5py.File(self.path, "r")
        except (OSError, ValueError) as exc:
            raise FileLayoutError(f"{self.path}: not an HDF5 file that can be read: {exc}") from None
        try:
            self._scan()
        except BaseException:
            self.file.close()
            raise

    def _scan(self) -> None:
        group = self.file.get("/entry/data")
        if not isinstance(group, h5py.Group):
            raise FileLayoutError(f"{self.path}: no /entry/data group")
        entries = sorted(name for name in group if DATA_ENTRY.match(name))
        if not entries:
            raise FileLayoutError(f"{self.path}: /entry/data holds no data_NNNNNN entries")
        self.blocks: list[DataBlock] = []
        self.codec = ""
        layout = None
        first = 0
        for name in entries:
            try:
                ds = group[name]
            except (KeyError, OSError) as exc:  # a dangling external link
                raise FileLayoutError(f"{self.path}: /entry/data/{name} cannot be opened (missing data file?): "
                                      f"{exc}") from None
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 3:
                raise FileLayoutError(f"{self.path}: /entry/data/{name} is not a 3-D dataset (frames, y, x)")
            if ds.dtype.kind not in "ui" or ds.dtype.itemsize not in (1, 2, 4):
                raise FileLayoutError(f"{self.path}: /entry/data/{name} has dtype {ds.dtype}, not 8/16/32-bit "
                                      "integer pixels")
            y, x = ds.shape[1:]
            if y * x == 0 or y * x > MAX_PIXELS:
                raise FileLayoutError(f"{self.path}: /entry/data/{name}: frames of {y} x {x} pixels")
            if ds.chunks != (1, y, x):
                raise FileLayoutError(f"{self.path}: /entry/data/{name} is chunked {ds.chunks}, not one frame "
                                      "per chunk")
            codec = self._codec(ds, name)
            this = (np.dtype(ds.dtype).newbyteorder("<"), (y, x), codec)
            if layout is not None and this != layout:
                raise FileLayoutError(f"{self.path}: /entry/data/{name} differs in dtype, shape or "
                                      "compression from the entries before it")
            layout = this
            self.blocks.append(DataBlock(name, first, ds.shape[0]))
            first += ds.shape[0]
        assert layout is not None
        self.dtype, self.frame_shape, self.codec = layout
        self.frames = first
        frame_time = self.file.get(FRAME_TIME)
        self.frame_time = float(frame_time[()]) if isinstance(frame_time, h5py.Dataset) and \
            frame_time.shape == () and float(frame_time[()]) > 0 else None

    def _codec(self, ds: h5py.Dataset, name: str) -> str:
        plist = ds.id.get_create_plist()
        filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
        if not filters:
            return ""
        if len(filters) > 1:
            raise FileLayoutError(f"{self.path}: /entry/data/{name} has {len(filters)} filters; one or none expected")
        code, _flags, values, _name = filters[0]
        if code == FILTER_BITSHUFFLE:
            if len(values) < 5 or values[4] != BITSHUFFLE_LZ4:
                raise FileLayoutError(f"{self.path}: /entry/data/{name}: bitshuffle without LZ4 ({values})")
            return BSLZ4
        if code == FILTER_LZ4:
            return LZ4
        raise FileLayoutError(f"{self.path}: /entry/data/{name}: HDF5 filter {code} is neither bitshuffle-LZ4 "
                              f"({FILTER_BITSHUFFLE}) nor LZ4 ({FILTER_LZ4})")

    # ------------------------------------------------------------ reading
    def start(self, series: int, first: int = 0, count: int | None = None) -> SeriesStart:
        count = self.frames - first if count is None else count
        return SeriesStart(version=1, series=series, header_detail="basic", expected=count,
                           channels=(self.channel,), config={"file": str(self.path), "first_frame": first,
                                                              "frame_time": self.frame_time})

    def frame(self, number: int) -> CompressedFrames | np.ndarray:
        """Frame ``number`` of the series: its chunk as stored, or its pixels when unfiltered."""
        block = next((b for b in self.blocks if b.first <= number < b.first + b.count), None)
        if block is None:
            raise FileLayoutError(f"{self.path}: no frame {number} (the file has {self.frames})")
        ds = self.file["/entry/data"][block.entry]
        mask, chunk = ds.id.read_direct_chunk((number - block.first, 0, 0))
        if not self.codec or mask & 1:  # no filter, or the filter was skipped for this chunk
            pixels = np.frombuffer(chunk, self.dtype)
            if pixels.size != self.frame_shape[0] * self.frame_shape[1]:
                raise FileLayoutError(f"{self.path}: frame {number}: a raw chunk of {len(chunk)} bytes")
            return pixels.reshape(self.frame_shape)
        try:
            return CompressedFrames.from_buffer(self.codec, self.dtype, (1, *self.frame_shape), [len(chunk)], chunk)
        except CompressionError as exc:
            raise FileLayoutError(f"{self.path}: frame {number}: {exc}") from None

    def events(self, series: int, first: int = 0,
               count: int | None = None) -> Iterator[SeriesStart | Frame | SeriesEnd]:
        """The series: start, frames ``first .. first + count - 1`` numbered from 0, end."""
        count = self.frames - first if count is None else count
        if first < 0 or count < 0 or first + count > self.frames:
            raise FileLayoutError(f"{self.path}: frames {first}..{first + count - 1} are not all in the file "
                                  f"({self.frames} frames)")
        yield self.start(series, first, count)
        for i in range(count):
            yield Frame(version=1, series=series, frame=i, channels={self.channel: self.frame(first + i)})
        yield SeriesEnd(version=1, series=series)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "EigerMaster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
