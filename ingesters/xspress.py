"""Sans-IO decoder of the Xspress3 / Xspress3 Mini stream of MAX IV's ``xspress3-streamer`` Tango device.

The device publishes on ZeroMQ PUB (reference notes on detector streams, section 3):

* header: one JSON part ``{"htype": "header", "filename": ..., "overwritable": ...}``
  (newer firmware adds ``limits`` and ``extra_tags``) when an acquisition starts;
* per frame: a JSON ``{"htype": "image", "frame": i, "shape": [channels, bins],
  "type": "uint32", "compression": "none", "exptime": s}``, the raw C-order
  spectra, and a pickle of the scaler list ``[ocr, AllEvents, AllGood,
  ClockTicks, TotalTicks, ResetTicks, event_width, dtc, (window_counts)]``,
  one numpy array per entry, one value per channel. Old firmware sends the
  three as **three single-part messages**, new firmware as **one 3-part
  message**; both are taken;
* end: ``{"htype": "series_end"}``.

:class:`XspressDecoder` is fed each received message (its parts) and gives
back the series events the ingester's series mapping (:mod:`ingesters.series`)
takes, the same event types as the SIMPLON decoder's: :class:`XspressStart`,
:class:`XspressFrame`, :class:`XspressEnd`. It keeps state only for the old
three-message form (a frame's spectra and scalers follow its image header)
and to number the series: the stream has no series number, so each header
starts series 1, 2, ... of this decoder (frames that come before any header
are series 0, which the mapping refuses: the ingester came up mid-series).

The scalers are a pickle, and unpickling runs whatever a pickle asks for.
:class:`ScalerUnpickler` gives a pickle nothing real: its ``find_class``
answers the three names a numpy array's pickle needs (``_reconstruct``,
``ndarray``, ``dtype``) with inert stand-ins of this module, which only record
shape, numeric dtype and bytes; the arrays are then built here with
``numpy.frombuffer``. Any other name is refused with the reason. Every part
is validated (JSON fields, sizes, dtypes, channel counts, frame numbers);
anything malformed raises :class:`XspressError` (a ``ValueError``) naming
what is wrong, and nothing else escapes :meth:`XspressDecoder.feed`.

A frame's arrays (``XspressFrame.channels``, the name the series mapping
reads; here they are arrays, not detector channels) per kept channel:
``mca`` ``(channels, bins)`` (a zero-copy view of the received spectra when
all channels are kept), the dead-time quantities ``icr``, ``ocr``, ``dtc``,
``live_time`` recomputed from the raw counters (:mod:`ingesters.deadtime`;
the ``ocr`` the device sends is mis-scaled and is dropped), and the raw
counters ``all_events``, ``all_good``, ``clock_ticks``, ``total_ticks``,
``reset_ticks``, ``event_width`` (and ``window_counts`` ``(windows,
channels)`` when sent); and the frame's ``exptime`` (s, one value).
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ingesters.deadtime import dead_time
from ingesters.simplon import Frame, SeriesEnd, SeriesStart

MAX_CHANNELS = 64  # an Xspress3 box has up to 8 channels, an Xspress4 up to 64 in one stream
MAX_BINS = 1 << 16
MAX_JSON_BYTES = 1 << 20
MAX_PICKLE_BYTES = 1 << 20
MAX_WINDOWS = 64
SPECTRA_TYPES = {"uint32": np.dtype("<u4")}  # what the streamer sends (raw little-endian)
#: the scaler list, in the device's order; the device's ``ocr`` (0) and ``dtc`` (7) are checked, not kept
SCALERS = ("sent_ocr", "all_events", "all_good", "clock_ticks", "total_ticks", "reset_ticks", "event_width",
           "sent_dtc")
COUNTERS = ("all_events", "all_good", "clock_ticks", "total_ticks", "reset_ticks", "event_width")
#: numeric dtypes a scaler pickle may carry (numpy's pickled dtype names)
PICKLED_DTYPES = {"u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8"}


class XspressError(ValueError):
    """An Xspress stream message that is not what the streamer sends."""


@dataclass(frozen=True)
class XspressStart(SeriesStart):
    """The streamer's header: an acquisition starts. It does not say how many frames are
    planned (``expected`` stays None) nor the channels and bins (the frames do);
    ``config`` keeps its fields (``filename``, ``overwritable``, ``extra_tags``, ``limits``)."""


@dataclass(frozen=True)
class XspressFrame(Frame):
    """One frame: ``frame`` is the streamer's 0-based number, ``channels`` the arrays
    named in the module docstring, ``exptime`` the frame's exposure (s) as sent."""

    exptime: float = 0.0


@dataclass(frozen=True)
class XspressEnd(SeriesEnd):
    pass


Event = XspressStart | XspressFrame | XspressEnd
OLD, MULTIPART = 1, 2  # the ``version`` of the events: which of the two message forms carried them


# ---------------------------------------------------------------- the restricted unpickler
class _PickledNdarray:
    """Stands in for ``numpy.ndarray`` in a pickle: a class to pass to ``_reconstruct``, nothing else."""

    def __init__(self) -> None:
        raise pickle.UnpicklingError("a pickle may not instantiate numpy.ndarray directly")


class _ArrayState:
    """What a pickled array says it is (shape, dtype, bytes), recorded by ``__setstate__``."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("an array's state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and len(shape) <= 2 and all(type(n) is int and 0 <= n < 1 << 24
                                                                      for n in shape)):
            raise pickle.UnpicklingError(f"an array's shape {shape!r} is not one or two small sizes")
        if not isinstance(dtype, _DtypeState) or dtype.dtype is None:
            raise pickle.UnpicklingError("an array's dtype is not a numeric dtype")
        if not isinstance(data, (bytes, bytearray)) or type(fortran) is not bool:
            raise pickle.UnpicklingError("an array's data is not raw bytes")
        if len(data) != math.prod(shape) * dtype.dtype.itemsize:
            raise pickle.UnpicklingError(f"an array of shape {shape} {dtype.dtype} has {len(data)} bytes")
        self.array = np.frombuffer(data, dtype.dtype).reshape(shape, order="F" if fortran else "C")


class _DtypeState:
    """Stands in for ``numpy.dtype``: only the numeric names in PICKLED_DTYPES, byte order set by its state."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(name, str) or name not in PICKLED_DTYPES:
            raise pickle.UnpicklingError(f"dtype {name!r} refused: only numeric dtypes "
                                         f"({', '.join(sorted(PICKLED_DTYPES))})")
        self.name = name
        self.dtype: np.dtype | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise pickle.UnpicklingError(f"a dtype's state {state!r:.80} has no byte order")
        order = {"=": "<" if np.little_endian else ">"}.get(state[1], state[1])
        self.dtype = np.dtype(self.name).newbyteorder(order) if order != "|" else np.dtype(self.name)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayState:
    if cls is not _PickledNdarray:
        raise pickle.UnpicklingError("_reconstruct may only make a numpy.ndarray")
    return _ArrayState()


#: the only names a scaler pickle gets, each mapped to an inert stand-in (never the real object)
STAND_INS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # pickles written by numpy 2
    ("numpy", "ndarray"): _PickledNdarray,
    ("numpy", "dtype"): _DtypeState,
}


class ScalerUnpickler(pickle.Unpickler):
    """An unpickler that hands a pickle none of Python's or numpy's objects."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return STAND_INS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"the pickle asks for {module}.{name}: refused (a scaler pickle may "
                                         "hold only lists of numeric numpy arrays)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids refused")


def load_scalers(part: memoryview | bytes) -> list[np.ndarray]:
    """The scaler list of one frame from its pickle, through :class:`ScalerUnpickler` only."""
    if len(part) > MAX_PICKLE_BYTES:
        raise XspressError(f"scaler pickle of {len(part)} bytes (at most {MAX_PICKLE_BYTES})")
    data = bytes(part)
    if data[:1] != b"\x80" or len(data) < 2 or not 2 <= data[1] <= 5:
        raise XspressError("the scaler part is not a pickle (protocol 2 to 5)")
    buffer = io.BytesIO(data)
    try:
        value = ScalerUnpickler(buffer).load()
    except XspressError:
        raise
    except Exception as exc:  # UnpicklingError, and whatever a malformed pickle makes the machine raise
        raise XspressError(f"scaler pickle refused: {exc}") from None
    if buffer.tell() != len(data):
        raise XspressError(f"scaler pickle has {len(data) - buffer.tell()} bytes after its end")
    if not isinstance(value, (list, tuple)):
        raise XspressError(f"the scaler pickle holds a {type(value).__name__}, not a list")
    arrays = []
    for k, item in enumerate(value):
        if not isinstance(item, _ArrayState) or item.array is None:
            raise XspressError(f"scaler {k} is not a numpy array")
        arrays.append(item.array)
    return arrays


# ---------------------------------------------------------------- the decoder
def _view(part: Any) -> memoryview:
    buffer = getattr(part, "buffer", None)  # zmq.Frame received with copy=False
    try:
        return memoryview(buffer if buffer is not None else part).cast("B")
    except TypeError as exc:
        raise XspressError(f"message parts must be bytes-like: {exc}") from None


def _json(part: memoryview) -> dict[str, Any] | None:
    """The part as a JSON object, or None if it is not one (binary data)."""
    if len(part) > MAX_JSON_BYTES or bytes(part[:1]) != b"{":
        return None
    try:
        value = json.loads(bytes(part).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise XspressError(f"{what} must be an integer {low}..{high}, not {value!r:.40}")
    return value


@dataclass(frozen=True)
class _ImageHeader:
    frame: int
    channels: int
    bins: int
    dtype: np.dtype
    exptime: float

    @property
    def nbytes(self) -> int:
        return self.channels * self.bins * self.dtype.itemsize


def image_header(head: dict[str, Any]) -> _ImageHeader:
    frame = _int(head.get("frame"), "image 'frame'", 0, 2**31 - 1)
    shape = head.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2):
        raise XspressError(f"image {frame}: 'shape' must be [channels, bins], not {shape!r:.60}")
    channels = _int(shape[0], f"image {frame}: channels", 1, MAX_CHANNELS)
    bins = _int(shape[1], f"image {frame}: bins", 1, MAX_BINS)
    dtype = SPECTRA_TYPES.get(head.get("type"))  # type: ignore[arg-type]
    if dtype is None:
        raise XspressError(f"image {frame}: spectra type {head.get('type')!r:.40} (the streamer sends "
                           f"{', '.join(SPECTRA_TYPES)})")
    if head.get("compression", "none") != "none":
        raise XspressError(f"image {frame}: compression {head.get('compression')!r:.40} is not supported")
    exptime = head.get("exptime", 0.0)
    if type(exptime) not in (int, float) or not 0 <= exptime < 1e6:
        raise XspressError(f"image {frame}: 'exptime' {exptime!r:.40} is not a time in seconds")
    return _ImageHeader(frame, channels, bins, dtype, float(exptime))


class XspressDecoder:
    """One stream's decoder. :meth:`feed` takes one received message and returns its events;
    a refused message raises :class:`XspressError`. A frame of the old form that is cut
    short by another message is refused too; its reason waits in :meth:`pop_problems`.

    ``keep``: the detector channels kept, in that order (None: all)."""

    def __init__(self, keep: Sequence[int] | None = None) -> None:
        if keep is not None:
            keep = tuple(keep)
            if not keep or len(set(keep)) != len(keep) or any(type(k) is not int or not 0 <= k < MAX_CHANNELS
                                                              for k in keep):
                raise ValueError(f"channels kept must be distinct channel numbers 0..{MAX_CHANNELS - 1}, "
                                 f"not {list(keep)}")
        self.keep = keep
        self.series = 0  # headers seen; frames before the first are series 0
        self._image: _ImageHeader | None = None  # old form: the image header whose parts follow
        self._spectra: memoryview | None = None
        self._problems: list[str] = []

    def pop_problems(self) -> list[str]:
        out, self._problems = self._problems, []
        return out

    def feed(self, parts: Sequence[Any]) -> list[Event]:
        views = [_view(p) for p in parts]
        if len(views) == 3:
            self._abandon("a 3-part message came")
            head = _json(views[0])
            if head is None or head.get("htype") != "image":
                raise XspressError("a 3-part message that is not an image (JSON header, spectra, scalers)")
            image = image_header(head)
            return [self._frame(image, views[1], views[2], MULTIPART)]
        if len(views) != 1:
            self._abandon(f"a {len(views)}-part message came")
            raise XspressError(f"a message of {len(views)} parts: the streamer sends 1 (old form) or 3")
        part = views[0]
        if self._image is not None:
            image = self._image
            if self._spectra is None and len(part) == image.nbytes:  # size first: spectra may start with b"{"
                self._spectra = part
                return []
            if self._spectra is not None and bytes(part[:1]) == b"\x80":
                spectra, self._image, self._spectra = self._spectra, None, None
                return [self._frame(image, spectra, part, OLD)]
            head = _json(part)
            if head is None:
                want = "its scaler pickle" if self._spectra is not None else f"its spectra ({image.nbytes} bytes)"
                self._image, self._spectra = None, None
                raise XspressError(f"frame {image.frame}: expected {want}, got {len(part)} bytes: frame refused")
            self._abandon(f"a {head.get('htype')!r:.40} message came")
            return self._message(head)
        head = _json(part)
        if head is None:
            raise XspressError(f"a binary part of {len(part)} bytes without its image header (lost?): refused")
        return self._message(head)

    def _abandon(self, why: str) -> None:
        if self._image is not None:
            what = "scalers" if self._spectra is not None else "spectra and scalers"
            self._problems.append(f"frame {self._image.frame}: {why} before its {what}: frame refused")
        self._image, self._spectra = None, None

    def _message(self, head: dict[str, Any]) -> list[Event]:
        htype = head.get("htype")
        if htype == "header":
            self.series += 1
            config = {k: head[k] for k in ("filename", "overwritable", "extra_tags", "limits") if k in head}
            if not isinstance(config.get("filename", ""), str):
                raise XspressError("header 'filename' is not a string")
            tags = config.get("extra_tags", [])
            if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                raise XspressError("header 'extra_tags' is not a list of names")
            return [XspressStart(OLD, self.series, config=config)]
        if htype == "series_end":
            return [XspressEnd(OLD, self.series)]
        if htype == "image":
            self._image = image_header(head)  # its spectra and scalers follow as their own messages
            return []
        raise XspressError(f"unknown htype {htype!r:.40} (header, image, series_end)")

    def _frame(self, image: _ImageHeader, spectra: memoryview, scalers: memoryview, form: int) -> XspressFrame:
        if len(spectra) != image.nbytes:
            raise XspressError(f"frame {image.frame}: spectra of {len(spectra)} bytes, the header's "
                               f"{image.channels} x {image.bins} {image.dtype} need {image.nbytes}")
        mca = np.frombuffer(spectra, image.dtype).reshape(image.channels, image.bins)
        values = load_scalers(scalers)
        if len(values) not in (8, 9):
            raise XspressError(f"frame {image.frame}: {len(values)} scalers (the streamer sends 8, or 9 with "
                               "window counts)")
        named = dict(zip(SCALERS, values))
        for name, a in named.items():
            if a.shape != (image.channels,):
                raise XspressError(f"frame {image.frame}: scaler {name} has shape {a.shape}, not "
                                   f"({image.channels},) like the spectra")
            if name in COUNTERS:
                if a.dtype.kind not in "ui":
                    raise XspressError(f"frame {image.frame}: counter {name} is {a.dtype}, not an integer")
                if a.dtype.kind == "i" and (a < 0).any():
                    raise XspressError(f"frame {image.frame}: counter {name} is negative")
            elif a.dtype.kind != "f":
                raise XspressError(f"frame {image.frame}: {name} is {a.dtype}, not a float")
        windows = values[8] if len(values) == 9 else None
        if windows is not None and not (windows.ndim == 2 and windows.shape[1] == image.channels
                                        and 1 <= windows.shape[0] <= MAX_WINDOWS and windows.dtype.kind in "ui"):
            raise XspressError(f"frame {image.frame}: window counts of shape {windows.shape} {windows.dtype}, "
                               f"not (windows, {image.channels}) integers")
        keep: Any = slice(None)
        if self.keep is not None:
            if max(self.keep) >= image.channels:
                raise XspressError(f"frame {image.frame}: channels kept {list(self.keep)} but the detector "
                                   f"sends {image.channels}")
            keep = list(self.keep)
        counters = {name: named[name][keep] for name in COUNTERS}
        arrays: dict[str, np.ndarray] = {"mca": mca[keep]}
        arrays.update(dead_time(counters["all_events"], counters["all_good"], counters["clock_ticks"],
                                counters["reset_ticks"], counters["event_width"]))
        arrays.update(counters)
        arrays["exptime"] = np.array(image.exptime)  # one value per frame: (frames,) in a block
        if windows is not None:
            arrays["window_counts"] = windows[:, keep]
        return XspressFrame(form, self.series, image.frame, arrays, exptime=image.exptime)
