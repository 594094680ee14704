"""The PCAP data-port decoder on real PandA captures, against the ``pandablocks`` client's own decoder.

The captures are the PandABlocks team's recorded dumps (``pandablocks``
0.10.4 sdist, fetched from PyPI by the test set-up: tests/support/panda.py).
The oracle is ``pandablocks.connections.DataConnection`` (sans-IO, like ours)
fed the same bytes, with ``pandablocks.hdf.FrameProcessor``'s scaling for
RAW captures (Mean divided by the gate duration or the sample count).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingesters import pcap
from ingesters.panda import PcapConfig, default_array_name
from ingesters.series import CaptureMapper, ScanChoice
from services import codec
from support.panda import DUMPS, Capture, dump


def oracle(data: bytes):
    """(StartData, rows, processed columns, EndData) by the pandablocks client."""
    from pandablocks.connections import DataConnection
    from pandablocks.hdf import FrameProcessor
    from pandablocks.responses import EndData, FrameData, StartData

    conn = DataConnection()
    conn.connect(scaled=True)
    events = list(conn.receive_bytes(data))
    start = next(e for e in events if isinstance(e, StartData))
    rows = np.concatenate([e.data for e in events if isinstance(e, FrameData)])
    processor = FrameProcessor()
    processor.create_processors(start)
    return start, rows, processor.scale_data(FrameData(rows)), next(e for e in events if isinstance(e, EndData))


def decode_in_chunks(data: bytes, sizes: list[int]) -> list[pcap.Event]:
    decoder = pcap.PcapDecoder()
    events, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        events += decoder.feed(data[pos:pos + n])
        pos, i = pos + n, i + 1
    return events


def rows_of(events: list[pcap.Event]) -> np.ndarray:
    runs = [e for e in events if isinstance(e, pcap.Samples)]
    assert [r.first for r in runs] == list(np.cumsum([0] + [len(r) for r in runs[:-1]]))
    return np.concatenate([r.rows for r in runs])


@pytest.fixture(scope="module")
def dumps() -> dict[str, bytes]:
    return {name: dump(name) for name in DUMPS}


@pytest.mark.parametrize("name", DUMPS)
def test_each_real_dump_decodes_as_the_pandablocks_client_decodes_it(dumps, name) -> None:
    data = dumps[name]
    start, rows, processed, end = oracle(data)
    events = decode_in_chunks(data, [])
    assert isinstance(events[0], pcap.Ready)
    ours = next(e for e in events if isinstance(e, pcap.CaptureStart))
    assert [(f.name, f.type, f.capture, f.scale, f.offset, f.units) for f in ours.fields] == \
        [(f.name, f.type, f.capture, f.scale, f.offset, f.units) for f in start.fields]
    assert (ours.process, ours.format, ours.sample_bytes, ours.missed) == \
        (start.process, start.format, start.sample_bytes, start.missed)
    got = rows_of(events)
    assert got.dtype == rows.dtype and len(got) == len(rows) > 0
    for column in rows.dtype.names:
        np.testing.assert_array_equal(got[column], rows[column], err_msg=column)
    columns = pcap.columns(ours, got)
    assert len(columns) == len(processed)
    for (column, mine), theirs in zip(columns.items(), processed):
        assert mine.flags.c_contiguous and mine.ndim == 1
        np.testing.assert_array_equal(mine, theirs, err_msg=column)
    last = events[-1]
    assert isinstance(last, pcap.CaptureEnd)
    assert (last.samples, last.reason, last.received) == (end.samples, end.reason.value, len(rows))


def test_the_old_servers_undeclared_samples_field_is_found_and_divides_the_means(dumps) -> None:
    events = decode_in_chunks(dumps["raw_dump_no_duration"], [])
    start = next(e for e in events if isinstance(e, pcap.CaptureStart))
    assert start.fields[0].column == pcap.SAMPLES and start.raw
    rows = rows_of(events)
    columns = pcap.columns(start, rows)
    mean = columns["COUNTER1.OUT.Mean"]
    np.testing.assert_array_equal(mean, rows["COUNTER1.OUT.Mean"] / rows[pcap.SAMPLES])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(DUMPS), sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=30))
def test_any_chunking_of_the_bytes_gives_the_same_samples(dumps, name, sizes) -> None:
    data = dumps[name]
    _, rows, _, end = oracle(data)
    events = decode_in_chunks(data, sizes)
    got = rows_of(events)
    assert got.tobytes() == rows.tobytes()
    assert events[-1] == pcap.CaptureEnd(end.samples, end.reason.value, len(rows))


def test_several_captures_on_one_connection_are_several_captures(dumps) -> None:
    fast, raw = dumps["fast_dump"], dumps["raw_dump"]
    events = decode_in_chunks(fast + raw[3:] + fast[3:], [777])
    starts = [i for i, e in enumerate(events) if isinstance(e, pcap.CaptureStart)]
    ends = [e for e in events if isinstance(e, pcap.CaptureEnd)]
    assert len(starts) == 3 and [e.received for e in ends] == [58, 10000, 58]
    second = events[starts[1]:starts[2]]
    assert rows_of(second).tobytes() == oracle(raw)[1].tobytes()
    assert events[starts[2]].process == "Scaled" and not events[starts[2]].raw


def test_frames_cut_inside_samples_are_joined(dumps) -> None:
    """BIN frames need not end on a sample: the same real payload re-framed in 7-byte frames."""
    cap = Capture.of(dumps["fast_dump"])
    body = cap.payload()
    framed = b"".join(b"BIN " + struct.pack("<I", 8 + len(body[i:i + 7])) + body[i:i + 7]
                      for i in range(0, len(body), 7))
    events = decode_in_chunks(b"OK\n" + cap.header + framed + cap.end, [100])
    assert rows_of(events).tobytes() == oracle(dumps["fast_dump"])[1].tobytes()


def test_an_overrun_capture_says_so(dumps) -> None:
    cap = Capture.of(dumps["raw_dump"])
    events = decode_in_chunks(b"OK\n" + cap.cut(1234, "Data overrun"), [4096])
    end = events[-1]
    assert end == pcap.CaptureEnd(1234, "Data overrun", 1234) and end.fault
    assert not pcap.CaptureEnd(5, "Disarmed", 5).fault


def ascii_capture(values: dict[str, np.ndarray]) -> bytes:
    names = list(values)
    header = "missed: 0\nprocess: Scaled\nformat: ASCII\nfields:\n" + "".join(
        f" {n.rsplit('.', 1)[0]} {'uint32' if values[n].dtype == np.uint32 else 'double'} {n.rsplit('.', 1)[1]}"
        + ("" if values[n].dtype == np.uint32 else " scale: 1 offset: 0 units: ") + "\n" for n in names) + "\n"
    lines = "".join(" " + " ".join(repr(v.item()) for v in row) + "\n"
                    for row in zip(*(values[n] for n in names)))
    return f"OK\n{header}".encode() + lines.encode() + f"END {len(values[names[0]])} Ok\n".encode()


def test_ascii_capture_with_a_text_header_gives_the_same_values(dumps) -> None:
    """The real fast dump's values written as the ASCII format would, with the plain-text header."""
    start, rows, processed, _ = oracle(dumps["fast_dump"])
    values = {f"{f.name}.{f.capture}": p for f, p in zip(start.fields, processed)}
    events = decode_in_chunks(ascii_capture(values), [333])
    ours = next(e for e in events if isinstance(e, pcap.CaptureStart))
    assert ours.format == "ASCII" and [f.column for f in ours.fields] == list(values)
    assert ours.fields[1].scale == 1.0 and ours.fields[1].units == ""
    got = pcap.columns(ours, rows_of(events))
    for name, want in values.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert events[-1] == pcap.CaptureEnd(58, "Ok", 58)


HEADER = (b'<header>\n<data missed="0" process="Scaled" format="Framed" sample_bytes="8" />\n<fields>\n'
          b'<field name="INENC1.VAL" type="double" capture="Value" scale="1" offset="0" units="mm" />\n'
          b'</fields>\n</header>\n\n')


def frame(payload: bytes) -> bytes:
    return b"BIN " + struct.pack("<I", 8 + len(payload)) + payload


@pytest.mark.parametrize("data, reason", [
    (b"NO\n", "expected OK"),
    (b"ERR Unknown option\n", "refused the capture options"),
    (b"OK\n<header>\n<data/>\n</header>\n\n", "XML without"),
    (b"OK\n<header>\n<fields>\n</header>\n", "not XML"),
    (b"OK\n" + HEADER.replace(b'type="double"', b'type="float"'), "type 'float'"),
    (b"OK\n" + HEADER.replace(b'sample_bytes="8"', b'sample_bytes="10"'), "sample_bytes 10 but the fields take 8"),
    (b"OK\n" + HEADER.replace(b'sample_bytes="8" ', b""), "needs sample_bytes"),
    (b"OK\n" + HEADER.replace(b'process="Scaled"', b'process="Unscaled"'), "Unscaled is not supported"),
    (b"OK\n" + HEADER.replace(b'format="Framed"', b'format="Base64"'), "not Framed or ASCII"),
    (b"OK\n" + HEADER.replace(b'name="INENC1.VAL"', b'name="IN ENC"'), "bad field name"),
    (b"OK\n" + HEADER.replace(b'scale="1"', b'scale="x"'), "scale 'x' is not a number"),
    (b"OK\n" + HEADER.replace(b'</header>\n\n', b'</header>\nBIN x\n'), "blank line after the header"),
    (b"OK\n" + HEADER + b"BIN \x04\x00\x00\x00", "BIN frame of length 4"),
    (b"OK\n" + HEADER + b"BIM \x10\x00\x00\x00", "expected 'BIN ' or 'END '"),
    (b"OK\n" + HEADER + frame(b"\0" * 12) + b"END 1 Ok\n", "ended inside a sample"),
    (b"OK\n" + HEADER + frame(b"\0" * 8) + b"END 1 Fine\n", "unknown reason"),
    (b"OK\n" + HEADER + b"END x Ok\n", "bad end line"),
    (b"OK\nEND 0 Ok\n", "without a capture header"),
    (b"OK\nmissed: 0\nprocess: Scaled\nformat: ASCII\nfields:\n X.Y double Value\n\n 1 2\n", "2 values"),
    (b"OK\nmissed: 0\nprocess: Scaled\nformat: ASCII\nfields:\n X.Y double Value\n\n abc\n", "is not a float64"),
    (b"OK\nmissed: 0\nprocess: Scaled\nformat: ASCII\nfields:\n\n", "no fields"),
    (b"OK\nmissed 0\n\n", "is not 'key: value'"),
    (b"OK\n" + b"x" * (pcap.MAX_LINE_BYTES + 2), "a line longer than"),
])
def test_malformed_input_is_refused_with_the_reason(data, reason) -> None:
    with pytest.raises(pcap.PcapError, match=reason):
        decode_in_chunks(data, [5])


def test_raw_mean_without_a_divisor_is_refused() -> None:
    header = HEADER.replace(b"Scaled", b"Raw").replace(b'type="double" capture="Value"', b'type="int64" capture="Mean"')
    events = decode_in_chunks(b"OK\n" + header + frame(struct.pack("<q", 10)), [])
    start, samples = events[1], events[2]
    with pytest.raises(pcap.PcapError, match="needs PCAP.GATE_DURATION.Value or PCAP.SAMPLES.Value"):
        pcap.columns(start, samples.rows)


def test_options_and_config_are_validated() -> None:
    assert pcap.handshake(*pcap.parse_options("XML FRAMED RAW")) == b"XML FRAMED RAW\n"
    assert pcap.parse_options("") == ("ASCII", "SCALED", False)
    for bad in ("BASE64", "FRAMED ASCII", "ONE_SHOT FRAMED", "XML XML"):
        with pytest.raises(pcap.PcapError):
            pcap.parse_options(bad)
    assert PcapConfig(panda="panda1", pipelines=("p",)).address == ("panda1", 8889)
    assert PcapConfig(panda="10.0.0.2:9000", pipelines=("p",)).address == ("10.0.0.2", 9000)
    for bad in ({"panda": ""}, {"panda": "h:x"}, {"capture": "BASE64"}, {"block_points": 0},
                {"arrays": ("A.B.Value",)}, {"arrays": ("A.B.Value=x/y",)}, {"arrays": ("A=x", "A=y")},
                {"pipelines": ()}):
        with pytest.raises(ValueError):
            PcapConfig(**{"panda": "h", "pipelines": ("p",), **bad})
    assert PcapConfig(panda="h", pipelines=("p",), arrays=("INENC1.VAL.Value = x_enc",)).array_names() == \
        {"INENC1.VAL.Value": "x_enc"}
    assert default_array_name("COUNTER1.OUT.Min Max") == "COUNTER1.OUT.Min_Max"


# ---------------------------------------------------------------- samples -> indices
def kinds(messages: list[codec.Message]) -> list[tuple]:
    return [(m.type, m.index if m.type == codec.DATA else m.meta.get("start", m.count), m.count) for m in messages]


def test_samples_map_to_indices_in_blocks_with_gaps_for_what_never_came() -> None:
    mapper = CaptureMapper("panda", block_points=4)
    out = mapper.bind(ScanChoice("s1", 20, ("p",), first_index=2), missed=1)
    assert len(out) == 1 and out[0].type == "gap" and mapper.gap_points == 3  # indices 0..2
    assert mapper.room() == 17
    assert mapper.samples({"x": np.arange(3.0)}) == []  # pending: fewer than a block
    out = mapper.samples({"x": np.arange(3.0, 10.0)})
    assert [(m.index, m.count) for m in out] == [(3, 4), (7, 4), (11, 2)]
    np.testing.assert_array_equal(np.concatenate([m.arrays["x"] for m in out]), np.arange(10.0))
    with pytest.raises(ValueError, match="room for 7"):
        mapper.samples({"x": np.zeros(8)})
    with pytest.raises(ValueError, match="fields changed"):
        mapper.samples({"y": np.zeros(1)})
    out = mapper.end("Data overrun")
    gap, end = out[-2], out[-1]
    assert gap.type == "gap" and end.type == codec.SCAN_END and end.count == 20
    assert mapper.gap_points == 3 + 7 and mapper.points == 10 and mapper.open is None


def test_a_refused_capture_is_drained_and_the_next_binds() -> None:
    mapper = CaptureMapper("panda", block_points=4)
    mapper.refuse()
    assert mapper.samples({"x": np.zeros(5)}) == [] and mapper.drained == 5
    assert mapper.end("Ok") == [] and not mapper.draining
    with pytest.raises(ValueError, match="without a capture header"):
        mapper.samples({"x": np.zeros(1)})
    mapper.bind(ScanChoice("s2", 2, ("p",)))
    out = mapper.samples({"x": np.zeros(2)}) + mapper.end("Ok")
    assert [m.type for m in out] == [codec.DATA, codec.SCAN_END]


# ---------------------------------------------------------------- the MAX IV republish variant
def test_the_recorded_republished_stream_decodes_row_for_row() -> None:
    """dranspose's real recording of the MAX IV republisher (102 messages): every data message's
    fields equal the JSON's lists, frame numbers run on without a hole to 1500 rows."""
    import json

    from support.panda import republished_recording

    messages = republished_recording()
    events = [pcap.decode_republished([m]) for m in messages]
    assert isinstance(events[0], pcap.RepublishStart) and events[0].arm_time == "2024-10-07T08:49:10.627Z"
    assert isinstance(events[-1], pcap.RepublishEnd)
    rows = [e for e in events if isinstance(e, pcap.RepublishRows)]
    assert len(rows) == 100
    expected = 0
    for event, message in zip(rows, messages[1:-1]):
        doc = json.loads(message)
        assert event.frame_number == doc["frame_number"] == expected
        assert set(event.columns) == {"inttime", "triggernumber", "repeatindex", "energy", "INENC3.VAL.Mean"}
        for name, values in event.columns.items():
            np.testing.assert_array_equal(values, np.array(doc[name], dtype=np.float64))
        expected += len(event)
    assert expected == 1500


@pytest.mark.parametrize("message, reason", [
    (b"emptyness", "not JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"message_id": 1, "message_type": "data", "version": 2}', "version 2"),
    (b'{"message_id": "1", "message_type": "data", "version": 1}', "message_id"),
    (b'{"message_id": 1, "message_type": "image", "version": 1}', "message_type 'image'"),
    (b'{"message_id": 1, "message_type": "data", "version": 1, "frame_number": -1, "x": [1]}', "frame_number"),
    (b'{"message_id": 1, "message_type": "data", "version": 1, "frame_number": 0}', "without fields"),
    (b'{"message_id": 1, "message_type": "data", "version": 1, "frame_number": 0, "x": []}', "non-empty list"),
    (b'{"message_id": 1, "message_type": "data", "version": 1, "frame_number": 0, "x": ["a"]}', "other than numbers"),
    (b'{"message_id": 1, "message_type": "data", "version": 1, "frame_number": 0, "x": [1], "y": [1, 2]}',
     "differ in length"),
])
def test_malformed_republished_messages_are_refused(message, reason) -> None:
    with pytest.raises(pcap.PcapError, match=reason):
        pcap.decode_republished([message])
    with pytest.raises(pcap.PcapError, match="one part"):
        pcap.decode_republished([message, message])


def test_a_frame_number_jump_is_a_gap_at_its_own_indices() -> None:
    mapper = CaptureMapper("panda", block_points=100)
    mapper.bind(ScanChoice("s", 30, ("p",)))
    out = mapper.samples({"x": np.arange(5.0)})
    out += mapper.skip(12, "lost")
    out += mapper.samples({"x": np.arange(12.0, 15.0)}) + mapper.flush()
    assert [(m.type, m.index, m.count) for m in out] == [("data", 0, 5), ("gap", 5, 7), ("data", 12, 3)]
    assert mapper.next_sample == 15 and mapper.gap_points == 7
    with pytest.raises(ValueError, match="cannot skip"):
        mapper.skip(15, "no")
