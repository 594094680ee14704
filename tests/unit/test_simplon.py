"""The SIMPLON decoder and the series mapping, on bytes built to the protocol and on malformed ones.

(The third parties' own bytes are decoded in tests/integration/test_eiger*.py:
ALBA's and tickit's simulators, tickit's bundled DECTRIS stream-v2 messages.)
"""

from __future__ import annotations

import json

import bitshuffle
import cbor2
import lz4.block
import numpy as np
import pytest

from ingesters import simplon
from ingesters.series import ScanChoice, SeriesMapper, choose_scan
from services import codec
from services.compression import HEADER, CompressedFrames

Y, X = 6, 10
IMAGE = (np.arange(Y * X) % 13).astype("<u2").reshape(Y, X)


def v1_image(blob: bytes, encoding: str, frame: int = 0, series: int = 1, dtype: str = "uint16",
             shape: list | None = None) -> list[bytes]:
    return [json.dumps({"htype": "dimage-1.0", "series": series, "frame": frame, "hash": ""}).encode(),
            json.dumps({"htype": "dimage_d-1.0", "shape": shape or [X, Y], "type": dtype, "encoding": encoding,
                        "size": len(blob)}).encode(),
            blob, json.dumps({"htype": "dconfig-1.0", "start_time": 0, "stop_time": 1, "real_time": 1}).encode()]


def v1_header(detail: str = "basic", series: int = 1, **config) -> list[bytes]:
    parts = [json.dumps({"htype": "dheader-1.0", "series": series, "header_detail": detail}).encode()]
    if detail != "none":
        parts.append(json.dumps({"nimages": 3, "ntrigger": 2, "x_pixels_in_detector": X, **config}).encode())
    if detail == "all":
        for name in ("flatfield", "dpixelmask", "dcountrate_table"):
            parts += [json.dumps({"htype": f"{name}-1.0", "shape": [X, Y], "type": "float32"}).encode(), b"blob"]
    return parts


def one(parts) -> simplon.Event:
    events = simplon.decode(parts)
    assert len(events) == 1
    return events[0]


def decoded(ch) -> np.ndarray:
    return ch.decompress()[0] if isinstance(ch, CompressedFrames) else ch


def test_v1_raw_lz4_and_bitshuffle_frames_with_and_without_header():
    bs = bitshuffle.compress_lz4(IMAGE).tobytes()  # ALBA's header-less form
    with_header = HEADER.pack(IMAGE.nbytes, 8192) + bitshuffle.compress_lz4(IMAGE, 4096).tobytes()
    for blob, encoding, codec_name in ((IMAGE.tobytes(), "<", None),
                                       (lz4.block.compress(IMAGE.tobytes(), store_size=False), "lz4<", "lz4"),
                                       (bs, "bs16-lz4<", "bslz4"), (with_header, "bs16-lz4<", "bslz4")):
        event = one(v1_image(blob, encoding, frame=7))
        assert isinstance(event, simplon.Frame) and event.frame == 7 and event.series == 1
        image = event.channels["image"]
        assert getattr(image, "codec", None) == codec_name
        assert image.shape[-2:] == (Y, X)  # shape [x, y] on the wire is (y, x) here
        np.testing.assert_array_equal(decoded(image), IMAGE)


def test_v1_headers_of_every_detail_and_the_end():
    for detail, expected in (("none", None), ("basic", 6), ("all", 6)):
        event = one(v1_header(detail, series=4))
        assert isinstance(event, simplon.SeriesStart) and event.series == 4 and event.expected == expected
    assert one(v1_header("basic") + [b"{}"]).config["nimages"] == 3  # with an appendix
    assert one([b'{"htype": "dseries_end-1.0", "series": 4}']) == simplon.SeriesEnd(1, 4)


def v2(doc) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(55799, doc))


def v2_image(channels: dict, image_id: int = 0) -> bytes:
    return v2({"type": "image", "series_id": 9, "image_id": image_id, "real_time": [1, 50], "data": channels})


def test_v2_typed_and_compressed_channels():
    chunk = bytes(CompressedFrames.compress(IMAGE[None]).chunk(0))
    lz = bytes(CompressedFrames.compress(IMAGE[None], "lz4").chunk(0))
    event = one([v2_image({
        "threshold_1": cbor2.CBORTag(40, [[Y, X], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 2, chunk]))]),
        "threshold_2": cbor2.CBORTag(40, [[Y, X], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["lz4", 0, lz]))]),
        "raw_be": cbor2.CBORTag(40, [[Y, X], cbor2.CBORTag(65, IMAGE.astype(">u2").tobytes())])}, image_id=3)])
    assert isinstance(event, simplon.Frame) and (event.series, event.frame) == (9, 3)
    for name in ("threshold_1", "threshold_2", "raw_be"):
        np.testing.assert_array_equal(decoded(event.channels[name]), IMAGE)
    start = one([v2({"type": "start", "channels": ["threshold_1"]})])  # every field optional
    assert isinstance(start, simplon.SeriesStart) and start.series is None and start.expected is None
    assert one([v2({"type": "end", "series_id": 9})]) == simplon.SeriesEnd(2, 9)


MALFORMED = {
    "not json": [b"\xff\xfe", b"x"],
    "unknown htype": [b'{"htype": "dnothing-1.0"}'],
    "frame missing": [b'{"htype": "dimage-1.0", "series": 1}', b"{}", b"", b"{}"],
    "three parts": v1_image(IMAGE.tobytes(), "<")[:3],
    "raw size": v1_image(IMAGE.tobytes()[:-2], "<"),
    "declared size": v1_image(IMAGE.tobytes(), "<")[:2] + [IMAGE.tobytes() + b"x"] + [b"{}"],
    "bad shape": v1_image(IMAGE.tobytes(), "<", shape=[X, -Y]),
    "huge shape": v1_image(IMAGE.tobytes(), "<", shape=[1 << 20, 1 << 20]),
    "bad type": v1_image(IMAGE.tobytes(), "<", dtype="object"),
    "bad encoding": v1_image(IMAGE.tobytes(), "zstd<"),
    "bs32 for uint16": v1_image(bitshuffle.compress_lz4(IMAGE).tobytes(), "bs32-lz4<"),
    "header parts": v1_header("all")[:5],
    "header detail": [b'{"htype": "dheader-1.0", "series": 1, "header_detail": "most"}'],
    "negative nimages": v1_header("basic", nimages=-1),
    "cbor truncated": [v2_image({})[:-3]],
    "cbor not a map": [v2([1, 2])],
    "cbor unknown type": [v2({"type": "middle"})],
    "cbor no data": [v2_image({})],
    "cbor not tag 40": [v2_image({"a": b"xx"})],
    "cbor column major": [v2_image({"a": cbor2.CBORTag(1040, [[Y, X], cbor2.CBORTag(69, IMAGE.tobytes())])})],
    "cbor 3 dims": [v2_image({"a": cbor2.CBORTag(40, [[1, Y, X], cbor2.CBORTag(69, IMAGE.tobytes())])})],
    "cbor short raw": [v2_image({"a": cbor2.CBORTag(40, [[Y, X], cbor2.CBORTag(69, IMAGE.tobytes()[:-1])])})],
    "cbor unknown codec": [v2_image({"a": cbor2.CBORTag(40, [[Y, X], cbor2.CBORTag(69, cbor2.CBORTag(
        56500, ["zstd", 2, b"x" * 20]))])})],
    "cbor elem size": [v2_image({"a": cbor2.CBORTag(40, [[Y, X], cbor2.CBORTag(69, cbor2.CBORTag(
        56500, ["bslz4", 4, HEADER.pack(IMAGE.nbytes, 8192) + b"x" * 8]))])})],
    "cbor 56500 arity": [v2_image({"a": cbor2.CBORTag(40, [[Y, X], cbor2.CBORTag(69, cbor2.CBORTag(56500, [1]))])})],
    "cbor deep": [b"\xd9\xd9\xf7" + b"\x81" * 10000 + b"\x00"],
    "empty": [],
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_input_raises_one_error_type(name):
    with pytest.raises(simplon.SimplonError):
        one(MALFORMED[name])


def test_a_batch_of_cbor_documents_is_one_event_each():
    """tickit sends what it buffered as one multipart message, one CBOR document per part."""
    batch = [v2({"type": "start", "series_id": 2}), v2({"type": "end", "series_id": 2})]
    assert [type(e).__name__ for e in simplon.decode(batch)] == ["SeriesStart", "SeriesEnd"]


def test_random_bytes_never_crash():
    rng = np.random.default_rng(1)
    good = v2_image({"a": cbor2.CBORTag(40, [[Y, X], cbor2.CBORTag(69, IMAGE.tobytes())])})
    for _ in range(300):
        data = bytearray(good)
        for _ in range(4):
            data[rng.integers(3, len(data))] = rng.integers(0, 256)
        try:
            one([bytes(data)])
        except simplon.SimplonError:
            pass


# ---------------------------------------------------------------- series -> scan
def frame(f: int, series: int = 1) -> simplon.Frame:
    return simplon.Frame(1, series, f, {"image": IMAGE})


def start(series: int = 1, expected: int | None = 6) -> simplon.SeriesStart:
    return simplon.SeriesStart(1, series, "basic", expected)


def test_frames_become_blocks_and_a_skipped_frame_a_gap_at_its_own_index():
    m = SeriesMapper("eiger", block_frames=2)
    assert m.bind(start(), ScanChoice("s1", 10, ("p",))) == []
    out = [msg for f in (0, 1, 2, 4) for msg in m.frame(frame(f))]
    out += m.end(simplon.SeriesEnd(1, 1))
    kinds = [(msg.type, msg.index, msg.count) for msg in out]
    assert kinds == [("data", 0, 2), ("data", 2, 1), ("gap", 3, 1), ("data", 4, 1), ("gap", 5, 1), ("scan_end", 0, 6)]
    assert all(msg.scan == "s1" and msg.stream == "eiger" for msg in out)
    assert out[0].arrays["image"].shape == (2, Y, X)
    for msg in out:
        codec.decode(codec.encode(msg))  # every message is valid on the wire
    assert m.gap_points == 2 and m.frames == 4
    assert m.end(simplon.SeriesEnd(1, 1)) == []  # the same end again (tickit repeats it on disarm)
    with pytest.raises(ValueError, match="without its start"):
        m.end(simplon.SeriesEnd(1, 7))


def test_first_index_out_of_order_and_beyond_the_scan():
    m = SeriesMapper("eiger", block_frames=1)
    out = m.bind(start(expected=None), ScanChoice("s1", 5, ("p",), first_index=2))
    assert [(o.type, o.index, o.count) for o in out] == [("gap", 0, 2)]
    assert [o.index for o in m.frame(frame(0))] == [2]
    with pytest.raises(ValueError, match="never renumbered"):
        m.frame(frame(0))
    with pytest.raises(ValueError, match="series 2 while series 1"):
        m.frame(frame(1, series=2))
    m.frame(frame(2))
    with pytest.raises(ValueError, match="beyond scan"):
        m.frame(frame(3))
    assert [(o.type, o.count) for o in m.end(simplon.SeriesEnd(1, 1))] == [("scan_end", 5)]


def test_a_restart_ends_the_open_series_and_refused_series_are_drained():
    m = SeriesMapper("eiger", block_frames=4)
    m.bind(start(expected=6), ScanChoice("s1", 10, ("p",)))
    m.frame(frame(0))
    out = m.restart(start(series=2))
    assert [(o.type, o.index, o.count) for o in out] == [("data", 0, 1), ("gap", 1, 5), ("scan_end", 0, 6)]
    m.refuse(2)
    assert m.frame(frame(0, series=2)) == [] and m.end(simplon.SeriesEnd(1, 2)) == [] and m.drained == 1
    with pytest.raises(ValueError, match="without its series start"):
        m.frame(frame(3, series=3))  # the ingester came up mid-series: refused, then drained quietly
    assert m.frame(frame(4, series=3)) == [] and m.drained == 3


def test_choose_scan_takes_the_newest_open_unused_scan_of_the_stream():
    def scan(sid, started, streams=("eiger",), ending=False):
        return {"scan": sid, "points": 10, "streams": list(streams), "started": started, "ending": ending,
                "first_index": {}}
    scans = {"a": [scan("old", 1), scan("new", 2), scan("ended", 3, ending=True), scan("other", 4, ("xspress",))],
             "b": [scan("new", 2)], "c": []}
    assert choose_scan("eiger", scans, used=()) == ScanChoice("new", 10, ("a", "b"))
    assert choose_scan("eiger", scans, used=("new",)) == ScanChoice("old", 10, ("a",))
    assert choose_scan("eiger", scans, used=("new", "old")) is None
