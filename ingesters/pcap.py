"""Sans-IO decoder of the PandABox (PandABlocks) PCAP data port, TCP 8889.

The ingester writes :meth:`PcapDecoder.handshake` to a fresh connection
and hands :meth:`PcapDecoder.feed` every chunk of bytes it receives, in
any sizes; it gets back the events those bytes complete: :class:`Ready`
(the server's ``OK``), :class:`CaptureStart` (one "experiment", i.e. one
arm, begins: its header), :class:`Samples` (rows of that capture, in
order) and :class:`CaptureEnd` (the ``END n reason`` line). One connection
carries many captures. Nothing here touches a socket, so the same code
decodes live streams, the recorded dumps of the tests and malformed bytes.

Wire facts (PandABlocks-server docs/capture.rst, checked against the real
dumps published with the ``pandablocks`` client, see docs/ingesters.md):

* the client sends one options line (e.g. ``XML FRAMED SCALED``); the
  server answers ``OK`` or ``ERR ...`` and waits for ``*PCAP.ARM=``;
* each capture: a header (plain ``key: value`` lines and `` NAME TYPE
  CAPTURE [scale: s offset: o units: u]`` field lines, or with ``XML`` one
  ``<header>`` element), a blank line, the samples, ``END <n> <reason>``;
* ``FRAMED``: ``b"BIN "`` + uint32 LE length (including those 8 bytes) +
  payload of packed little-endian samples in field order. A frame's end is
  not a sample's end: partial samples are kept for the next frame;
* ``ASCII``: one line per sample, values separated by spaces;
* ``RAW``: a ``Mean`` arrives as a sum over the gate; it is divided by
  ``PCAP.GATE_DURATION`` (or the sample count ``PCAP.SAMPLES``) and scaled,
  every other scalable field scaled, as the ``pandablocks`` client does;
* servers before 2.1 send an undeclared 4-byte ``PCAP.SAMPLES`` first in
  RAW mode: ``sample_bytes`` is then 4 more than the declared fields.

Samples are decoded vectorised: all complete samples of one :meth:`feed`
are one ``numpy`` structured view over the received bytes, then one
contiguous column per field. Anything malformed raises :class:`PcapError`
(a ``ValueError``) naming what is wrong; the byte stream cannot be trusted
after that, so the caller drops the connection and starts a fresh decoder.
"""

from __future__ import annotations

import math
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DATA_PORT = 8889
MAX_HEADER_BYTES = 1 << 20  # a PandA header lists at most a few hundred fields
MAX_LINE_BYTES = 1 << 16  # one ASCII sample or header line
MAX_FRAME_BYTES = 1 << 26  # one BIN frame (the server sends far smaller ones)
MAX_FIELDS = 1024
TYPES = {"uint32": np.dtype("<u4"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8"), "double": np.dtype("<f8")}
END_REASONS = ("Ok", "Disarmed", "Early disconnect", "Data overrun", "Framing error", "Driver data overrun",
               "DMA data error")
#: reasons that mean the PandA lost samples it should have sent (the rest of the scan is missing)
FAULT_REASONS = frozenset({"Early disconnect", "Data overrun", "Framing error", "Driver data overrun",
                           "DMA data error"})
GATE_DURATION = "PCAP.GATE_DURATION.Value"
SAMPLES = "PCAP.SAMPLES.Value"
FORMATS = ("FRAMED", "ASCII")
PROCESSES = ("SCALED", "RAW")
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+$")
_CAPTURE = re.compile(r"^[A-Za-z][A-Za-z ]{0,31}$")


class PcapError(ValueError):
    """Bytes that are not what the PCAP data port protocol says."""


@dataclass(frozen=True)
class Field:
    """One captured field as the header declares it."""

    name: str  # e.g. INENC1.VAL
    type: np.dtype
    capture: str  # Value, Diff, Sum, Mean, Min, Max
    scale: float | None = None
    offset: float | None = None
    units: str | None = None

    @property
    def column(self) -> str:
        """The field's column name, ``NAME.CAPTURE`` (as the ``pandablocks`` client names it)."""
        return f"{self.name}.{self.capture}"


@dataclass(frozen=True)
class Ready:
    """The server accepted the options line (``OK``)."""


@dataclass(frozen=True)
class CaptureStart:
    """A capture ("experiment", one arm) begins: its header."""

    fields: tuple[Field, ...]
    process: str  # Scaled | Raw (as the header spells it)
    format: str  # Framed | ASCII
    sample_bytes: int
    missed: int = 0  # samples the server captured before this connection was ready
    arm_time: str | None = None
    start_time: str | None = None
    hw_time_offset_ns: int | None = None

    @property
    def dtype(self) -> np.dtype:
        """One sample as it travels: a packed little-endian structure in field order."""
        return np.dtype([(f.column, f.type) for f in self.fields])

    @property
    def raw(self) -> bool:
        return self.process.lower() == "raw"


@dataclass(frozen=True)
class Samples:
    """Consecutive samples of the open capture: ``first`` is the 0-based
    number of the first among those received in this capture; ``rows`` a
    structured array (one record per sample, as the PandA sent them)."""

    first: int
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class CaptureEnd:
    """``END n reason``: ``samples`` is the server's count, ``received`` what
    came through this decoder."""

    samples: int
    reason: str
    received: int

    @property
    def fault(self) -> bool:
        return self.reason in FAULT_REASONS


Event = Ready | CaptureStart | Samples | CaptureEnd


def handshake(format: str = "FRAMED", process: str = "SCALED", xml: bool = True) -> bytes:
    """The options line a client sends first."""
    if format not in FORMATS:
        raise PcapError(f"capture format must be one of {FORMATS}, not {format!r}")
    if process not in PROCESSES:
        raise PcapError(f"capture processing must be one of {PROCESSES}, not {process!r}")
    return (" ".join((*(("XML",) if xml else ()), format, process)) + "\n").encode()


def parse_options(text: str) -> tuple[str, str, bool]:
    """``"XML FRAMED SCALED"`` -> (format, process, xml); refuses options this
    decoder does not follow (BASE64, UNFRAMED, UNSCALED, NO_HEADER, NO_STATUS, ONE_SHOT, BARE)."""
    words = text.upper().split()
    unknown = [w for w in words if w not in (*FORMATS, *PROCESSES, "XML")]
    if unknown:
        raise PcapError(f"capture options {unknown} are not supported (use XML, FRAMED or ASCII, SCALED or RAW)")
    formats = [w for w in words if w in FORMATS]
    processes = [w for w in words if w in PROCESSES]
    if len(formats) > 1 or len(processes) > 1 or len(set(words)) != len(words):
        raise PcapError(f"capture options {text!r}: at most one format, one processing, each once")
    return (formats or ["ASCII"])[0], (processes or ["SCALED"])[0], "XML" in words


def columns(start: CaptureStart, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Each field's values, one contiguous 1-D array per column, in the
    header's order. SCALED data is as sent. RAW data is processed the way
    the ``pandablocks`` client does: ``Mean`` divided by the gate duration
    (or the sample count) then ``value * scale + offset``; other fields with
    a scale or offset scaled; the rest (bit masks) as sent."""
    out: dict[str, np.ndarray] = {}
    raw = start.raw
    names = rows.dtype.names or ()
    for f in start.fields:
        col = rows[f.column]
        scaled = f.scale is not None or f.offset is not None
        if raw and f.capture == "Mean":
            divisor = rows[GATE_DURATION] if GATE_DURATION in names else rows[SAMPLES] if SAMPLES in names else None
            if divisor is None:
                raise PcapError(f"RAW {f.column} needs {GATE_DURATION} or {SAMPLES} in the capture to divide by")
            with np.errstate(divide="ignore", invalid="ignore"):  # an empty gate is NaN, as the division says
                out[f.column] = col * (f.scale if f.scale is not None else 1.0) / divisor + (f.offset or 0.0)
        elif raw and scaled:
            out[f.column] = col * (f.scale if f.scale is not None else 1.0) + (f.offset or 0.0)
        else:
            out[f.column] = np.ascontiguousarray(col)
    return out


# ---------------------------------------------------------------- header parsing
def _number(text: str | None, what: str, kind: type = float) -> float | int | None:
    if text is None:
        return None
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise PcapError(f"header: {what} {text!r} is not a number") from None
    if kind is float and not math.isfinite(value):
        raise PcapError(f"header: {what} {text!r} is not finite")
    return value


def _field(name: str | None, type_: str | None, capture: str | None, scale: str | None, offset: str | None,
           units: str | None) -> Field:
    if not name or not _NAME.match(name) or len(name) > 64:
        raise PcapError(f"header: bad field name {name!r}")
    if type_ not in TYPES:
        raise PcapError(f"header: field {name}: type {type_!r} is not one of {sorted(TYPES)}")
    if not capture or not _CAPTURE.match(capture):
        raise PcapError(f"header: field {name}: bad capture {capture!r}")
    return Field(name, TYPES[type_], capture, _number(scale, f"{name} scale"), _number(offset, f"{name} offset"),
                 units)


def _start(data: dict[str, str | None], fields: list[Field]) -> CaptureStart:
    if not fields:
        raise PcapError("header: no fields")
    if len(fields) > MAX_FIELDS:
        raise PcapError(f"header: {len(fields)} fields, more than {MAX_FIELDS}")
    process, format = data.get("process"), data.get("format")
    if (process or "").lower() not in ("scaled", "raw"):
        raise PcapError(f"header: process {process!r} is not Scaled or Raw (Unscaled is not supported)")
    if (format or "").lower() not in ("framed", "ascii"):
        raise PcapError(f"header: format {format!r} is not Framed or ASCII")
    missed = _number(data.get("missed", "0"), "missed", int)
    if missed is None or missed < 0:
        raise PcapError(f"header: missed {data.get('missed')!r} must be a non-negative integer")
    declared = sum(f.type.itemsize for f in fields)
    if format.lower() == "ascii":
        sample_bytes = declared
    else:
        sample_bytes = _number(data.get("sample_bytes"), "sample_bytes", int)
        if sample_bytes is None:
            raise PcapError("header: a binary capture needs sample_bytes")
        if sample_bytes == declared + 4 and not any(f.column == SAMPLES for f in fields):
            # a server before 2.1 sends PCAP.SAMPLES first without declaring it
            fields.insert(0, Field("PCAP.SAMPLES", TYPES["uint32"], "Value"))
        elif sample_bytes != declared:
            raise PcapError(f"header: sample_bytes {sample_bytes} but the fields take {declared} bytes")
    columns_ = [f.column for f in fields]
    if len(set(columns_)) != len(columns_):
        raise PcapError(f"header: a field and capture appear twice in {columns_}")
    try:
        hw = int(data["hw_time_offset_ns"]) if data.get("hw_time_offset_ns") not in (None, "") else None
    except ValueError:
        hw = None  # as the pandablocks client: an unreadable offset is no offset
    return CaptureStart(tuple(fields), process, format, sample_bytes, missed, data.get("arm_time"),
                        data.get("start_time"), hw)


def parse_xml_header(text: bytes) -> CaptureStart:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise PcapError(f"header: not XML: {exc}") from None
    data, fields_el = root.find("data"), root.find("fields")
    if root.tag != "header" or data is None or fields_el is None:
        raise PcapError("header: XML without <header><data/><fields>")
    fields = [_field(f.get("name"), f.get("type"), f.get("capture"), f.get("scale"), f.get("offset"),
                     f.get("units")) for f in fields_el if f.tag == "field"]
    return _start(dict(data.attrib), fields)


def parse_text_header(lines: Sequence[bytes]) -> CaptureStart:
    data: dict[str, str | None] = {}
    fields: list[Field] = []
    in_fields = False
    for raw in lines:
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            raise PcapError("header: a line that is not ASCII") from None
        if in_fields and line.startswith(" "):
            words = line.split()
            if len(words) < 3:
                raise PcapError(f"header: field line {line!r} is not NAME TYPE CAPTURE")
            name, type_, rest = words[0], words[1], line.split(None, 2)[2]
            capture, _, extra = rest.partition(" scale:")
            scale = offset = units = None
            if extra:
                m = re.match(r"^\s*(\S+)\s+offset:\s*(\S+)\s+units:\s?(.*)$", extra)
                if not m:
                    raise PcapError(f"header: field {name}: bad scale/offset/units in {line!r}")
                scale, offset, units = m.group(1), m.group(2), m.group(3).strip()
            fields.append(_field(name, type_, capture.strip(), scale, offset, units))
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or " " in key:
            raise PcapError(f"header: line {line!r} is not 'key: value'")
        if key == "fields":
            in_fields = True
            continue
        data[key] = value.strip()
    return _start(data, fields)


# ---------------------------------------------------------------- the decoder
_HANDSHAKE, _WAIT_HEADER, _XML_HEADER, _TEXT_HEADER, _XML_BLANK, _DATA = range(6)


class PcapDecoder:
    """One data-port connection's state; :meth:`feed` bytes in, events out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._state = _HANDSHAKE
        self._header: list[bytes] = []
        self._header_bytes = 0
        self.start: CaptureStart | None = None  # the open capture's header
        self._dtype: np.dtype | None = None
        self._partial = bytearray()  # payload bytes of a sample not complete yet
        self.received = 0  # samples of the open capture decoded so far
        self.captures = 0  # captures started on this connection

    # -------------------------------------------------------- buffer
    def _line(self) -> bytes | None:
        end = self._buf.find(b"\n", self._pos)
        if end < 0:
            if len(self._buf) - self._pos > MAX_LINE_BYTES:
                raise PcapError(f"a line longer than {MAX_LINE_BYTES} bytes")
            return None
        line = bytes(self._buf[self._pos:end])
        self._pos = end + 1
        return line.rstrip(b"\r")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """The events completed by ``data`` (bytes as received, any size)."""
        self._buf += data
        out: list[Event] = []
        try:
            while self._step(out):
                pass
        finally:
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
        return out

    def _step(self, out: list[Event]) -> bool:
        """One protocol step; False when more bytes are needed."""
        if self._state == _DATA:
            return self._data(out)
        line = self._line()
        if line is None:
            return False
        if self._state == _HANDSHAKE:
            if line == b"OK":
                out.append(Ready())
                self._state = _WAIT_HEADER
                return True
            if line.startswith(b"ERR"):
                raise PcapError(f"the PandA refused the capture options: {line.decode('ascii', 'replace')}")
            raise PcapError(f"expected OK from the data port, got {line[:80]!r}")
        if self._state == _WAIT_HEADER:
            if not line.strip():
                return True
            if line.strip() == b"<header>":
                self._state, self._header, self._header_bytes = _XML_HEADER, [line], len(line)
            elif line.startswith(b"END "):
                raise PcapError(f"{line[:80]!r} without a capture header")
            else:
                self._state, self._header, self._header_bytes = _TEXT_HEADER, [line], len(line)
            return True
        self._header_bytes += len(line)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise PcapError(f"a header longer than {MAX_HEADER_BYTES} bytes")
        if self._state == _XML_HEADER:
            self._header.append(line)
            if line.strip() == b"</header>":
                self._open(parse_xml_header(b"\n".join(self._header)), out)
                self._state = _XML_BLANK
            return True
        if self._state == _XML_BLANK:
            if line.strip():
                raise PcapError(f"expected the blank line after the header, got {line[:80]!r}")
            self._state = _DATA
            return True
        # text header: a blank line ends it
        if not line.strip():
            self._open(parse_text_header(self._header), out)
            self._state = _DATA
            return True
        self._header.append(line)
        return True

    def _open(self, start: CaptureStart, out: list[Event]) -> None:
        self.start, self._dtype, self.received = start, start.dtype, 0
        self._partial = bytearray()
        self.captures += 1
        out.append(start)

    # -------------------------------------------------------- samples
    def _data(self, out: list[Event]) -> bool:
        assert self.start is not None
        if self.start.format.lower() == "ascii":
            return self._ascii(out)
        payloads: list[memoryview] = []
        try:
            while True:
                avail = len(self._buf) - self._pos
                if avail < 4:
                    break
                magic = bytes(self._buf[self._pos:self._pos + 4])
                if magic == b"BIN ":
                    if avail < 8:
                        break
                    (length,) = struct.unpack_from("<I", self._buf, self._pos + 4)
                    if length < 8 or length > MAX_FRAME_BYTES:
                        raise PcapError(f"a BIN frame of length {length} (8..{MAX_FRAME_BYTES})")
                    if avail < length:
                        break
                    payloads.append(memoryview(self._buf)[self._pos + 8:self._pos + length])
                    self._pos += length
                elif magic == b"END ":
                    end = self._buf.find(b"\n", self._pos)
                    if end < 0:
                        if avail > MAX_LINE_BYTES:
                            raise PcapError("an END line without its newline")
                        break
                    self._rows(payloads, out)
                    payloads = []
                    self._end(bytes(self._buf[self._pos:end]).rstrip(b"\r"), out)
                    self._pos = end + 1
                    return True
                else:
                    raise PcapError(f"expected 'BIN ' or 'END ' in the binary capture, got {magic!r}")
            self._rows(payloads, out)
            return False
        finally:
            for p in payloads:
                p.release()

    def _rows(self, payloads: list[memoryview], out: list[Event]) -> None:
        """All complete samples in the partial bytes and these frames, as one structured array."""
        if not payloads:
            return
        assert self._dtype is not None
        size = self._dtype.itemsize
        if not self._partial and len(payloads) == 1 and len(payloads[0]) % size == 0:
            body: bytes | bytearray = bytes(payloads[0])  # one copy, off the receive buffer
        else:
            body = self._partial
            for p in payloads:
                body += p
        n = len(body) // size
        keep = len(body) - n * size
        self._partial = bytearray(body[n * size:]) if keep else bytearray()
        for p in payloads:
            p.release()
        payloads.clear()
        if n:
            rows = np.frombuffer(body, self._dtype, count=n)
            out.append(Samples(self.received, rows))
            self.received += n

    def _ascii(self, out: list[Event]) -> bool:
        assert self.start is not None and self._dtype is not None
        lines: list[list[bytes]] = []
        width = len(self._dtype.names or ())
        ended = None
        while True:
            line = self._line()
            if line is None:
                break
            if line.startswith(b"END "):
                ended = line
                break
            words = line.split()
            if not words:
                continue
            if len(words) != width:
                raise PcapError(f"an ASCII sample of {len(words)} values, the header declares {width}")
            lines.append(words)
        if lines:
            table = np.array(lines, dtype="S")
            rows = np.empty(len(lines), self._dtype)
            for i, name in enumerate(self._dtype.names or ()):
                try:
                    rows[name] = table[:, i].astype(self._dtype[name])
                except ValueError as exc:
                    raise PcapError(f"ASCII sample value of {name} is not a {self._dtype[name]}: {exc}") from None
            out.append(Samples(self.received, rows))
            self.received += len(lines)
        if ended is not None:
            self._end(ended, out)
            return True
        return False

    def _end(self, line: bytes, out: list[Event]) -> None:
        words = line.decode("ascii", "replace").split(maxsplit=2)
        if len(words) != 3 or not words[1].isdigit():
            raise PcapError(f"bad end line {line[:80]!r}: expected 'END <samples> <reason>'")
        if words[2] not in END_REASONS:
            raise PcapError(f"end line {line[:80]!r}: unknown reason {words[2]!r}")
        if self._partial:
            raise PcapError(f"the capture ended inside a sample ({len(self._partial)} of "
                            f"{self.start.sample_bytes if self.start else '?'} bytes): wrong sample size or "
                            "truncated frame")
        out.append(CaptureEnd(int(words[1]), words[2], self.received))
        self.start, self._dtype, self._state = None, None, _WAIT_HEADER

    @property
    def in_capture(self) -> bool:
        return self.start is not None


# ---------------------------------------------------------------- the MAX IV republish variant
MAX_REPUBLISH_BYTES = 1 << 24  # one JSON message of rows
_REPUBLISH_META = ("message_id", "message_type", "version", "frame_number")


@dataclass(frozen=True)
class RepublishStart:
    """``series-start``: a capture begins (the republisher saw the PandA armed)."""

    message_id: int
    arm_time: str | None


@dataclass(frozen=True)
class RepublishRows:
    """``data``: consecutive rows from sample ``frame_number`` on, one list per field."""

    message_id: int
    frame_number: int
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


@dataclass(frozen=True)
class RepublishEnd:
    message_id: int


def decode_republished(parts: Sequence[Any]) -> RepublishStart | RepublishRows | RepublishEnd:
    """One ZeroMQ message of the MAX IV PCAP republisher (what dranspose's
    ``ZmqSubPCAPIngester`` reads): a single JSON part, ``version`` 1,
    ``message_type`` ``series-start`` / ``data`` / ``series-end``; a ``data``
    message carries ``frame_number`` (its first row's sample number) and one
    equally long list of numbers per field. Anything else: :class:`PcapError`."""
    import json

    if len(parts) != 1:
        raise PcapError(f"a republished PCAP message has one part, not {len(parts)}")
    buffer = getattr(parts[0], "buffer", parts[0])
    if len(buffer) > MAX_REPUBLISH_BYTES:
        raise PcapError(f"a republished PCAP message of {len(buffer)} bytes")
    try:
        doc = json.loads(bytes(buffer))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PcapError(f"a republished PCAP message that is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise PcapError("a republished PCAP message that is not a JSON object")
    if doc.get("version") != 1:
        raise PcapError(f"republished PCAP version {doc.get('version')!r}, not 1")
    message_id, kind = doc.get("message_id"), doc.get("message_type")
    if type(message_id) is not int:
        raise PcapError(f"message_id {message_id!r} is not an integer")
    if kind == "series-start":
        arm = doc.get("arm_time")
        return RepublishStart(message_id, arm if isinstance(arm, str) else None)
    if kind == "series-end":
        return RepublishEnd(message_id)
    if kind != "data":
        raise PcapError(f"message_type {kind!r} is not series-start, data or series-end")
    first = doc.get("frame_number")
    if type(first) is not int or first < 0:
        raise PcapError(f"frame_number {first!r} is not a non-negative integer")
    columns: dict[str, np.ndarray] = {}
    for name, values in doc.items():
        if name in _REPUBLISH_META:
            continue
        if not isinstance(values, list) or not values or len(name) > 64:
            raise PcapError(f"field {name[:64]!r} is not a non-empty list of numbers")
        if not all(type(v) in (int, float) for v in values):
            raise PcapError(f"field {name!r} holds something other than numbers")
        columns[name] = np.asarray(values, dtype=np.float64)
    if not columns:
        raise PcapError("a data message without fields")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise PcapError(f"a data message whose fields differ in length: {sorted(lengths)}")
    return RepublishRows(message_id, first, columns)
