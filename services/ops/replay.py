"""A recorded scan (services/recording.py) as the data of a new one.

:class:`Replay` is a :class:`~services.ops.driver.ScanData`: the scan driver
sends its blocks exactly as they were recorded (the same blocks, in the
order they came, at the recorded pace or at a chosen rate) through sources
registered for the recorded streams, under a new scan id, with the recorded
scan document (its analysis settings replaced if the user gives new ones).
So yesterday's scan runs through today's processing, and a test can feed a
real capture into the mesh.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

import numpy as np

from services import codec
from services.recording import RecordingError, read_document, read_stream, stream_files
from services.scan import ScanError, parse_scan


class Replay:
    """One recorded scan of one pipeline (a directory ``<root>/<scan>/<pipeline>``)."""

    def __init__(self, directory: Path, analysis: dict[str, Any] | None = None) -> None:
        self.directory = directory
        document = read_document(directory)
        try:
            self.meta = parse_scan(document)
        except ScanError as exc:
            raise RecordingError(f"{directory}: the recorded scan document is not valid: {exc}") from None
        self.pipeline = directory.name
        if self.pipeline not in self.meta.pipelines:
            raise RecordingError(f"{directory}: recorded for pipeline {self.pipeline}, "
                                 f"which the scan document has no analysis for")
        self._document = document
        self._analysis = analysis
        files = stream_files(directory)
        if not files:
            raise RecordingError(f"{directory}: no recorded streams")
        # (seconds, start, stop, stream) in the order they came, and the arrays of each block
        self._order: list[tuple[float, int, int, str]] = []
        self._arrays: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._streams: list[str] = []
        for path in files.values():
            for record in read_stream(path):
                msg = record.message
                if msg.type not in (codec.DATA, codec.GAP):
                    continue  # a source's scan_end: the driver sends its own at the end
                key = (msg.stream, msg.index, msg.stop)
                if key in self._arrays:
                    raise RecordingError(f"{path}: block [{msg.index}, {msg.stop}) of {msg.stream} recorded twice")
                self._arrays[key] = msg.arrays if msg.type == codec.DATA else None  # None: a declared gap
                self._order.append((record.seconds, msg.index, msg.stop, msg.stream))
                if msg.stream not in self._streams:
                    self._streams.append(msg.stream)
        self._order.sort(key=lambda o: (o[0], o[2], o[1]))  # by arrival; ties as detectors send (by stop)

    # ------------------------------------------------------------ ScanData
    @property
    def points(self) -> int:
        return self.meta.points

    @property
    def pipelines(self) -> Collection[str]:
        return [self.pipeline]

    def streams_of(self, pipeline: str) -> Sequence[str]:
        return list(self._streams)

    def document(self, scan_id: str, number: int, command: str | None = None,
                 pipelines: list[str] | None = None) -> dict[str, Any]:
        """The recorded document under a new id and number (and the new analysis, if given)."""
        doc = copy.deepcopy(self._document)
        original = doc["scan"]["id"]
        doc["scan"]["id"], doc["scan"]["number"] = scan_id, number
        doc["scan"]["command"] = command or f"tangomesh replay {self.directory} (of scan {original})"
        if self._analysis is not None:
            doc["analysis"] = {self.pipeline: copy.deepcopy(self._analysis)}
        else:
            doc["analysis"] = {self.pipeline: doc["analysis"][self.pipeline]}
        return doc

    def arrays(self, stream: str, start: int, stop: int) -> dict[str, np.ndarray] | None:
        """The recorded block's arrays; None where the source declared [start, stop) missing."""
        try:
            return self._arrays[stream, start, stop]
        except KeyError:
            raise KeyError(f"no recorded block [{start}, {stop}) of {stream}") from None

    # ------------------------------------------------------------ what only a recording knows
    def blocks(self) -> Iterator[tuple[int, int, str]]:
        """The recorded blocks and gaps, (start, stop, stream), in the order they came."""
        return ((start, stop, stream) for _, start, stop, stream in self._order)

    def times(self) -> np.ndarray:
        """Seconds since the recorded scan's start at which each block of :meth:`blocks` came."""
        return np.array([t for t, *_ in self._order])
