"""Frames that travel compressed (services/compression.py): the bytes are
exactly the chunks of the HDF5 Bitshuffle-LZ4 and LZ4 filters, checked both
ways against hdf5plugin's filters (code we did not write); the codec carries
them without a copy and refuses what does not fit its descriptor; a corrupt
chunk is refused, never a crash; formation slices and joins them still
compressed. (Through the whole chain, decompressed in the worker only:
tests/component/test_chain.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from pipelines.formation import EventFormer
from services import codec, protocol
from services.compression import BSLZ4, LZ4, CompressedFrames, CompressionError, decoded, frame_lz4_block
from services.sim.profiles import ProfileScan, compressed_frames
from services.scan import parse_scan

FILTERS = {BSLZ4: hdf5plugin.Bitshuffle(nelems=0, cname="lz4"), LZ4: hdf5plugin.LZ4()}
ROOT = Path(__file__).resolve().parents[2]


def frames(count: int = 3, shape: tuple[int, int] = (61, 47), dtype: str = "<u2", seed: int = 1) -> np.ndarray:
    """Poisson counts like a pixel detector's (odd sizes: elements not a multiple of 8)."""
    return np.random.default_rng(seed).poisson(4, (count, *shape)).astype(dtype)


@pytest.mark.parametrize("codec_name", [BSLZ4, LZ4])
@pytest.mark.parametrize("dtype", ["|u1", "<u2", "<u4", "<i4", "<f4"])
def test_frames_round_trip(codec_name: str, dtype: str) -> None:
    original = frames(dtype=dtype)
    packed = CompressedFrames.compress(original, codec_name)
    assert packed.shape == original.shape and packed.dtype == original.dtype and len(packed) == 3
    out = packed.decompress()
    assert out.dtype == original.dtype
    np.testing.assert_array_equal(out, original)


@pytest.mark.parametrize("codec_name", [BSLZ4, LZ4])
def test_our_chunks_are_what_the_hdf5_filter_reads(codec_name: str, tmp_path) -> None:
    """Stored unchanged with a direct chunk write, hdf5plugin's filter decodes them."""
    original = frames(count=4, shape=(64, 80))
    packed = CompressedFrames.compress(original, codec_name)
    path = tmp_path / "direct.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("data", original.shape, original.dtype, chunks=(1, 64, 80), **FILTERS[codec_name])
        for i in range(len(packed)):
            ds.id.write_direct_chunk((i, 0, 0), bytes(packed.chunk(i)))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][()], original)


@pytest.mark.parametrize("codec_name", [BSLZ4, LZ4])
def test_we_read_the_chunks_the_hdf5_filter_wrote(codec_name: str, tmp_path) -> None:
    original = frames(count=4, shape=(64, 80), dtype="<u4")
    path = tmp_path / "filtered.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=original, chunks=(1, 64, 80), **FILTERS[codec_name])
    with h5py.File(path, "r") as f:
        chunks = [f["data"].id.read_direct_chunk((i, 0, 0))[1] for i in range(4)]
    received = CompressedFrames.from_buffer(codec_name, "<u4", original.shape, [len(c) for c in chunks],
                                            b"".join(chunks))
    np.testing.assert_array_equal(received.decompress(), original)


def test_a_bare_lz4_block_of_stream_v1_becomes_a_filter_chunk() -> None:
    import lz4.block

    frame = frames(count=1)[0]
    chunk = frame_lz4_block(lz4.block.compress(frame.tobytes(), store_size=False), frame.nbytes)
    got = CompressedFrames.from_buffer(LZ4, frame.dtype, (1, *frame.shape), [len(chunk)], chunk)
    np.testing.assert_array_equal(got.decompress()[0], frame)


def test_a_bare_lz4_block_exactly_as_long_as_its_frame_is_not_taken_for_a_raw_one() -> None:
    """The LZ4 filter reads a block of its decoded size as stored raw: a v1
    block that compresses to exactly that size must still come back right."""
    import lz4.block

    rng = np.random.default_rng(0)
    frame = np.frombuffer(rng.integers(0, 256, 64, dtype=np.uint8).tobytes(), "<u2").copy()
    frame.view(np.uint8)[:6] = 0  # found by search: LZ4 compresses these 64 bytes to exactly 64
    block = lz4.block.compress(frame.tobytes(), store_size=False)
    assert len(block) == frame.nbytes and block != frame.tobytes()
    chunk = frame_lz4_block(block, frame.nbytes)
    got = CompressedFrames.from_buffer(LZ4, frame.dtype, (1, 4, 8), [len(chunk)], chunk)
    np.testing.assert_array_equal(got.decompress()[0].ravel(), frame)
    with pytest.raises(CompressionError, match="does not decode"):
        frame_lz4_block(b"\xff" * frame.nbytes, frame.nbytes)


def test_the_codec_carries_compressed_frames_without_a_copy_or_a_decode() -> None:
    original = frames(count=5)
    packed = CompressedFrames.compress(original, BSLZ4)
    wire = codec.encode(codec.Message(codec.DATA, scan="s", stream="eiger", index=10, count=5,
                                      arrays={"image": packed, "i0": np.arange(5.0)}))
    assert wire[1] is packed.data  # the chunks themselves are the frame
    assert len(wire[1]) < original.nbytes / 2  # and they travel compressed
    msg = codec.decode(wire)
    got = msg.arrays["image"]
    assert isinstance(got, CompressedFrames) and got.shape == original.shape and got.sizes() == packed.sizes()
    assert np.shares_memory(np.frombuffer(got.data, np.uint8), np.frombuffer(wire[1], np.uint8))
    np.testing.assert_array_equal(got.decompress(), original)
    np.testing.assert_array_equal(msg.arrays["i0"], np.arange(5.0))


@pytest.mark.parametrize("spoil, why", [
    (lambda d: d[3].update(sizes=d[3]["sizes"][:-1]), "chunk sizes"),
    (lambda d: d[3].update(sizes=[d[3]["sizes"][0] + 1, *d[3]["sizes"][1:]]), "add up to"),
    (lambda d: d[3].update(codec="zstd"), "unknown frame codec"),
    (lambda d: d[3].update(extra=1), "fourth entry"),
    (lambda d: d.__setitem__(2, [3, 60, 47]), "says"),  # frames claimed smaller than their chunks' headers
    (lambda d: d.__setitem__(1, "<c8"), "numeric"),
])
def test_a_compressed_descriptor_that_lies_is_refused(spoil, why: str) -> None:
    import msgpack

    packed = CompressedFrames.compress(frames(), BSLZ4)
    wire = codec.encode(codec.Message(codec.DATA, scan="s", stream="eiger", index=0, count=3,
                                      arrays={"image": packed}))
    header = msgpack.unpackb(wire[0])
    spoil(header["arrays"][0])
    with pytest.raises(codec.CodecError, match=why):
        codec.decode([msgpack.packb(header), wire[1]])


FUZZ = textwrap.dedent("""
    import sys
    import numpy as np
    from services.compression import CompressedFrames, CompressionError
    rng = np.random.default_rng(7)
    refused = 0
    for name in ("bslz4", "lz4"):
        original = rng.poisson(3, (2, 128, 301)).astype(np.uint16)
        packed = CompressedFrames.compress(original, name)
        sizes, raw = packed.sizes(), np.frombuffer(packed.data, np.uint8)
        for trial in range(300):
            spoilt = raw.copy()
            if trial % 2:
                spoilt[12:16] = rng.integers(0, 256, 4)  # the first block's size
            else:
                spoilt[rng.integers(12, len(spoilt), 8)] = rng.integers(0, 256, 8)
            try:
                CompressedFrames.from_buffer(name, "<u2", original.shape, sizes, spoilt.tobytes()).decompress()
            except CompressionError:
                refused += 1
    print(refused)
""")


def test_corrupt_chunks_are_refused_and_never_crash_the_process() -> None:
    """bitshuffle itself reads past its input when a block size lies (a
    segfault, checked): the block walk before it must stop every such chunk.
    In a child process, so that a crash fails this test instead of the run."""
    child = subprocess.run([sys.executable, "-c", FUZZ], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert child.returncode == 0, f"the decoder crashed ({child.returncode}): {child.stderr[-2000:]}"
    assert int(child.stdout) >= 300  # every lying block size, and more, refused with CompressionError


def test_slices_and_joins_stay_compressed_and_decode_to_the_same_frames() -> None:
    original = frames(count=9)
    packed = CompressedFrames.compress(original, LZ4)
    part = packed[2:7]
    assert isinstance(part, CompressedFrames) and part.shape == (5, 61, 47)
    np.testing.assert_array_equal(part.decompress(), original[2:7])
    from services.compression import concatenate

    joined = concatenate([packed[0:2], packed[2:5], packed[5:9]])
    np.testing.assert_array_equal(joined.decompress(), original)
    with pytest.raises(CompressionError):
        concatenate([packed[0:2], original[2:5]])
    with pytest.raises(TypeError):
        packed[::2]
    assert decoded({"a": packed, "b": original})["a"].dtype == original.dtype


def test_formation_cuts_units_from_compressed_blocks_without_decompressing() -> None:
    """An EIGER stream in blocks of 7 beside a scaler in blocks of 5: every unit's
    frames are still compressed and decode to exactly that unit's frames."""
    points = 40
    original = frames(count=points, shape=(16, 24))
    doc = ProfileScan(compressed_frames((16, 24)), "p1", points).document("s1", 1)
    former = EventFormer(parse_scan(doc), ["eiger", "scaler"], 2.0, now=0.0)
    for start in range(0, points, 7):
        stop = min(points, start + 7)
        former.add_block(codec.Message(codec.DATA, scan="s1", stream="eiger", index=start, count=stop - start,
                                 arrays={"image": CompressedFrames.compress(original[start:stop])}), now=0.0)
    for start in range(0, points, 5):
        former.add_block(codec.Message(codec.DATA, scan="s1", stream="scaler", index=start, count=5,
                                       arrays={"i0": np.arange(start, start + 5, dtype="<f8"),
                                               "t": np.zeros(5)}), now=0.0)
    units = []
    while (unit := former.take_unit(6, 10**9, 0)) is not None:
        units.append(unit)
    assert sum(u.count for u in units) == points
    for unit in units:
        image = unit.arrays[protocol.array_key("eiger", "image")]
        assert isinstance(image, CompressedFrames)
        np.testing.assert_array_equal(image.decompress(), original[unit.index:unit.stop])


@pytest.mark.parametrize("codec_name", [BSLZ4, LZ4])
@pytest.mark.parametrize("dtype", ["|u1", "<u2", "<u4"])
def test_every_chunk_the_mesh_carries_decodes_with_dectris_own_decoder(codec_name: str, dtype: str) -> None:
    """DECTRIS' reference decoder (dectris-compression, from PyPI) reads the chunks
    as the HDF5 filters frame them, as we carry them: same pixels as ours."""
    from dectris.compression import decompress

    original = frames(count=4, dtype=dtype, seed=7)
    packed = CompressedFrames.compress(original, codec_name)
    ours = packed.decompress()
    for i in range(len(packed)):
        theirs = decompress(bytes(packed.chunk(i)), codec_name, elem_size=original.dtype.itemsize)
        np.testing.assert_array_equal(np.frombuffer(theirs, original.dtype).reshape(original.shape[1:]), ours[i])


def test_a_bare_lz4_block_framed_for_the_filter_decodes_with_dectris_own_decoder() -> None:
    import lz4.block
    from dectris.compression import decompress

    frame = frames(count=1, seed=9)[0]
    chunk = frame_lz4_block(lz4.block.compress(frame.tobytes(), store_size=False), frame.nbytes)
    np.testing.assert_array_equal(np.frombuffer(decompress(chunk, "lz4"), frame.dtype).reshape(frame.shape), frame)

