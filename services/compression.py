"""Detector frames that travel still compressed, and their one decompression.

A pixel detector (an EIGER, a PILATUS4) compresses each frame itself; decoding
it in the ingester or the master would multiply the bytes every later hop
carries by three to ten. So a block of such frames stays compressed on the
wire, through the master's event formation, up to the worker whose processor
needs pixels: there :func:`decoded` turns it into an array once.

The bytes of each frame are exactly an HDF5 chunk of the matching filter, so
a writer can store them unchanged (direct chunk write) and any HDF5 reader
with hdf5plugin opens the result:

* ``bslz4``: the Bitshuffle filter (32008) with LZ4 — a 12-byte header
  (big-endian uint64 decoded bytes, uint32 block size in bytes), then per
  block a big-endian uint32 compressed size and the LZ4 block. DECTRIS
  stream v1 ``bs<N>-lz4<`` and stream v2 tag 56500 ``bslz4`` carry this.
* ``lz4``: the LZ4 filter (32004) — the same 12-byte header, then per block a
  big-endian uint32 compressed size and the LZ4 block, a block whose size
  equals the block size being stored raw. Stream v2 ``lz4`` carries this; a
  stream v1 ``lz4<`` frame (one bare LZ4 block) becomes it with
  :func:`frame_lz4_block`.

A :class:`CompressedFrames` is the array-like the codec decodes such a block
into: a zero-copy view of the received frame plus where each point's chunk
starts. It slices and joins along the point axis as formation needs, without
decompressing anything. Every malformed chunk raises :class:`CompressionError`
(a ``ValueError``), never anything else.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

BSLZ4, LZ4 = "bslz4", "lz4"
CODECS = frozenset({BSLZ4, LZ4})
HEADER = struct.Struct(">QI")  # decoded bytes, block size in bytes: both filters' chunk header
BSLZ4_BLOCK_BYTES = 8192  # what every EIGER sends, and hdf5plugin's default for 16-bit data
LZ4_BLOCK_BYTES = 1 << 30  # the LZ4 filter's default: one block per frame


class CompressionError(ValueError):
    """A compressed frame that is not what its descriptor says."""


@dataclass(frozen=True, slots=True)
class CompressedFrames:
    """``count`` frames of ``frame_shape``/``dtype``, each compressed with ``codec``.

    ``data`` holds the chunks back to back; chunk ``i`` is
    ``data[offsets[i]:offsets[i + 1]]``. ``shape`` and ``dtype`` are those of
    the decoded block, so formation checks a stream's arrays the same way
    whether they travel compressed or not; ``nbytes`` is what is held (the
    compressed bytes), which is what memory budgets count.
    """

    codec: str
    dtype: np.dtype
    frame_shape: tuple[int, ...]
    data: memoryview
    offsets: np.ndarray  # int64, count + 1 entries, offsets[0] == 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.offsets) - 1, *self.frame_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.frame_shape)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame."""
        return math.prod(self.frame_shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def chunk(self, i: int) -> memoryview:
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def sizes(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def copy(self) -> "CompressedFrames":
        """The frames with bytes of their own (not a view of a received message)."""
        data = np.frombuffer(self.data, np.uint8).copy()
        return CompressedFrames(self.codec, self.dtype, self.frame_shape, memoryview(data), self.offsets.copy())

    def __getitem__(self, key: slice) -> "CompressedFrames":
        """Frames ``key`` (a step-1 slice), still compressed, without a copy."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("compressed frames slice along the point axis only")
        start, stop, _ = key.indices(len(self))
        stop = max(start, stop)
        base = int(self.offsets[start])
        return CompressedFrames(self.codec, self.dtype, self.frame_shape,
                                self.data[base:int(self.offsets[stop])], self.offsets[start:stop + 1] - base)

    @classmethod
    def from_buffer(cls, codec: str, dtype: np.dtype | str, shape: Sequence[int], sizes: Sequence[int],
                    data: Any) -> "CompressedFrames":
        """The frames of a received buffer, validated against the descriptor:
        a known codec, one size per point adding up to the buffer, and each
        chunk's header naming the decoded size of one frame."""
        if codec not in CODECS:
            raise CompressionError(f"unknown frame codec {codec!r} (known: {sorted(CODECS)})")
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf" or not shape:
            raise CompressionError(f"compressed frames must be numeric with a point axis, not {dtype}{list(shape)}")
        count, frame_shape = int(shape[0]), tuple(int(n) for n in shape[1:])
        view = memoryview(data).cast("B")
        if len(sizes) != count or not all(type(n) is int and n >= HEADER.size for n in sizes):
            raise CompressionError(f"need {count} chunk sizes of at least {HEADER.size} bytes")
        offsets = np.zeros(count + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        if offsets[-1] != len(view):
            raise CompressionError(f"chunk sizes add up to {int(offsets[-1])} bytes, the frame has {len(view)}")
        frames = cls(codec, dtype, frame_shape, view, offsets)
        expected = frames.frame_bytes
        for i in range(count):
            total, block = HEADER.unpack_from(view, int(offsets[i]))
            if total != expected or block == 0 or (codec == BSLZ4 and block % (8 * dtype.itemsize)):
                raise CompressionError(f"chunk {i} says {total} bytes in blocks of {block}; a frame of "
                                       f"{dtype.str}{list(frame_shape)} is {expected} bytes")
        return frames

    @classmethod
    def compress(cls, frames: np.ndarray, codec: str = BSLZ4) -> "CompressedFrames":
        """Compress each of ``frames`` (point axis first) as a detector would:
        for simulated detectors, ingesters that must re-frame, and tests."""
        import bitshuffle
        import lz4.block

        frames = np.ascontiguousarray(frames)
        if codec not in CODECS or frames.ndim < 1 or frames.dtype.kind not in "biuf":
            raise CompressionError(f"cannot compress {frames.dtype}{list(frames.shape)} with {codec!r}")
        chunks = []
        for frame in frames:
            if codec == BSLZ4:
                block = BSLZ4_BLOCK_BYTES // frame.dtype.itemsize
                body = bitshuffle.compress_lz4(frame, block).tobytes()
                chunks.append(HEADER.pack(frame.nbytes, block * frame.dtype.itemsize) + body)
            else:
                chunks.append(frame_lz4_block(lz4.block.compress(frame.tobytes(), store_size=False), frame.nbytes))
        data = b"".join(chunks)
        return cls.from_buffer(codec, frames.dtype, frames.shape, [len(c) for c in chunks], data)

    def decompress(self) -> np.ndarray:
        """The decoded block, ``shape``/``dtype``: each frame decoded once, into one array."""
        out = np.empty(self.shape, self.dtype)
        for i in range(len(self)):
            out[i] = self._decode(i)
        return out

    def _decode(self, i: int) -> np.ndarray:
        import bitshuffle
        import lz4.block

        chunk = self.chunk(i)
        total, block = HEADER.unpack_from(chunk, 0)
        body = np.frombuffer(chunk, np.uint8, offset=HEADER.size)
        try:
            if self.codec == BSLZ4:
                _check_bslz4_layout(body, total // self.dtype.itemsize, block // self.dtype.itemsize,
                                    self.dtype.itemsize)
                return bitshuffle.decompress_lz4(body, self.frame_shape, self.dtype, block // self.dtype.itemsize)
            return np.frombuffer(_lz4_blocks(body, total, block, lz4.block), self.dtype).reshape(self.frame_shape)
        except CompressionError:
            raise
        except Exception as exc:  # bitshuffle and lz4 raise ValueError, RuntimeError, LZ4BlockError, ...
            raise CompressionError(f"frame {i} does not decompress ({self.codec}): {type(exc).__name__}: {exc}") \
                from None


def _check_bslz4_layout(body: np.ndarray, elements: int, block: int, itemsize: int) -> None:
    """Walk the block sizes of a bitshuffle-LZ4 stream before bitshuffle reads
    it: bitshuffle trusts them and reads past the buffer (a crash, not an
    error) when they lie. Bitshuffle cuts ``elements`` into blocks of
    ``block``, then one block of the rest rounded down to a multiple of 8,
    and copies the last ``elements % 8`` raw."""
    rest = elements % block
    blocks = elements // block + (1 if rest - rest % 8 else 0)
    sizes = body.data
    pos, end = 0, len(body)
    for _ in range(blocks):
        if pos + 4 > end:
            raise CompressionError("bitshuffle-LZ4 chunk ends inside a block header")
        (size,) = struct.unpack_from(">I", sizes, pos)
        pos += 4 + size
        if pos > end:
            raise CompressionError("bitshuffle-LZ4 chunk ends inside a block")
    if end - pos != (elements % 8) * itemsize:
        raise CompressionError(f"bitshuffle-LZ4 chunk has {end - pos} bytes after its blocks, "
                               f"expected {(elements % 8) * itemsize}")


def _lz4_blocks(body: np.ndarray, total: int, block: int, lz4_block: Any) -> bytes:
    """The LZ4 filter's blocks back to bytes; CompressionError on any inconsistency."""
    out, pos, raw = bytearray(), 0, body.tobytes()
    while len(out) < total:
        want = min(block, total - len(out))
        if pos + 4 > len(raw):
            raise CompressionError("LZ4 chunk ends inside a block header")
        (size,) = struct.unpack_from(">I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise CompressionError("LZ4 chunk ends inside a block")
        piece = raw[pos:pos + size]
        pos += size
        decoded = piece if size == want else lz4_block.decompress(piece, uncompressed_size=want)
        if len(decoded) != want:
            raise CompressionError(f"LZ4 block decoded to {len(decoded)} bytes, expected {want}")
        out += decoded
    if pos != len(raw):
        raise CompressionError(f"{len(raw) - pos} bytes after the last LZ4 block")
    return bytes(out)


def frame_lz4_block(block: bytes, decoded_bytes: int) -> bytes:
    """One bare LZ4 block (stream v1 ``lz4<``) as an LZ4-filter chunk.

    The filter takes a block as long as its decoded size for one stored raw,
    so an LZ4 block that happens to be exactly that long (rare: data LZ4
    barely compresses) is decoded here and stored raw, as the filter would
    have written it; CompressionError if it does not decode to that size."""
    if len(block) == decoded_bytes:
        import lz4.block

        try:
            block = lz4.block.decompress(block, uncompressed_size=decoded_bytes)
        except Exception as exc:  # LZ4BlockError and friends
            raise CompressionError(f"LZ4 block does not decode: {exc}") from None
        if len(block) != decoded_bytes:
            raise CompressionError(f"LZ4 block decoded to {len(block)} bytes, expected {decoded_bytes}")
    return HEADER.pack(decoded_bytes, max(decoded_bytes, 1)) + struct.pack(">I", len(block)) + block


def join(parts: Sequence[CompressedFrames]) -> CompressedFrames:
    """Consecutive pieces of one stream's frames as one block (one copy of the compressed bytes)."""
    first = parts[0]
    if any((p.codec, p.dtype, p.frame_shape) != (first.codec, first.dtype, first.frame_shape) for p in parts):
        raise CompressionError("cannot join compressed frames of different codecs, dtypes or shapes")
    data = np.concatenate([np.frombuffer(p.data, np.uint8) for p in parts]) if len(parts) > 1 \
        else np.frombuffer(first.data, np.uint8)
    sizes = np.concatenate([np.diff(p.offsets) for p in parts])
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return CompressedFrames(first.codec, first.dtype, first.frame_shape, memoryview(data), offsets)


def concatenate(pieces: Sequence[Any]) -> Any:
    """Join consecutive pieces of one array along the point axis, compressed or not."""
    if isinstance(pieces[0], CompressedFrames):
        if not all(isinstance(p, CompressedFrames) for p in pieces):
            raise CompressionError("a stream's array changed between compressed and plain frames")
        return join(pieces)
    return np.concatenate(pieces)


def hdf5_filter(codec: str) -> dict[str, Any]:
    """The h5py dataset options whose HDF5 filter reads chunks of ``codec`` as
    they travel (for direct chunk writes of frames kept compressed)."""
    import hdf5plugin

    if codec == BSLZ4:
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if codec == LZ4:
        return dict(hdf5plugin.LZ4())
    raise CompressionError(f"unknown frame codec {codec!r} (known: {sorted(CODECS)})")


def decoded(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``arrays`` with every compressed block decompressed: what a processor is given."""
    return {n: a.decompress() if isinstance(a, CompressedFrames) else a for n, a in arrays.items()}
