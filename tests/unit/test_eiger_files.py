"""EIGER master + data files read as a series, frames still compressed.

The files are written the way DECTRIS's file writer lays them out (master
``/entry/data/data_NNNNNN`` external links to data files' ``/entry/data/data``,
one chunk per frame) with the HDF5 filters of ``hdf5plugin`` (bitshuffle-LZ4,
LZ4) doing the compression; the oracle for every frame is h5py reading the
dataset through those filters.
"""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest

from ingesters.eiger_files import EigerMaster, FileLayoutError
from ingesters.replay import FileConfig, parse_pace
from ingesters.simplon import Frame, SeriesEnd, SeriesStart
from services.compression import CompressedFrames

Y, X = 24, 40


def write_series(tmp_path, frames_per_file=(5, 3), compression="bslz4", dtype="<u2", frame_time=0.05,
                 name="scan"):
    rng = np.random.default_rng(7)
    total = sum(frames_per_file)
    pixels = rng.poisson(20, size=(total, Y, X)).astype(dtype)
    filters = {"bslz4": hdf5plugin.Bitshuffle(nelems=0, cname="lz4"), "lz4": hdf5plugin.LZ4(), "none": {}}[compression]
    master = tmp_path / f"{name}_master.h5"
    with h5py.File(master, "w") as m:
        m["/entry/instrument/detector/frame_time"] = frame_time
        m["/entry/instrument/detector/detectorSpecific/nimages"] = total
        first = 0
        for k, n in enumerate(frames_per_file, start=1):
            data_name = f"{name}_data_{k:06d}.h5"
            with h5py.File(tmp_path / data_name, "w") as d:
                ds = d.create_dataset("/entry/data/data", data=pixels[first:first + n], chunks=(1, Y, X), **filters)
                ds.attrs["image_nr_low"], ds.attrs["image_nr_high"] = first + 1, first + n
            m[f"/entry/data/data_{k:06d}"] = h5py.ExternalLink(data_name, "/entry/data/data")
            first += n
    return master, pixels


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
def test_frames_come_out_as_stored_chunks_that_decode_to_the_pixels(tmp_path, compression) -> None:
    path, pixels = write_series(tmp_path, compression=compression)
    with EigerMaster(path) as master:
        assert (master.frames, master.codec, master.frame_shape, master.frame_time) == (8, compression, (Y, X), 0.05)
        events = list(master.events(series=3))
        with h5py.File(path) as f:
            stored = [f["/entry/data/data_000001"].id.read_direct_chunk((i, 0, 0))[1] for i in range(5)]
    start, frames, end = events[0], events[1:-1], events[-1]
    assert isinstance(start, SeriesStart) and start.expected == 8 and start.channels == ("image",)
    assert isinstance(end, SeriesEnd) and end.series == 3
    assert [f.frame for f in frames] == list(range(8)) and all(isinstance(f, Frame) for f in frames)
    for i, f in enumerate(frames):
        chunk = f.channels["image"]
        assert isinstance(chunk, CompressedFrames) and chunk.codec == compression and chunk.shape == (1, Y, X)
        np.testing.assert_array_equal(chunk.decompress()[0], pixels[i])
        if i < 5:
            assert bytes(chunk.chunk(0)) == stored[i]  # the file's bytes, not re-compressed


def test_a_part_of_the_file_is_numbered_from_zero(tmp_path) -> None:
    path, pixels = write_series(tmp_path)
    with EigerMaster(path) as master:
        frames = [e for e in master.events(1, first=4, count=3) if isinstance(e, Frame)]
    assert [f.frame for f in frames] == [0, 1, 2]
    np.testing.assert_array_equal(np.stack([f.channels["image"].decompress()[0] for f in frames]), pixels[4:7])


def test_unfiltered_frames_are_arrays(tmp_path) -> None:
    path, pixels = write_series(tmp_path, compression="none", dtype="<u4")
    with EigerMaster(path) as master:
        frame = master.frame(6)
    assert isinstance(frame, np.ndarray) and frame.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(frame, pixels[6])


def test_files_not_laid_out_as_dectris_writes_them_are_refused(tmp_path) -> None:
    with pytest.raises(FileLayoutError, match="not an HDF5 file"):
        (tmp_path / "junk.h5").write_bytes(b"not hdf5")
        EigerMaster(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("/entry/data")
    with pytest.raises(FileLayoutError, match="no data_NNNNNN"):
        EigerMaster(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["/entry/data/data_000001"] = np.zeros((4, 4))
    with pytest.raises(FileLayoutError, match="not a 3-D dataset"):
        EigerMaster(tmp_path / "flat.h5")
    with h5py.File(tmp_path / "float.h5", "w") as f:
        f["/entry/data/data_000001"] = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(FileLayoutError, match="not 8/16/32-bit"):
        EigerMaster(tmp_path / "float.h5")
    with h5py.File(tmp_path / "chunks.h5", "w") as f:
        f.create_dataset("/entry/data/data_000001", data=np.zeros((4, 4, 4), np.uint16), chunks=(2, 4, 4))
    with pytest.raises(FileLayoutError, match="not one frame per chunk"):
        EigerMaster(tmp_path / "chunks.h5")
    with h5py.File(tmp_path / "gzip.h5", "w") as f:
        f.create_dataset("/entry/data/data_000001", data=np.zeros((2, 4, 4), np.uint16), chunks=(1, 4, 4),
                         compression="gzip")
    with pytest.raises(FileLayoutError, match="filter 1 is neither"):
        EigerMaster(tmp_path / "gzip.h5")
    path, _ = write_series(tmp_path, name="gone")
    (tmp_path / "gone_data_000002.h5").unlink()
    with pytest.raises(FileLayoutError, match="missing data file"):
        EigerMaster(path)
    with h5py.File(tmp_path / "mixed.h5", "w") as f:
        f.create_dataset("/entry/data/data_000001", data=np.zeros((2, 4, 4), np.uint16), chunks=(1, 4, 4))
        f.create_dataset("/entry/data/data_000002", data=np.zeros((2, 4, 5), np.uint16), chunks=(1, 4, 5))
    with pytest.raises(FileLayoutError, match="differs in dtype, shape or compression"):
        EigerMaster(tmp_path / "mixed.h5")
    path, _ = write_series(tmp_path, name="short")
    with EigerMaster(path) as master, pytest.raises(FileLayoutError, match="not all in the file"):
        list(master.events(1, first=6, count=5))


def test_pace_and_config() -> None:
    assert parse_pace("recorded") is None and parse_pace("max") == 0.0 and parse_pace(20) == 0.05
    for bad in ("fast", 0, -1, "nan", 2e6):
        with pytest.raises(ValueError):
            parse_pace(bad)
    for bad in ({"master": ""}, {"pace": "soon"}, {"block_frames": 0}, {"pipelines": ()}, {"stream": "a/b"}):
        with pytest.raises(ValueError):
            FileConfig(**{"master": "m.h5", "pipelines": ("p",), **bad})
