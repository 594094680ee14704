"""The one wire codec of the data plane.

A message is a ZeroMQ multipart message: frame 0 is a msgpack header, frames
1..n are the raw C-order buffers of the arrays the header describes. Arrays go
out and come back without a copy (``copy=False`` on both ends, ``np.frombuffer``
over the received frame), so a 4 MB detector frame costs the same header work as
a 300-byte counter set.

The unit on the wire is a *block*: ``count`` consecutive acquisition indices of
one stream starting at ``index``; every array of a block carries that leading
point axis. A single point is a block of one.

An array may also travel still compressed, as the detector made it
(services/compression.py): its descriptor then has a fourth entry, the codec
and each point's chunk size, and decode gives a :class:`CompressedFrames`
over the received frame in place of an ndarray, decompressed only by the
worker that needs the pixels.

Every decode validates everything it reads and raises :class:`CodecError`, and
only that, on anything malformed: services count and log it and carry on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np
import zmq

from services.compression import CompressedFrames, CompressionError

WIRE_VERSION = 1

#: Message types. Block types carry a leading point axis on every array.
SCAN_START = "scan_start"
SCAN_END = "scan_end"
SCAN_ABORT = "scan_abort"
DATA = "data"
RESULT = "result"
GAP = "gap"
CREDIT = "credit"
ACK = "ack"
QUERY = "query"  # a question to a store (the sink): meta is the query document
REPLY = "reply"  # its answer: meta says ok or why not, arrays carry the data
MESSAGE_TYPES = frozenset({SCAN_START, SCAN_END, SCAN_ABORT, DATA, RESULT, GAP, CREDIT, ACK, QUERY, REPLY})
BLOCK_TYPES = frozenset({DATA, RESULT, GAP})

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_ARRAYS = 256
MAX_NDIM = 8
MAX_NAME_CHARS = 256
MAX_INDEX = 2**53
MAX_COUNT = 2**31
_NUMERIC_KINDS = frozenset("biufc")
_HEADER_KEYS = frozenset({"v", "t", "scan", "stream", "index", "count", "arrays", "meta"})
_UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=True,
    max_str_len=MAX_HEADER_BYTES,
    max_bin_len=MAX_HEADER_BYTES,
    max_array_len=1_000_000,
    max_map_len=1_000_000,
    max_ext_len=0,
)


class CodecError(ValueError):
    """A frame set that is not a valid tangomesh message (or cannot become one)."""


@dataclass(slots=True)
class Message:
    """One data-plane message; decoded ``arrays`` are views over the received frames."""

    type: str
    scan: str = ""
    stream: str = ""
    index: int = 0
    count: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stop(self) -> int:
        """One past the last acquisition index of the block."""
        return self.index + self.count

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


# --------------------------------------------------------------------------- encode


def encode(msg: Message) -> list[Any]:
    """Frames for ``msg``: header bytes, then one buffer per array (no copies of
    contiguous arrays). Raises CodecError for what decode would refuse."""
    _check_scalar_fields(msg.type, msg.scan, msg.stream, msg.index, msg.count)
    if not isinstance(msg.meta, dict):
        raise CodecError("meta must be a dict")
    _check_meta(msg.meta)
    if len(msg.arrays) > MAX_ARRAYS:
        raise CodecError(f"too many arrays ({len(msg.arrays)} > {MAX_ARRAYS})")
    descriptors = []
    buffers: list[Any] = []
    block = msg.type in BLOCK_TYPES
    for name, value in msg.arrays.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise CodecError(f"bad array name {name!r}")
        if isinstance(value, CompressedFrames):  # as received: the chunks go on as they are
            if block and value.shape[0] != msg.count:
                raise CodecError(f"array {name!r}: {value.shape[0]} compressed frames != block count {msg.count}")
            descriptors.append((name, value.dtype.str, list(value.shape),
                                {"codec": value.codec, "sizes": value.sizes()}))
            buffers.append(value.data)
            continue
        if type(value) is np.ndarray:
            arr = value
        else:
            try:
                arr = np.asarray(value)
            except (TypeError, ValueError) as exc:
                raise CodecError(f"array {name!r}: not an array: {exc}") from exc
        dtype, shape = arr.dtype, arr.shape
        if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
            raise CodecError(f"array {name!r}: dtype {dtype} is not numeric")
        if len(shape) > MAX_NDIM:
            raise CodecError(f"array {name!r}: {len(shape)} dimensions > {MAX_NDIM}")
        if block and (not shape or shape[0] != msg.count):
            raise CodecError(f"array {name!r}: leading axis {shape[:1]} != block count {msg.count}")
        if shape and max(shape) >= MAX_COUNT:
            raise CodecError(f"array {name!r}: a size in {shape} is >= 2**31")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        descriptors.append((name, dtype.str, list(shape)))
        # the array itself is the frame (buffer protocol, C order): no copy here
        buffers.append((arr if arr.ndim else arr.reshape(1)) if arr.size else b"")
    header = {
        "v": WIRE_VERSION,
        "t": msg.type,
        "scan": msg.scan,
        "stream": msg.stream,
        "index": msg.index,
        "count": msg.count,
        "arrays": descriptors,
        "meta": msg.meta,
    }
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except Exception as exc:  # msgpack raises TypeError/ValueError/OverflowError
        raise CodecError(f"header not serialisable: {exc}") from exc
    if len(packed) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(packed)} bytes > {MAX_HEADER_BYTES}")
    return [packed, *buffers]


def _check_meta(obj: Any) -> None:
    """What msgpack would pack but decode's unpack limits refuse."""
    if isinstance(obj, dict):
        if len(obj) > 1_000_000:
            raise CodecError("meta map of more than 1,000,000 entries")
        for key, value in obj.items():
            if not isinstance(key, (str, bytes)):
                raise CodecError(f"meta key {key!r} is not a string")
            _check_meta(value)
    elif isinstance(obj, (list, tuple)):
        if len(obj) > 1_000_000:
            raise CodecError("meta list of more than 1,000,000 items")
        for value in obj:
            _check_meta(value)


# --------------------------------------------------------------------------- decode


def decode(frames: Sequence[Any]) -> Message:
    """Validate and decode a frame list (``zmq.Frame``, bytes or buffers).

    Array values are zero-copy views over the received frames.
    """
    if not isinstance(frames, (list, tuple)):
        raise CodecError(f"a message is a list of frames, not {type(frames).__name__}")
    if not frames:
        raise CodecError("empty message")
    raw_header = _as_buffer(frames[0])
    if len(raw_header) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(raw_header)} bytes > {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw_header, **_UNPACK_LIMITS)
    except Exception as exc:  # any malformed msgpack, whatever exception it raises
        raise CodecError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError("header is not a map")
    keys = header.keys()
    if keys != _HEADER_KEYS:
        missing = sorted(_HEADER_KEYS - set(keys))
        extra = sorted(map(str, set(keys) - _HEADER_KEYS))
        raise CodecError(f"header keys wrong: missing {missing}, unexpected {extra}")
    if header["v"] != WIRE_VERSION or type(header["v"]) is not int:
        raise CodecError(f"unsupported wire version {header['v']!r} (this end speaks {WIRE_VERSION})")
    mtype, scan, stream = header["t"], header["scan"], header["stream"]
    index, count = header["index"], header["count"]
    _check_scalar_fields(mtype, scan, stream, index, count)
    meta = header["meta"]
    if not isinstance(meta, dict):
        raise CodecError("meta is not a map")
    descriptors = header["arrays"]
    if not isinstance(descriptors, list) or len(descriptors) > MAX_ARRAYS:
        raise CodecError("arrays is not a list of at most %d descriptors" % MAX_ARRAYS)
    if len(frames) != 1 + len(descriptors):
        raise CodecError(f"{len(frames) - 1} buffer frames for {len(descriptors)} array descriptors")
    arrays: dict[str, np.ndarray] = {}
    block = mtype in BLOCK_TYPES
    for descriptor, frame in zip(descriptors, frames[1:]):
        compressed = type(descriptor) is list and len(descriptor) == 4
        name, dtype, shape, expected = _check_descriptor(descriptor[:3] if compressed else descriptor)
        if name in arrays:
            raise CodecError(f"array {name!r} appears twice")
        if block and (not shape or shape[0] != count):
            raise CodecError(f"array {name!r}: leading axis {list(shape[:1])} != block count {count}")
        buf = _as_buffer(frame)
        if compressed:
            arrays[name] = _compressed(name, dtype, shape, descriptor[3], buf)
            continue
        if len(buf) != expected:
            raise CodecError(
                f"array {name!r}: buffer of {len(buf)} bytes, descriptor {dtype.str}{list(shape)} needs {expected}"
            )
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else np.empty(shape, dtype)
    return Message(mtype, scan, stream, index, count, arrays, meta)


def _compressed(name: str, dtype: np.dtype, shape: tuple[int, ...], spec: Any, buf: memoryview) -> Any:
    if type(spec) is not dict or spec.keys() != {"codec", "sizes"} or type(spec["sizes"]) is not list:
        raise CodecError(f"array {name!r}: a compressed array's fourth entry is {{codec, sizes}}")
    try:
        return CompressedFrames.from_buffer(spec["codec"], dtype, shape, spec["sizes"], buf)
    except CompressionError as exc:
        raise CodecError(f"array {name!r}: {exc}") from None


def frame_buffer(frame: Any) -> memoryview:
    """The bytes of one frame (``zmq.Frame``, bytes or a buffer) as a flat view, without a copy."""
    return _as_buffer(frame)


def _as_buffer(frame: Any) -> memoryview:
    if isinstance(frame, zmq.Frame):
        frame = frame.buffer
    try:
        view = memoryview(frame)
        if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous:
            view = view.cast("B")  # TypeError if not C-contiguous
    except (TypeError, ValueError, BufferError) as exc:
        raise CodecError(f"frame of type {type(frame).__name__} is not a buffer ({exc})") from exc
    return view


def _check_scalar_fields(mtype: Any, scan: Any, stream: Any, index: Any, count: Any) -> None:
    if not isinstance(mtype, str) or mtype not in MESSAGE_TYPES:
        raise CodecError(f"unknown message type {mtype!r}")
    for label, text in (("scan", scan), ("stream", stream)):
        if not isinstance(text, str) or len(text) > MAX_NAME_CHARS:
            raise CodecError(f"{label} must be a string of at most {MAX_NAME_CHARS} characters")
    if type(index) is not int or not 0 <= index < MAX_INDEX:
        raise CodecError(f"index {index!r} out of range [0, 2**53)")
    if type(count) is not int or not 0 <= count <= MAX_COUNT:
        raise CodecError(f"count {count!r} out of range [0, 2**31]")


_dtype_cache: dict[str, np.dtype] = {}
# Portable numeric dtypes only: no platform-dependent long doubles (f16, c32).
_DTYPE_PATTERN = re.compile(r"[<>|](?:[biu][1248]|f[248]|c(?:8|16))")
_MAX_NBYTES = int(np.iinfo(np.intp).max)


#: (dtype text, *shape) -> (dtype, shape, bytes) of descriptors already checked:
#: a stream repeats the same few, so most decodes skip the checks below.
_layout_cache: dict[tuple, tuple[np.dtype, tuple[int, ...], int]] = {}
_LAYOUT_CACHE_MAX = 4096


def _check_descriptor(descriptor: Any) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """name, dtype, shape and byte size of a valid array descriptor."""
    if type(descriptor) is not list or len(descriptor) != 3:
        raise CodecError("array descriptor is not [name, dtype, shape]")
    name, dtype_str, shape = descriptor
    if type(name) is not str or not name or len(name) > MAX_NAME_CHARS:
        raise CodecError(f"bad array name {name!r}")
    if type(dtype_str) is str and type(shape) is list and all(type(size) is int for size in shape):
        layout = _layout_cache.get((dtype_str, *shape))  # ints only: True would hash like 1
        if layout is not None:
            return name, *layout
    dtype = _dtype_cache.get(dtype_str) if isinstance(dtype_str, str) else None
    if dtype is None:
        dtype = _parse_dtype(dtype_str)
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise CodecError(f"array {name!r}: shape must be a list of at most {MAX_NDIM} sizes")
    for size in shape:
        if type(size) is not int or not 0 <= size < MAX_COUNT:
            raise CodecError(f"array {name!r}: bad size {size!r} in shape")
    if math.prod(size for size in shape if size) * dtype.itemsize > _MAX_NBYTES:
        raise CodecError(f"array {name!r}: shape {shape} of {dtype.str} is too large to represent")
    layout = (dtype, tuple(shape), math.prod(shape) * dtype.itemsize)
    if len(_layout_cache) < _LAYOUT_CACHE_MAX:
        _layout_cache[(dtype_str, *shape)] = layout
    return name, *layout


def _parse_dtype(dtype_str: Any) -> np.dtype:
    """Only canonical numeric dtype strings (``np.dtype(x).str == x``) travel."""
    if not isinstance(dtype_str, str):
        raise CodecError(f"bad dtype {dtype_str!r}")
    if not _DTYPE_PATTERN.fullmatch(dtype_str):
        raise CodecError(f"dtype {dtype_str!r} is not a canonical numeric dtype")
    try:
        dtype = np.dtype(dtype_str)
    except Exception as exc:
        raise CodecError(f"bad dtype {dtype_str!r}") from exc
    if dtype.kind not in _NUMERIC_KINDS or dtype.str != dtype_str or dtype.fields is not None:
        raise CodecError(f"dtype {dtype_str!r} is not a canonical numeric dtype")
    if len(_dtype_cache) < 64:
        _dtype_cache[dtype_str] = dtype
    return dtype


# --------------------------------------------------------------------------- sockets


#: Frames at least this big go zero-copy; smaller ones are copied, which is
#: cheaper than pinning them (pyzmq's own copy_threshold has the same default).
ZERO_COPY_BYTES = 65536
_SNDMORE = int(zmq.SNDMORE)
_send_frame = zmq.backend.Socket.send  # skips the pure-Python layer: ~10 us less per frame


def send_frames(socket: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send a multipart message: big buffers without a copy, small ones copied.

    Equivalent to ``send_multipart(frames, flags, copy=False)``, several times
    cheaper per frame, which is what small messages at kHz rates pay for.
    """
    flags = int(flags)
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        big = memoryview(frame).nbytes >= ZERO_COPY_BYTES
        _send_frame(socket, frame, flags | _SNDMORE if i < last else flags, not big)


def send(socket: zmq.Socket, msg: Message, flags: int = 0, prefix: Iterable[bytes] = ()) -> None:
    """Send ``msg`` (after optional routing frames) without copying big array buffers."""
    send_frames(socket, [*prefix, *encode(msg)], flags)


_recv_frame = zmq.backend.Socket.recv


def recv_frames(socket: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """All frames of one multipart message, without copies; ``recv_multipart``
    without its per-frame Python layer and RCVMORE round trips."""
    frame = _recv_frame(socket, int(flags), False, False)
    frames = [frame]
    while frame.more:  # the rest of a multipart message has arrived with its first frame
        frame = _recv_frame(socket, 0, False, False)
        frames.append(frame)
    return frames


def recv(socket: zmq.Socket, flags: int = 0) -> Message:
    """Receive and decode one message; raises CodecError on a malformed one
    (the bad message is consumed, so the caller can count it and go on)."""
    return decode(recv_frames(socket, flags))


def recv_routed(socket: zmq.Socket, flags: int = 0) -> tuple[bytes, Message]:
    """For ROUTER sockets: the peer identity and its decoded message."""
    frames = recv_frames(socket, flags)
    if len(frames) < 2:
        raise CodecError("routed message without identity")
    return frames[0].bytes, decode(frames[1:])
