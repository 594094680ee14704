"""Recordings of source streams (services/recording.py): what was received
comes back byte for byte with its time; a cut-off last record is left out,
anything else that is not a recording is refused; names never leave the
recording's directory."""

from __future__ import annotations

import numpy as np
import pytest

from services import codec
from services.compression import CompressedFrames
from services.recording import (MAGIC, RecordingError, StreamWriter, read_stream, safe_name, scan_directory,
                                stream_files)


def block(start: int, count: int) -> codec.Message:
    frames = np.random.default_rng(start).poisson(5, (count, 16, 24)).astype("<u2")
    return codec.Message(codec.DATA, scan="s1", stream="eiger", index=start, count=count,
                         arrays={"image": CompressedFrames.compress(frames), "i0": np.arange(start, start + count, 1.0)})


def test_messages_come_back_as_they_were_received_with_their_times(tmp_path) -> None:
    path = tmp_path / "eiger.tmrec"
    writer = StreamWriter(path)
    sent = [codec.encode(block(start, 5)) for start in range(0, 20, 5)]
    for k, frames in enumerate(sent):
        writer.write(0.5 * k, frames)
    writer.write(2.0, codec.encode(codec.Message(codec.SCAN_END, scan="s1", stream="eiger", count=20)))
    writer.close()
    records = list(read_stream(path))
    assert [r.seconds for r in records] == [0.0, 0.5, 1.0, 1.5, 2.0]
    for record, frames in zip(records, sent):
        again = codec.encode(record.message)
        assert [bytes(codec.frame_buffer(f)) for f in again] == [bytes(codec.frame_buffer(f)) for f in frames]
    first = records[0].message
    assert isinstance(first.arrays["image"], CompressedFrames)  # still compressed, as it came
    np.testing.assert_array_equal(first.arrays["image"].decompress(), block(0, 5).arrays["image"].decompress())
    assert records[-1].message.type == codec.SCAN_END and records[-1].message.count == 20
    assert stream_files(tmp_path) == {"eiger": path}


@pytest.mark.parametrize("cut", [3, 13, 40, -1])
def test_a_recording_cut_mid_record_gives_every_whole_record(tmp_path, cut: int) -> None:
    path = tmp_path / "eiger.tmrec"
    writer = StreamWriter(path)
    for start in range(0, 10, 5):
        writer.write(float(start), codec.encode(block(start, 5)))
    last_starts = writer.bytes
    writer.write(10.0, codec.encode(block(10, 5)))
    writer.close()
    whole = path.read_bytes()
    assert list(read_stream(path))[-1].message.index == 10
    # the writer was killed inside the last record: in its head, its lengths, its frames, its last byte
    path.write_bytes(whole[:last_starts + cut] if cut > 0 else whole[:-1])
    assert [r.message.index for r in read_stream(path)] == [0, 5]


def test_what_is_not_a_recording_is_refused(tmp_path) -> None:
    other = tmp_path / "x.tmrec"
    other.write_bytes(b"HDF\x89 something else entirely")
    with pytest.raises(RecordingError, match="not a tangomesh recording"):
        list(read_stream(other))
    forged = tmp_path / "y.tmrec"
    forged.write_bytes(MAGIC + b"\x00" * 8 + b"\xff\xff\xff\xff")  # four billion frames
    with pytest.raises(RecordingError, match="malformed"):
        list(read_stream(forged))
    garbage = tmp_path / "z.tmrec"
    writer = StreamWriter(garbage)
    writer.write(0.0, [b"\x93not msgpack", b"x"])
    writer.close()
    with pytest.raises(RecordingError, match="does not decode"):
        list(read_stream(garbage))


def test_names_stay_inside_the_recording_directory(tmp_path) -> None:
    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert scan_directory(tmp_path, "../up", "p1/../x").parent.parent == tmp_path
    assert safe_name("") == "_" and safe_name("...") == "_"
    with pytest.raises(FileExistsError):  # a recording is never overwritten
        StreamWriter(tmp_path / "a.tmrec")
        StreamWriter(tmp_path / "a.tmrec")


def test_a_replay_sends_the_recorded_blocks_and_declares_the_recorded_gaps_again(tmp_path) -> None:
    from services.ops.driver import ScanDriver
    from services.ops.replay import Replay
    from services.protocol import source_gap
    from services.recording import ScanRecording
    from services.sim.profiles import PROFILES, ProfileScan
    from topology_manager.local import LocalManagerLink
    from topology_manager.registry import Registry

    data = ProfileScan(PROFILES["counters"], "p1", 30, streams=["scaler"])
    recording = ScanRecording(tmp_path, "s1", "p1", data.document("s1", 1), started=100.0)
    for start, stop in ((0, 10), (20, 30)):
        msg = codec.Message(codec.DATA, scan="s1", stream="scaler", index=start, count=stop - start,
                            arrays=data.arrays("scaler", start, stop))
        recording.write("scaler", codec.encode(msg), now=100.0 + stop / 10)
    recording.write("scaler", codec.encode(source_gap("s1", "scaler", 10, 20, "frames lost")), now=103.5)
    recording.write("scaler", codec.encode(codec.Message(codec.SCAN_END, scan="s1", stream="scaler", count=30)),
                    now=104.0)
    recording.close()

    replay = Replay(scan_directory(tmp_path, "s1", "p1"))
    assert list(replay.blocks()) == [(0, 10, "scaler"), (20, 30, "scaler"), (10, 20, "scaler")]
    np.testing.assert_allclose(replay.times(), [1.0, 3.0, 3.5])
    assert replay.arrays("scaler", 10, 20) is None  # sent as a gap
    for name, want in data.arrays("scaler", 20, 30).items():
        np.testing.assert_array_equal(replay.arrays("scaler", 20, 30)[name], want)

    driver = ScanDriver.for_data(replay, LocalManagerLink(Registry(30.0, 10.0)))
    try:  # described from the data blocks, the gap left out
        assert driver.sources["p1", "scaler"].descriptor["max_block"] == 10
    finally:
        driver.close()
