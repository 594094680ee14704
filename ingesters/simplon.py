"""Sans-IO decoder of the DECTRIS SIMPLON stream interface, v1 ("legacy") and v2 (CBOR).

The ingester hands :func:`decode` each ZeroMQ message it receives from a
detector (the list of parts); it gets back its event (one, but for tickit's
batches): :class:`SeriesStart`
(v1 ``dheader-1.0``, v2 ``start``), :class:`Frame` (v1 ``dimage-1.0``, v2
``image``) or :class:`SeriesEnd` (v1 ``dseries_end-1.0``, v2 ``end``).
Nothing here reads a socket, so the same code decodes live streams,
recordings and the malformed bytes of the tests.

Frames the detector compressed stay compressed: each channel of a
:class:`Frame` is either a :class:`~services.compression.CompressedFrames`
of one frame (exactly an HDF5 Bitshuffle-LZ4 or LZ4 filter chunk, as the
mesh carries them) or, for raw ``<`` frames and v2 uncompressed typed
arrays, a numpy array of shape ``(y, x)``.

Wire facts (docs/ingesters.md and the reference notes on detector streams):

* v1 ``shape`` is ``[x, y]`` (width, height): the array is ``(y, x)``.
  Encodings ``<`` (raw little-endian), ``lz4<`` (one bare LZ4 block, framed
  here as an LZ4-filter chunk) and ``bs8/16/32-lz4<`` (bitshuffle-LZ4 with
  the 12-byte HDF5-filter header). ALBA's ``eiger-simulator`` sends
  bitshuffle-LZ4 *without* that header: a chunk whose first 8 bytes do not
  name the frame's size is taken as header-less and given the header
  (bitshuffle's default block of 8192 bytes).
* v2 is one CBOR document per message (self-describe tag 55799); an image's
  ``data`` maps each channel to tag 40 ``[[y, x], typed array]``, the typed
  array a tag 64..86 over raw bytes or over tag 56500
  ``["bslz4" | "lz4", elem_size, bytes]``. Every field of ``start`` is optional.

Anything malformed raises :class:`SimplonError` (a ``ValueError``) naming
what is wrong; nothing else escapes :func:`decode`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from services.compression import BSLZ4, HEADER, LZ4, CompressedFrames, CompressionError, frame_lz4_block

BITSHUFFLE_DEFAULT_BLOCK_BYTES = 8192  # bitshuffle.compress_lz4's block when none is given
MAX_PIXELS = 1 << 28  # no detector has more than 268 M pixels per frame
MAX_JSON_BYTES = 1 << 20  # a v1 JSON part (config, appendix) larger than this is not a header
V1_TYPES = {name: np.dtype(name).newbyteorder("<") for name in
            ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")}
#: RFC 8746 typed-array tags: tag -> numpy dtype (byte order included)
TYPED_ARRAYS = {
    64: "|u1", 68: "|u1", 65: ">u2", 69: "<u2", 66: ">u4", 70: "<u4", 67: ">u8", 71: "<u8",
    72: "|i1", 73: ">i2", 77: "<i2", 74: ">i4", 78: "<i4", 75: ">i8", 79: "<i8",
    80: ">f2", 84: "<f2", 81: ">f4", 85: "<f4", 82: ">f8", 86: "<f8",
}
TAG_MULTIDIM, TAG_MULTIDIM_COLUMN_MAJOR, TAG_DECTRIS_COMPRESSION = 40, 1040, 56500


class SimplonError(ValueError):
    """A SIMPLON message that is not what the protocol says."""


@dataclass(frozen=True)
class SeriesStart:
    """A series begins (the detector was armed).

    ``expected`` is how many frames the detector plans (``nimages`` ×
    ``ntrigger`` in v1, ``number_of_images`` in v2) when the header says;
    ``config`` keeps the header's scalar settings (what v1 ``basic`` or the
    v2 start message carries, without the flatfield, mask and tables).
    """

    version: int
    series: int | None  # None: a v2 start without series_id (the first image says)
    header_detail: str = ""
    expected: int | None = None
    channels: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Frame:
    """One image of a series: ``frame`` is the detector's 0-based number
    (v1 ``frame``, v2 ``image_id``); ``channels`` maps each channel's array
    name to its pixels, compressed or not."""

    version: int
    series: int
    frame: int
    channels: dict[str, CompressedFrames | np.ndarray]


@dataclass(frozen=True)
class SeriesEnd:
    version: int
    series: int


Event = SeriesStart | Frame | SeriesEnd


def decode(parts: Sequence[Any]) -> list[Event]:
    """The events of one ZeroMQ message (its parts as bytes, memoryviews or
    ``zmq.Frame``). A v1 message (JSON first part) is one event. A v2
    message is one CBOR document (normally starting with the self-describe
    tag), so one event; tickit's simulator sends what it buffered as the
    parts of one multipart message, one document per part, which gives one
    event per part. (It batches v1 messages the same way, which cannot be
    taken apart reliably: refused.)"""
    try:
        views = [_view(p) for p in parts]
    except TypeError as exc:
        raise SimplonError(f"message parts must be bytes-like: {exc}") from None
    if not views:
        raise SimplonError("empty message")
    if not bytes(views[0][:64]).lstrip().startswith(b"{"):
        return [decode_v2(v) for v in views]
    return [decode_v1(views)]


def _view(part: Any) -> memoryview:
    buffer = getattr(part, "buffer", None)  # zmq.Frame received with copy=False
    return memoryview(buffer if buffer is not None else part).cast("B")


# ---------------------------------------------------------------- stream v1
def _json(part: memoryview, what: str) -> dict[str, Any]:
    if len(part) > MAX_JSON_BYTES:
        raise SimplonError(f"{what}: a JSON part of {len(part)} bytes")
    try:
        value = json.loads(bytes(part).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SimplonError(f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SimplonError(f"{what} is not a JSON object")
    return value


def _count(doc: Mapping[str, Any], key: str, what: str, required: bool = True) -> int | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if type(value) is not int or value < 0:
        raise SimplonError(f"{what}: {key} must be a non-negative integer, not {value!r}")
    return value


def decode_v1(parts: Sequence[memoryview]) -> Event:
    head = _json(parts[0], "v1 part 0")
    htype = head.get("htype")
    if not isinstance(htype, str):
        raise SimplonError("v1 part 0 has no htype")
    if htype.startswith("dheader-"):
        return _v1_header(head, parts)
    if htype.startswith("dimage-"):
        return _v1_image(head, parts)
    if htype.startswith("dseries_end-"):
        return SeriesEnd(1, _count(head, "series", "dseries_end"))
    raise SimplonError(f"v1 message of unknown htype {htype[:40]!r}")


CONFIG_KEPT = ("nimages", "ntrigger", "x_pixels_in_detector", "y_pixels_in_detector", "bit_depth_image",
               "compression", "count_time", "frame_time", "photon_energy", "wavelength", "beam_center_x",
               "beam_center_y", "detector_distance", "trigger_mode", "software_version", "description")


def _v1_header(head: dict[str, Any], parts: Sequence[memoryview]) -> SeriesStart:
    series = _count(head, "series", "dheader")
    detail = head.get("header_detail", "")
    if detail not in ("all", "basic", "none"):
        raise SimplonError(f"dheader: header_detail must be all, basic or none, not {str(detail)[:20]!r}")
    need = {"none": 1, "basic": 2, "all": 8}[detail]
    if len(parts) not in (need, need + 1):  # + the optional header appendix
        raise SimplonError(f"dheader with header_detail {detail} has {len(parts)} parts, expected {need} "
                           f"(or {need + 1} with an appendix)")
    config: dict[str, Any] = {}
    expected = None
    if detail != "none":
        detector = _json(parts[1], "dheader detector config")
        config = {k: detector[k] for k in CONFIG_KEPT if isinstance(detector.get(k), (int, float, str))}
        nimages = _count(detector, "nimages", "detector config", required=False)
        ntrigger = _count(detector, "ntrigger", "detector config", required=False)
        if nimages is not None:
            expected = nimages * (ntrigger if ntrigger is not None else 1)
    if detail == "all":  # flatfield, pixel mask, count-rate table: a JSON header and its blob each
        for k, name in ((2, "flatfield"), (4, "pixelmask"), (6, "countrate")):
            sub = _json(parts[k], f"dheader part {k}")
            if name not in str(sub.get("htype", "")):  # tickit writes "flatfield-1.0", without the "d"
                raise SimplonError(f"dheader part {k} should be the {name} header, is {str(sub.get('htype'))[:40]!r}")
    return SeriesStart(1, series, detail, expected, ("image",), config)


def _v1_image(head: dict[str, Any], parts: Sequence[memoryview]) -> Frame:
    if len(parts) not in (4, 5):
        raise SimplonError(f"dimage message has {len(parts)} parts, expected 4 (or 5 with an appendix)")
    series = _count(head, "series", "dimage")
    frame = _count(head, "frame", "dimage")
    desc = _json(parts[1], "dimage_d")
    if not str(desc.get("htype", "")).startswith("dimage_d-"):
        raise SimplonError(f"dimage part 1 is {str(desc.get('htype'))[:40]!r}, expected dimage_d-1.0")
    shape = desc.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
        raise SimplonError(f"dimage_d shape must be [x, y] of positive integers, not {str(shape)[:40]}")
    x, y = shape
    if x * y > MAX_PIXELS:
        raise SimplonError(f"dimage_d shape {shape}: more than {MAX_PIXELS} pixels")
    dtype = V1_TYPES.get(desc.get("type"))
    if dtype is None:
        raise SimplonError(f"dimage_d type {str(desc.get('type'))[:20]!r} is not one of {sorted(V1_TYPES)}")
    encoding = desc.get("encoding")
    blob = parts[2]
    size = desc.get("size")
    if size is not None and (type(size) is not int or size != len(blob)):
        raise SimplonError(f"dimage_d says {size!r} bytes, the blob has {len(blob)}")
    _json(parts[3], "dconfig")  # timestamps: checked to be a header, not used
    nbytes = x * y * dtype.itemsize
    if encoding == "<":
        if len(blob) != nbytes:
            raise SimplonError(f"raw frame of {len(blob)} bytes, {dtype.name}[{y}, {x}] is {nbytes}")
        pixels: CompressedFrames | np.ndarray = np.frombuffer(blob, dtype).reshape(y, x)
    elif encoding == "lz4<":
        try:
            chunk = frame_lz4_block(bytes(blob), nbytes)
        except CompressionError as exc:
            raise SimplonError(f"lz4< frame: {exc}") from None
        pixels = _compressed(LZ4, dtype, (y, x), chunk)
    elif isinstance(encoding, str) and encoding.startswith("bs") and encoding.endswith("-lz4<"):
        bits = encoding[2:-5]
        if bits not in ("8", "16", "32") or int(bits) != 8 * dtype.itemsize:
            raise SimplonError(f"encoding {encoding!r} does not fit type {dtype.name}")
        pixels = _compressed(BSLZ4, dtype, (y, x), _with_bslz4_header(blob, nbytes))
    else:
        raise SimplonError(f"unknown encoding {str(encoding)[:20]!r} (known: <, lz4<, bs8/16/32-lz4<)")
    return Frame(1, series, frame, {"image": pixels})


def _with_bslz4_header(blob: memoryview, nbytes: int) -> bytes | memoryview:
    """The chunk with its 12-byte header: as sent when the first 8 bytes name
    the frame's size (DECTRIS, tickit), else given one (ALBA's header-less
    ``bitshuffle.compress_lz4`` output, default block size)."""
    if len(blob) >= HEADER.size and struct.unpack_from(">Q", blob, 0)[0] == nbytes:
        return blob
    return HEADER.pack(nbytes, BITSHUFFLE_DEFAULT_BLOCK_BYTES) + bytes(blob)


def _compressed(codec: str, dtype: np.dtype, shape: tuple[int, int], chunk: Any) -> CompressedFrames:
    try:
        return CompressedFrames.from_buffer(codec, dtype, (1, *shape), [len(chunk)], chunk)
    except CompressionError as exc:
        raise SimplonError(f"{codec} frame: {exc}") from None


# ---------------------------------------------------------------- stream v2
class _Typed:
    __slots__ = ("dtype", "content")

    def __init__(self, dtype: np.dtype, content: Any) -> None:
        self.dtype, self.content = dtype, content


class _Packed:
    __slots__ = ("codec", "elem_size", "data")

    def __init__(self, codec: Any, elem_size: Any, data: Any) -> None:
        self.codec, self.elem_size, self.data = codec, elem_size, data


class _MultiDim:
    __slots__ = ("dims", "array")

    def __init__(self, dims: Any, array: Any) -> None:
        self.dims, self.array = dims, array


def _tag_hook(*args: Any) -> Any:
    """cbor2's tag hook under either signature: 6.x calls ``hook(tag,
    immutable)``, 5.x ``hook(decoder, tag)``. Tags of the SIMPLON image
    become small markers checked afterwards; any other tag stays a CBORTag."""
    import cbor2

    tag = args[0] if isinstance(args[0], cbor2.CBORTag) else args[1]
    if tag.tag in TYPED_ARRAYS:
        return _Typed(np.dtype(TYPED_ARRAYS[tag.tag]), tag.value)
    if tag.tag == TAG_DECTRIS_COMPRESSION:
        value = tag.value
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise SimplonError("tag 56500 must hold [codec, elem_size, bytes]")
        return _Packed(*value)
    if tag.tag == TAG_MULTIDIM:
        value = tag.value
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise SimplonError("tag 40 must hold [dims, array]")
        return _MultiDim(*value)
    if tag.tag == TAG_MULTIDIM_COLUMN_MAJOR:
        raise SimplonError("column-major multi-dimensional arrays (tag 1040) are not supported")
    return tag


def decode_v2(message: memoryview) -> Event:
    import cbor2

    try:
        doc = cbor2.loads(bytes(message), tag_hook=_tag_hook, max_depth=64) if _has_max_depth() \
            else cbor2.loads(bytes(message), tag_hook=_tag_hook)
    except SimplonError:
        raise
    except Exception as exc:  # CBORDecodeError, EOF, RecursionError, MemoryError on a forged length ...
        raise SimplonError(f"v2 message is not CBOR: {type(exc).__name__}: {exc}") from None
    if not isinstance(doc, Mapping):
        raise SimplonError(f"v2 message is a {type(doc).__name__}, expected a map")
    kind = doc.get("type")
    if kind == "start":
        return _v2_start(doc)
    if kind == "image":
        return _v2_image(doc)
    if kind == "end":
        return SeriesEnd(2, _count(doc, "series_id", "v2 end"))
    raise SimplonError(f"v2 message of unknown type {str(kind)[:40]!r}")


_MAX_DEPTH: bool | None = None


def _has_max_depth() -> bool:
    """cbor2 6 bounds nesting itself (``max_depth``); 5 raises RecursionError, caught as well."""
    global _MAX_DEPTH
    if _MAX_DEPTH is None:
        import inspect

        import cbor2

        try:
            _MAX_DEPTH = "max_depth" in inspect.signature(cbor2.loads).parameters
        except (TypeError, ValueError):
            _MAX_DEPTH = False
    return _MAX_DEPTH


V2_SCALARS = ("number_of_images", "image_size_x", "image_size_y", "image_dtype", "count_time", "frame_time",
              "beam_center_x", "beam_center_y", "incident_energy", "incident_wavelength", "detector_description",
              "detector_serial_number", "series_unique_id", "saturation_value", "sensor_material")


def _v2_start(doc: Mapping[str, Any]) -> SeriesStart:
    series = _count(doc, "series_id", "v2 start", required=False)
    channels = doc.get("channels", ())
    if not isinstance(channels, (list, tuple)) or not all(isinstance(c, str) and 0 < len(c) <= 64 for c in channels):
        raise SimplonError("v2 start: channels must be a list of names")
    expected = _count(doc, "number_of_images", "v2 start", required=False)
    config = {k: doc[k] for k in V2_SCALARS if isinstance(doc.get(k), (int, float, str))}
    return SeriesStart(2, series, "", expected, tuple(channels), config)


def _v2_image(doc: Mapping[str, Any]) -> Frame:
    series = _count(doc, "series_id", "v2 image")
    frame = _count(doc, "image_id", "v2 image")
    data = doc.get("data")
    if not isinstance(data, Mapping) or not data:
        raise SimplonError("v2 image without a data map")
    channels = {}
    for name, value in data.items():
        if not isinstance(name, str) or not 0 < len(name) <= 64 or "/" in name:
            raise SimplonError(f"v2 image: channel name {str(name)[:40]!r}")
        channels[name] = _v2_array(name, value)
    return Frame(2, series, frame, channels)


def _v2_array(name: str, value: Any) -> CompressedFrames | np.ndarray:
    if not isinstance(value, _MultiDim):
        raise SimplonError(f"channel {name}: not a multi-dimensional array (tag 40)")
    dims = value.dims
    if not (isinstance(dims, (list, tuple)) and len(dims) == 2 and all(type(n) is int and n > 0 for n in dims)):
        raise SimplonError(f"channel {name}: dims must be [y, x] of positive integers, not {str(dims)[:40]}")
    if math.prod(dims) > MAX_PIXELS:
        raise SimplonError(f"channel {name}: {dims} is more than {MAX_PIXELS} pixels")
    typed = value.array
    if not isinstance(typed, _Typed):
        raise SimplonError(f"channel {name}: the array is not a typed array (tags 64..86)")
    dtype, shape, content = typed.dtype, (dims[0], dims[1]), typed.content
    if isinstance(content, (bytes, bytearray)):
        if len(content) != math.prod(shape) * dtype.itemsize:
            raise SimplonError(f"channel {name}: {len(content)} bytes for {dtype.str}{list(shape)}")
        return np.frombuffer(content, dtype).reshape(shape)
    if not isinstance(content, _Packed):
        raise SimplonError(f"channel {name}: typed array over {type(content).__name__}, expected bytes or tag 56500")
    if content.codec not in (BSLZ4, LZ4) or not isinstance(content.data, (bytes, bytearray)):
        raise SimplonError(f"channel {name}: tag 56500 codec {str(content.codec)[:20]!r} (known: bslz4, lz4)")
    if content.codec == BSLZ4 and content.elem_size != dtype.itemsize:
        raise SimplonError(f"channel {name}: bslz4 element size {content.elem_size!r}, the dtype's is {dtype.itemsize}")
    return _compressed(content.codec, dtype, shape, content.data)
