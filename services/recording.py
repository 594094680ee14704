"""Recordings of a scan's source streams: the frames exactly as they came, with when.

A master with a ``RecordDirectory`` keeps every message of every source
stream of a scan, byte for byte as it was received (the msgpack header and
the array buffers, compressed frames still compressed), with the time since
the scan started, in one file per stream; beside them ``scan.json``, the
scan document as StartScan brought it. ``tangomesh replay`` sends a
recording into a running mesh again (services/ops/replay.py), so that a
user reruns yesterday's scan through today's processing and tests use real
captures.

One directory per scan and pipeline::

    <root>/<scan id>/<pipeline>/scan.json
    <root>/<scan id>/<pipeline>/<stream>.tmrec

A ``.tmrec`` file is ``MAGIC`` then records, each ``>dI`` (seconds since the
scan's start, number of frames), the frames' lengths (``>Q`` each), then the
frames. Records are appended and flushed as they come; a process killed
mid-record leaves a short last record, which :func:`read_stream` reports and
leaves out. Nothing is trusted on reading: every length is checked against
the file, every record decodes through the one codec.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from services import codec

log = logging.getLogger(__name__)

MAGIC = b"TMREC1\n"
RECORD = struct.Struct(">dI")
LENGTH = struct.Struct(">Q")
SCAN_FILE = "scan.json"
SUFFIX = ".tmrec"
MAX_FRAMES = codec.MAX_ARRAYS + 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class RecordingError(ValueError):
    """A recording that is not what this module writes."""


def safe_name(name: str) -> str:
    """A scan id, pipeline or stream as one path component (never ``..`` or a separator)."""
    cleaned = _SAFE.sub("_", name).lstrip(".") or "_"
    return cleaned[:200]


def scan_directory(root: Path, scan_id: str, pipeline: str) -> Path:
    return root / safe_name(scan_id) / safe_name(pipeline or "_")


class StreamWriter:
    """Appends one stream's messages to its file (opened on the first one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self._file.write(MAGIC)
        self.messages = 0
        self.bytes = len(MAGIC)

    def write(self, seconds: float, frames: Sequence[Any]) -> None:
        views = [codec.frame_buffer(f) for f in frames]
        head = RECORD.pack(seconds, len(views)) + b"".join(LENGTH.pack(len(v)) for v in views)
        self._file.write(head)
        for view in views:
            self._file.write(view)
        self._file.flush()
        self.messages += 1
        self.bytes += len(head) + sum(len(v) for v in views)

    def close(self) -> None:
        self._file.close()


class ScanRecording:
    """What a master records of one scan: ``scan.json`` at the start, then a
    :class:`StreamWriter` per stream, opened by the stream's first message.

    Any OSError (disk full, no permission, the directory taken) comes out as
    RecordingError; the master then stops recording that scan, counts and
    logs it, and the scan itself goes on: a recording is never a reason to
    lose or hold back data."""

    def __init__(self, root: Path, scan_id: str, pipeline: str, document: dict[str, Any], started: float) -> None:
        self.directory = scan_directory(root, scan_id, pipeline)
        self.started = started  # time.monotonic() of the scan's start
        self._writers: dict[str, StreamWriter] = {}
        try:
            write_document(self.directory, document)
        except OSError as exc:
            raise RecordingError(f"cannot record scan {scan_id} in {self.directory}: {exc}") from None

    def write(self, stream: str, frames: Sequence[Any], now: float) -> None:
        try:
            writer = self._writers.get(stream)
            if writer is None:
                writer = self._writers[stream] = StreamWriter(self.directory / (safe_name(stream) + SUFFIX))
            writer.write(now - self.started, frames)
        except OSError as exc:
            raise RecordingError(f"recording {stream} in {self.directory} failed: {exc}") from None

    @property
    def bytes(self) -> int:
        return sum(w.bytes for w in self._writers.values())

    def close(self) -> None:
        for writer in self._writers.values():
            try:
                writer.close()
            except OSError as exc:  # the data written before stays readable up to its last whole record
                log.warning("closing %s: %s", writer.path, exc)
        self._writers.clear()


def write_document(directory: Path, document: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / SCAN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=1)


@dataclass(frozen=True)
class Record:
    seconds: float
    message: codec.Message  # decoded, arrays are views over the mapped file


def read_stream(path: Path) -> Iterator[Record]:
    """Every whole record of ``path``, decoded (views over a read-only map of
    the file); RecordingError for a file that is not a recording or a record
    that does not decode. A short last record (the writer was killed) ends
    the stream with a warning."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(MAGIC):
            raise RecordingError(f"{path}: not a tangomesh recording (too short)")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(data)
    if view[:len(MAGIC)] != MAGIC:
        raise RecordingError(f"{path}: not a tangomesh recording")
    pos, n = len(MAGIC), 0
    while pos < size:
        if pos + RECORD.size > size:
            log.warning("%s: a short record at byte %d (the recording was cut): ignored", path, pos)
            return
        seconds, count = RECORD.unpack_from(view, pos)
        if not 0 < count <= MAX_FRAMES or seconds != seconds:
            raise RecordingError(f"{path}: record {n} at byte {pos} is malformed ({count} frames)")
        lengths_end = pos + RECORD.size + count * LENGTH.size
        if lengths_end > size:
            log.warning("%s: a short record at byte %d (the recording was cut): ignored", path, pos)
            return
        lengths = [LENGTH.unpack_from(view, pos + RECORD.size + k * LENGTH.size)[0] for k in range(count)]
        end = lengths_end + sum(lengths)
        if end > size:
            log.warning("%s: a short record at byte %d (the recording was cut): ignored", path, pos)
            return
        frames, at = [], lengths_end
        for length in lengths:
            frames.append(view[at:at + length])
            at += length
        try:
            message = codec.decode(frames)
        except codec.CodecError as exc:
            raise RecordingError(f"{path}: record {n} does not decode: {exc}") from None
        yield Record(seconds, message)
        pos, n = end, n + 1


def read_document(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / SCAN_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise RecordingError(f"{directory}: no readable {SCAN_FILE}: {exc}") from None


def stream_files(directory: Path) -> dict[str, Path]:
    """stream name -> its file, of one recorded scan and pipeline."""
    return {p.name[:-len(SUFFIX)]: p for p in sorted(directory.glob(f"*{SUFFIX}")) if p.is_file()}
