"""The Xspress3 decoder on real recordings we did not write, and on malformed and hostile input.

The recordings are MAX IV's, shipped in dranspose 0.2.0's sdist (fetched from
PyPI by :mod:`support.recordings`). The expected values come from an
independent route: plain ``json`` and the full ``pickle`` on the recorded
parts (trusted: they are the published data), compared with what our decoder
and its restricted unpickler give. The device's own ``dtc`` is the check of
the dead-time formula.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools

import numpy as np
import pytest

from ingesters.deadtime import CLOCK_HZ, dead_time
from ingesters.series import ScanChoice, SeriesMapper
from ingesters.xspress import (XspressDecoder, XspressEnd, XspressError, XspressFrame, XspressStart, load_scalers)
from services import codec
from support.recordings import XSPRESS_FILES, messages

EXPECTED = {  # frame numbers, channels, form: what each file holds (read by hand from the files' JSON parts)
    "xspress3-dump.cbors": (list(range(20)), 4, "old"),
    "xspress3-multipart.cbors": (list(range(5)), 4, "multipart"),
    # the Mini capture holds its 11 frames twice, byte for byte, in one series (a duplicated dump)
    "xspress3mini-dump20.cbors": (list(range(11)) * 2, 2, "old"),
}


def oracle(recording: list[list[bytes]]) -> list[dict]:
    """Each frame of a recording by the plain route: JSON header, raw spectra, full pickle."""
    parts = [p for message in recording for p in message]
    frames = []
    for k, part in enumerate(parts):
        if part[:1] == b"{" and json.loads(part).get("htype") == "image":
            head = json.loads(part)
            spectra = np.frombuffer(parts[k + 1], np.uint32).reshape(head["shape"])
            frames.append({"frame": head["frame"], "mca": spectra, "scalers": pickle.loads(parts[k + 2]),
                           "exptime": head["exptime"]})
    return frames


def decode_all(recording, keep=None) -> tuple[list, XspressDecoder]:
    decoder = XspressDecoder(keep)
    events = [e for message in recording for e in decoder.feed(message)]
    return events, decoder


@pytest.fixture(scope="module", params=XSPRESS_FILES)
def recording(request):
    return request.param, messages(request.param)


def test_every_frame_of_the_recordings_decodes_equal_to_the_plain_route(recording) -> None:
    name, msgs = recording
    numbers, channels, form = EXPECTED[name]
    assert (max(len(m) for m in msgs) == 3) == (form == "multipart")
    events, decoder = decode_all(msgs)
    assert decoder.pop_problems() == []
    assert isinstance(events[0], XspressStart) and isinstance(events[-1], XspressEnd)
    assert events[0].series == events[-1].series == 1 and events[0].expected is None
    assert events[0].config["filename"].endswith(".hdf5")
    frames = [e for e in events if isinstance(e, XspressFrame)]
    want = oracle(msgs)
    assert [f.frame for f in frames] == [r["frame"] for r in want] == numbers
    for got, ref in zip(frames, want):
        assert got.version == (2 if form == "multipart" else 1)
        a = got.channels
        assert a["mca"].shape == (channels, 4096) and a["mca"].dtype == np.uint32
        np.testing.assert_array_equal(a["mca"], ref["mca"])
        s = ref["scalers"]
        for k, key in enumerate(("all_events", "all_good", "clock_ticks", "total_ticks", "reset_ticks",
                                 "event_width"), start=1):
            np.testing.assert_array_equal(a[key], s[k], err_msg=key)
            assert a[key].dtype == s[k].dtype
        # the device's own dead-time correction, reproduced from the raw counters
        np.testing.assert_allclose(a["dtc"], s[7], rtol=1e-12, atol=0)
        # the sent ocr is AllGood / ClockTicks / 80e6: ours is that times (80e6)^2
        np.testing.assert_allclose(a["ocr"], s[0] * CLOCK_HZ ** 2, rtol=1e-9)
        np.testing.assert_allclose(a["live_time"], s[3] / CLOCK_HZ)
        np.testing.assert_allclose(a["icr"], s[1] * a["dtc"] / a["live_time"], rtol=1e-12)
        assert a["exptime"].shape == () and a["exptime"] == ref["exptime"]
        if len(s) == 9:
            np.testing.assert_array_equal(a["window_counts"], s[8])
        else:
            assert "window_counts" not in a
    total = sum(int(f.channels["mca"].sum(dtype=np.int64)) for f in frames)
    assert total == sum(int(r["mca"].sum(dtype=np.int64)) for r in want) > 0


def test_the_real_mini_recording_has_counts_and_dead_time() -> None:
    """The X3 Mini capture is real fluorescence: dtc above 1 where it counted, ICR above OCR."""
    frames = [e for e in decode_all(messages("xspress3mini-dump20.cbors"))[0] if isinstance(e, XspressFrame)]
    dtc = np.stack([f.channels["dtc"] for f in frames])
    icr = np.stack([f.channels["icr"] for f in frames])
    ocr = np.stack([f.channels["ocr"] for f in frames])
    assert (dtc >= 1).all() and (dtc > 1).any()
    assert (icr >= ocr).all() and (ocr > 1000).any()  # counts per second, not the device's 1e-12


def test_spectra_are_a_view_of_the_received_part() -> None:
    msgs = messages("xspress3-multipart.cbors")
    part = bytearray(msgs[1][1])
    frame = XspressDecoder().feed([msgs[1][0], part, msgs[1][2]])[0]
    address = np.frombuffer(part, np.uint8).ctypes.data
    assert frame.channels["mca"].ctypes.data == address  # no copy of the spectra
    part[0:4] = (123456).to_bytes(4, "little")
    assert frame.channels["mca"][0, 0] == 123456


def test_both_forms_give_the_same_frames() -> None:
    """The old recording sent as 3-part messages, and the multipart one as single messages."""
    old = messages("xspress3-dump.cbors")
    regrouped, k = [], 0
    while k < len(old):
        head = json.loads(old[k][0]) if old[k][0][:1] == b"{" else {}
        if head.get("htype") == "image":
            regrouped.append([old[k][0], old[k + 1][0], old[k + 2][0]])
            k += 3
        else:
            regrouped.append(old[k])
            k += 1
    a = [e for e in decode_all(old)[0] if isinstance(e, XspressFrame)]
    b = [e for e in decode_all(regrouped)[0] if isinstance(e, XspressFrame)]
    assert len(a) == len(b) == 20 and {f.version for f in b} == {2}
    for x, y in zip(a, b):
        assert x.frame == y.frame and x.channels.keys() == y.channels.keys()
        for key in x.channels:
            np.testing.assert_array_equal(x.channels[key], y.channels[key])
    multi = messages("xspress3-multipart.cbors")
    split = [[p] for m in multi for p in m]
    c = [e for e in decode_all(split)[0] if isinstance(e, XspressFrame)]
    assert [f.frame for f in c] == list(range(5)) and {f.version for f in c} == {1}


def test_channels_kept_select_and_order_the_detector_channels() -> None:
    msgs = messages("xspress3-multipart.cbors")
    full = XspressDecoder().feed(msgs[1])[0].channels
    kept = XspressDecoder(keep=[3, 0]).feed(msgs[1])[0].channels
    np.testing.assert_array_equal(kept["mca"], full["mca"][[3, 0]])
    np.testing.assert_array_equal(kept["dtc"], full["dtc"][[3, 0]])
    np.testing.assert_array_equal(kept["window_counts"], full["window_counts"][:, [3, 0]])
    with pytest.raises(XspressError, match=r"channels kept \[5\] but the detector sends 4"):
        XspressDecoder(keep=[5]).feed(msgs[1])
    for bad in ([], [1, 1], [-1], [True]):
        with pytest.raises(ValueError, match="channels kept"):
            XspressDecoder(keep=bad)


# ---------------------------------------------------------------- malformed input
def image_json(**fields) -> bytes:
    head = {"htype": "image", "frame": 0, "shape": [2, 8], "type": "uint32", "compression": "none",
            "exptime": 0.1}
    head.update(fields)
    return json.dumps({k: v for k, v in head.items() if v is not None}).encode()


def scalers(channels: int = 2, count: int = 8, **override) -> bytes:
    values = [np.zeros(channels), np.full(channels, 10, np.uint32), np.full(channels, 9, np.uint32),
              np.full(channels, 8000, np.uint32), np.full(channels, 8000, np.uint32), np.zeros(channels, np.uint32),
              np.full(channels, 6, np.int32), np.ones(channels)]
    for k, v in override.items():
        values[int(k[1:])] = v
    return pickle.dumps(values[:count], protocol=4)


SPECTRA = np.arange(16, dtype="<u4").tobytes()
GOOD = [image_json(), SPECTRA, scalers()]

MALFORMED = {
    "two parts": [GOOD[0], SPECTRA],
    "four parts": GOOD + [b"x"],
    "3-part not an image": [b'{"htype": "header"}', SPECTRA, scalers()],
    "3-part bad json": [b"{nope", SPECTRA, scalers()],
    "spectra short": [GOOD[0], SPECTRA[:-4], GOOD[2]],
    "spectra long": [GOOD[0], SPECTRA + b"\0\0\0\0", GOOD[2]],
    "shape 1-d": [image_json(shape=[16]), SPECTRA, GOOD[2]],
    "shape zero": [image_json(shape=[0, 16]), b"", GOOD[2]],
    "shape float": [image_json(shape=[2.0, 8]), SPECTRA, GOOD[2]],
    "too many channels": [image_json(shape=[65, 8]), SPECTRA, GOOD[2]],
    "type float": [image_json(type="float32"), SPECTRA, GOOD[2]],
    "type missing": [image_json(type=None), SPECTRA, GOOD[2]],
    "compressed": [image_json(compression="bslz4"), SPECTRA, GOOD[2]],
    "frame negative": [image_json(frame=-1), SPECTRA, GOOD[2]],
    "frame bool": [image_json(frame=True), SPECTRA, GOOD[2]],
    "frame string": [image_json(frame="3"), SPECTRA, GOOD[2]],
    "exptime string": [image_json(exptime="0.1"), SPECTRA, GOOD[2]],
    "scalers not pickle": [GOOD[0], SPECTRA, b"[1, 2]"],
    "scalers truncated": [GOOD[0], SPECTRA, GOOD[2][:-10]],
    "scalers trailing bytes": [GOOD[0], SPECTRA, GOOD[2] + b"xx"],
    "seven scalers": [GOOD[0], SPECTRA, scalers(count=7)],
    "scaler wrong length": [GOOD[0], SPECTRA, scalers(s1=np.zeros(3, np.uint32))],
    "counter float": [GOOD[0], SPECTRA, scalers(s3=np.zeros(2))],
    "counter negative": [GOOD[0], SPECTRA, scalers(s6=np.array([-1, 6], np.int32))],
    "dtc integer": [GOOD[0], SPECTRA, scalers(s7=np.ones(2, np.int64))],
    "scalers a dict": [GOOD[0], SPECTRA, pickle.dumps({"a": 1})],
    "scalers of ints": [GOOD[0], SPECTRA, pickle.dumps([1, 2, 3, 4, 5, 6, 7, 8])],
    "window counts wrong": [GOOD[0], SPECTRA, pickle.dumps(pickle.loads(scalers()) + [np.zeros((2, 3), np.uint32)])],
    "unknown htype": [b'{"htype": "dimage-1.0", "frame": 0}'],
    "not json": [b"hello"],
    "json list": [b"[1, 2]"],
    "header filename int": [b'{"htype": "header", "filename": 3}'],
    "header tags not names": [b'{"htype": "header", "filename": "f", "extra_tags": [1]}'],
    "stray binary": [SPECTRA],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_messages_are_refused_with_one_error_type(name) -> None:
    decoder = XspressDecoder()
    with pytest.raises(XspressError):
        decoder.feed(MALFORMED[name])
    # the decoder goes on: the next good frame decodes
    frame = decoder.feed(GOOD)[0]
    assert isinstance(frame, XspressFrame) and frame.channels["mca"].sum() == np.arange(16).sum()


def test_an_old_form_frame_cut_short_is_refused_and_the_stream_goes_on() -> None:
    """PUB drops messages when a subscriber falls behind: a frame whose spectra or scalers never
    come is refused (its reason kept), and the next frame decodes."""
    decoder = XspressDecoder()
    assert decoder.feed([GOOD[0]]) == []
    with pytest.raises(XspressError, match="frame 0: expected its spectra"):
        decoder.feed([GOOD[2]])  # the spectra were lost: the scalers come where they belong
    assert decoder.feed([image_json(frame=1)]) == [] and decoder.feed([SPECTRA]) == []
    assert decoder.feed([image_json(frame=2)]) == []  # frame 1's scalers lost: a new image header comes
    assert decoder.pop_problems() == ["frame 1: a 'image' message came before its scalers: frame refused"]
    assert decoder.feed([SPECTRA]) == []
    frames = decoder.feed([GOOD[2]])
    assert [f.frame for f in frames] == [2]
    assert decoder.feed([image_json(frame=3)]) == []
    end = decoder.feed([b'{"htype": "series_end"}'])
    assert isinstance(end[0], XspressEnd) and decoder.pop_problems() == [
        "frame 3: a 'series_end' message came before its spectra and scalers: frame refused"]
    assert decoder.feed(GOOD)[0].frame == 0


def test_spectra_that_start_like_json_are_taken_by_their_size() -> None:
    spectra = np.array([0x7B, 1] + [0] * 14, "<u4").tobytes()  # first byte "{"
    decoder = XspressDecoder()
    decoder.feed([GOOD[0]])
    assert decoder.feed([spectra]) == []
    assert decoder.feed([GOOD[2]])[0].channels["mca"][0, 0] == 0x7B


def test_random_corruption_and_random_splits_never_escape_as_other_errors() -> None:
    rng = np.random.default_rng(16)
    recorded = messages("xspress3-multipart.cbors") + messages("xspress3-dump.cbors")[:12]
    parts = [p for m in recorded for p in m]
    outcomes = {"events": 0, "refused": 0}
    decoder = XspressDecoder()
    for _ in range(1500):
        k = int(rng.integers(len(parts)))
        n = int(rng.integers(1, 4))
        message = [bytearray(p) for p in parts[k:k + n]]
        for p in message:
            if p and rng.random() < 0.5:
                for _ in range(int(rng.integers(1, 4))):
                    p[int(rng.integers(len(p)))] = int(rng.integers(256))
            if p and rng.random() < 0.2:
                del p[int(rng.integers(len(p))):]
        try:
            got = decoder.feed(message)
            outcomes["events"] += len(got)
        except XspressError:
            outcomes["refused"] += 1
        decoder.pop_problems()
    assert outcomes["events"] > 20 and outcomes["refused"] > 100


# ---------------------------------------------------------------- hostile pickles
class _Shell:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tangomesh-xspress-pwned",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class _Frombuffer:
    def __reduce__(self):
        return (np.frombuffer, (b"\0" * 8,))


EVIL = {
    "os.system": pickle.dumps([_Shell()]),
    "builtins.eval": pickle.dumps([_Eval()], protocol=2),
    "object array": pickle.dumps([np.array([1, "a"], dtype=object)]),
    "numpy.frombuffer": pickle.dumps([_Frombuffer()], protocol=4),
    "out-of-band buffer": pickle.dumps([np.arange(4)], protocol=5, buffer_callback=lambda b: False),
    "structured dtype": pickle.dumps([np.zeros(2, dtype=[("a", "<u4")])]),
    "datetime": pickle.dumps([np.zeros(2, dtype="M8[s]")]),
}


@pytest.mark.parametrize("name", sorted(EVIL))
def test_a_pickle_asking_for_anything_but_numeric_arrays_is_refused_saying_why(name) -> None:
    flag = "/tmp/tangomesh-xspress-pwned"
    if os.path.exists(flag):
        os.unlink(flag)
    with pytest.raises(XspressError) as err:
        load_scalers(EVIL[name])
    assert not os.path.exists(flag)
    message = str(err.value)
    if name in ("os.system", "builtins.eval", "numpy.frombuffer"):
        asked = {"os.system": "posix.system", "builtins.eval": "__builtin__.eval",  # protocol 2 names it so
                 "numpy.frombuffer": "numpy.frombuffer"}[name]
        assert f"asks for {asked}: refused" in message
    assert "refused" in message
    decoder = XspressDecoder()
    with pytest.raises(XspressError):
        decoder.feed([GOOD[0], SPECTRA, EVIL[name]])


def test_the_real_pickles_need_only_the_three_stand_ins() -> None:
    """What the recorded pickles ask for (pickletools), and that both protocols (3 and 4) load."""
    asked = set()
    for name in XSPRESS_FILES:
        for part in (p for m in messages(name) for p in m if p[:1] == b"\x80"):
            ops = list(pickletools.genops(part))
            strings = [arg for op, arg, _ in ops if op.name in ("SHORT_BINUNICODE", "BINUNICODE")]
            asked |= {arg.replace(" ", ".") for op, arg, _ in ops if op.name == "GLOBAL"}
            asked |= {s for s in strings if s in ("_reconstruct", "ndarray", "dtype")}
            assert len(load_scalers(part)) in (8, 9)
    assert asked == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "_reconstruct",
                     "ndarray", "dtype"}


def test_pickles_of_numpy_2_and_big_endian_arrays_load() -> None:
    values = [np.zeros(2), np.array([3, 4], ">u4"), np.array([1, 2], "<u8"), np.array([9, 9], "<i8"),
              np.array([9, 9], "<u2"), np.array([0, 0], "<u4"), np.array([6, 6], "<i4"), np.ones(2, ">f8")]
    got = load_scalers(pickle.dumps(values, protocol=3))
    for a, b in zip(got, values):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- dead time
def test_a_saturated_channel_has_no_correction_rather_than_infinity() -> None:
    out = dead_time(np.array([10, 1000]), np.array([9, 0]), np.array([8000, 8000]), np.array([0, 8000]),
                    np.array([6, 6]))
    assert out["dtc"][0] == pytest.approx(8000 / (8000 - 70))
    assert np.isnan(out["dtc"][1]) and np.isnan(out["icr"][1]) and out["ocr"][1] == 0.0
    zero = dead_time(np.array([0]), np.array([0]), np.array([0]), np.array([0]), np.array([6]))
    assert np.isnan(zero["ocr"][0]) and np.isnan(zero["dtc"][0])


def test_counters_near_the_uint32_limit_do_not_overflow() -> None:
    events = np.array([2**32 - 1], np.uint32)
    out = dead_time(events, events, np.array([2**32 - 1], np.uint32), np.array([0], np.uint32),
                    np.array([0], np.int32))
    assert np.isnan(out["dtc"][0])  # busy = events x 1 = clock: no live time, not a wrapped integer


# ---------------------------------------------------------------- into the series mapping
def test_recorded_frames_map_to_indices_a_removed_frame_a_gap_repeats_refused() -> None:
    """The Mini capture through the series mapping with frame 7 removed: index 7 is a gap, the
    other indices hold their own frames; its second copy of frames 0..10 (same series, no new
    header) is refused frame by frame, never renumbered onto later indices."""
    msgs = messages("xspress3mini-dump20.cbors")
    heads = [json.loads(m[0]) if m[0][:1] == b"{" else {} for m in msgs]
    repeat = [k for k, h in enumerate(heads) if h.get("frame") == 0][1]
    assert [p for m in msgs[1:repeat] for p in m] == [p for m in msgs[repeat:-1] for p in m]  # byte for byte
    drop = next(k for k, h in enumerate(heads) if h.get("frame") == 7)
    replay = msgs[:drop] + msgs[drop + 3:]  # frame 7's three messages never came
    decoder, mapper = XspressDecoder(), SeriesMapper("xspress3", block_frames=4)
    out: list[codec.Message] = []
    refused = []
    for message in replay:
        for event in decoder.feed(message):
            try:
                if isinstance(event, XspressStart):
                    out += mapper.bind(event, ScanChoice("scan-x", 11, ("xrf",)))
                elif isinstance(event, XspressFrame):
                    out += mapper.frame(event)
                else:
                    out += mapper.end(event)
            except ValueError as exc:
                refused.append(str(exc))
    assert len(refused) == 11 and all("again or out of order" in r for r in refused)
    gaps = [m for m in out if m.type == codec.GAP]
    assert [(g.index, g.count) for g in gaps] == [(7, 1)]
    data = [m for m in out if m.type == codec.DATA]
    indices = np.concatenate([np.arange(m.index, m.stop) for m in data])
    np.testing.assert_array_equal(indices, [i for i in range(11) if i != 7])
    assert data[0].arrays["mca"].shape == (4, 2, 4096) and data[0].arrays["dtc"].shape == (4, 2)
    assert data[0].arrays["exptime"].shape == (4,)
    end = out[-1]
    assert end.type == codec.SCAN_END and end.count == 11 and mapper.frames == 10 and mapper.gap_points == 1
    want = oracle(msgs)
    for m in data:
        for j, i in enumerate(range(m.index, m.stop)):
            np.testing.assert_array_equal(m.arrays["mca"][j], want[i]["mca"])


def test_frames_before_any_header_are_refused_as_a_series_without_start() -> None:
    msgs = messages("xspress3-dump.cbors")[4:]  # came up mid-series: no header
    decoder, mapper = XspressDecoder(), SeriesMapper("xspress3", 4)
    refused = drained = 0
    for message in msgs:
        for event in decoder.feed(message):
            if isinstance(event, XspressFrame):
                assert event.series == 0
                try:
                    mapper.frame(event)
                except ValueError:
                    refused += 1
            elif isinstance(event, XspressEnd):
                assert mapper.end(event) == []
    drained = mapper.drained
    assert refused == 1 and drained == 19 and mapper.frames == 0
