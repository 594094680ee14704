"""The writers' formats, paths and claims on real files (no Tango); the
component on real ZeroMQ sockets. Expected maps and rows are written out by
hand from the geometry rules, not with the code under test."""

from __future__ import annotations

import hashlib
import json
import os
import time

import h5py
import numpy as np
import pytest
import zmq
from matplotlib.image import imread

from support import map_by_hand, scan_geometry
from services import protocol
from services import codec
from services.sim.profiles import PROFILES, ProfileScan
from services.ledger import FAILED, GAP, RECEIVED, PointLedger
from services.scan import parse_scan
from writers.component import ScanRun, WriterComponent, WriterConfig
from writers.fio import FioFile, read_fio
from writers.images import ImageFiles, ImageSettings
from writers.layout import FileClaim, OutputLayout, WriterError, read_checksums
from writers.nexus import NexusFile, NexusSettings


PIPE = "counters"
BITSHUFFLE = "32008"  # HDF5 filter id registered for Bitshuffle


def document(scan_id: str, kind: str = "raster", rows: int = 5, cols: int = 7, **changes) -> dict:
    doc = ProfileScan(PROFILES["counters"], PIPE, rows * cols,
                      geometry=scan_geometry(kind, rows, cols)).document(scan_id, 42)
    doc["sample"] = {"name": "cell-7", "description": "NMC cathode", "temperature_K": 295.5}
    doc["acquisition"].update({"dwell_s": 0.01, "energy_keV": 17.5})
    doc["devices"] = {"ring": {"current_mA": 99.7}, "undulator_gap_mm": 8.25, "shutter": "open"}
    for key, value in changes.items():
        doc[key] = value
    return doc


def new_run(tmp_path, doc: dict) -> ScanRun:
    meta = parse_scan(doc)
    return ScanRun(meta, PIPE, OutputLayout(tmp_path).stem(meta, PIPE), "test/writer/unit",
                   PointLedger.for_points(meta.points))


def drive(out, run: ScanRun, arrays: dict[str, np.ndarray], sizes: list[int], failed: set[int] = frozenset(),
          gaps: set[int] = frozenset()) -> None:
    """Deliver like a sorter: chunks in order, failed points flagged, gaps declared."""
    points = run.meta.points
    start = 0
    for size in sizes * points:
        if start >= points:
            break
        stop = min(points, start + size)
        if start in gaps:
            out.gap(start, start + 1)
            run.ledger.mark_gap(start, 1)
            start += 1
            continue
        stop = min([stop, *(g for g in gaps if g > start)])
        meta = {protocol.META_ERRORS: {str(i): "fit did not converge" for i in failed if start <= i < stop}}
        stop, bad = run.ledger.check(start, stop - start, meta)
        out.write(start, stop, {n: a[start:stop] for n, a in arrays.items()}, bad)
        run.ledger.mark_result(start, stop, bad, meta)
        start = stop
    run.status, run.end_time = "complete", "2026-11-22T10:00:00+01:00"


# ------------------------------------------------------------------ NeXus


@pytest.mark.parametrize("kind", ["raster", "snake", "line"])
def test_nexus_file_holds_the_maps_and_the_metadata(tmp_path, kind) -> None:
    rows, cols = 6, 9
    doc = document("nx-1", kind, rows, cols)
    run = new_run(tmp_path, doc)
    n = rows * cols
    rng = np.random.default_rng(7)
    arrays = {"i0": rng.normal(1e5, 300, n), "Fe-K": rng.poisson(40, n).astype(np.uint32),
              "pattern": rng.random((n, 50)).astype(np.float32), "flag": rng.random(n) > 0.5}
    out = NexusFile(run, NexusSettings(chunk_bytes=4096))
    assert out.claim.part.exists() and not out.claim.final.exists()
    drive(out, run, arrays, [4, 13, 1, 20], failed={10, 31}, gaps={17})
    [(path, digest)] = out.finish()
    assert path == tmp_path / "processed" / "nx-1" / f"nx-1_{PIPE}.nxs" and not out.claim.part.exists()
    assert read_checksums(path.parent)[path.name] == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not path.with_name(path.name + ".lock").exists()

    with h5py.File(path, "r") as f:
        assert f.attrs["NX_class"] == "NXroot" and f.attrs["default"] == "entry"
        entry = f["entry"]
        assert entry.attrs["NX_class"] == "NXentry" and entry.attrs["default"] in entry
        assert json.loads(entry["scan_document/data"][()]) == doc
        assert entry["entry_identifier"][()].decode() == "nx-1"
        assert entry["experiment_identifier"][()].decode() == doc["beamtime"]["id"]
        assert entry["scan/command"][()].decode() == doc["scan"]["command"]
        assert entry["scan/number"][()] == 42
        assert entry["sample"].attrs["NX_class"] == "NXsample"
        assert entry["sample/name"][()].decode() == "cell-7" and entry["sample/temperature_K"][()] == 295.5
        assert entry["instrument/monochromator/energy"][()] == 17.5
        assert entry["instrument/monochromator/energy"].attrs["units"] == "keV"
        assert entry["instrument/devices/ring/current_mA"][()] == 99.7
        for detector in doc["acquisition"]["detectors"]:
            assert entry[f"instrument/{detector}"].attrs["NX_class"] == "NXdetector"
            assert entry[f"instrument/{detector}/count_time"][()] == 0.01
        process = entry["process"]
        assert process.attrs["NX_class"] == "NXprocess"
        assert process["processor"][()].decode() == doc["analysis"][PIPE]["processor"]
        assert json.loads(process["settings/data"][()]) == doc["analysis"][PIPE]["settings"]
        assert (process["points_expected"][()], process["points_received"][()], process["points_missing"][()],
                process["points_failed"][()], process["points_gaps"][()]) == (n, n - 1, 1, 2, 1)
        assert process["status"][()].decode() == "complete"
        states = np.full(n, RECEIVED)
        states[[10, 31]], states[17] = FAILED, GAP
        np.testing.assert_array_equal(process["point_status"][()], map_by_hand(kind, states, rows, cols))
        missing = np.zeros(n, bool)
        missing[[10, 17, 31]] = True
        for name, values in arrays.items():
            group = entry[name.replace("/", "_")]
            ds = group[group.attrs["signal"]]
            assert group.attrs["NX_class"] == "NXdata"
            stored = values.astype(np.uint8) if values.dtype == bool else values
            assert ds.dtype == stored.dtype, name  # the processor's dtype is kept
            expect = stored.copy()
            if expect.dtype.kind == "f":
                expect[missing] = np.nan
            else:
                expect[17] = 0  # a gap holds the fill value; a failed integer point keeps what was sent
            np.testing.assert_array_equal(ds[()], map_by_hand(kind, expect, rows, cols), err_msg=name)
            assert BITSHUFFLE in ds._filters, ds._filters
            axes = list(group.attrs["axes"])
            if kind == "line":
                assert axes[0] == "samx" and group.attrs["samx_indices"] == 0
                np.testing.assert_allclose(group["samx"][()], np.linspace(1.0, 2.0, n))
            else:
                assert axes[:2] == ["samy", "samx"]
                assert (group.attrs["samy_indices"], group.attrs["samx_indices"]) == (0, 1)
                np.testing.assert_allclose(group["samx"][()], np.linspace(-3, 3, cols))
                assert group["samx"].attrs["units"] == "um"
            assert axes[len(run.meta.map_shape):] == ["."] * (ds.ndim - len(run.meta.map_shape))


def test_nexus_frames_are_one_chunk_per_point_and_exact(tmp_path) -> None:
    run = new_run(tmp_path, document("nx-frames", "snake", 3, 4))
    frames = np.random.default_rng(3).poisson(5, (12, 64, 48)).astype(np.uint32)
    out = NexusFile(run, NexusSettings(chunk_bytes=8192))
    drive(out, run, {"eiger": frames}, [5])
    [(path, _)] = out.finish()
    with h5py.File(path) as f:
        ds = f["entry/eiger/eiger"]
        assert ds.shape == (3, 4, 64, 48) and ds.chunks == (1, 1, 64, 48)
        np.testing.assert_array_equal(ds[()], map_by_hand("snake", frames, 3, 4))


@pytest.mark.parametrize("codec", ["bslz4", "lz4"])
def test_nexus_stores_compressed_frames_as_they_came_one_chunk_each(tmp_path, codec) -> None:
    """Frames kept compressed go in by direct chunk write: each stored chunk is
    the detector's bytes, the HDF5 filter (hdf5plugin) reads them back as the
    frames, snake rows in place, and a failed point's cell keeps the fill."""
    import hdf5plugin  # noqa: F401  (the filters, for reading)

    from services.compression import CompressedFrames

    run = new_run(tmp_path, document(f"nx-direct-{codec}", "snake", 3, 4))
    frames = np.random.default_rng(4).poisson(3, (12, 40, 24)).astype("<u2")
    packed = CompressedFrames.compress(frames, codec)
    out = NexusFile(run, NexusSettings(chunk_bytes=8192))
    drive(out, run, {"eiger": packed}, [5], failed={6})
    [(path, _)] = out.finish()
    want = map_by_hand("snake", frames, 3, 4)
    with h5py.File(path) as f:
        ds = f["entry/eiger/eiger"]
        assert ds.shape == (3, 4, 40, 24) and ds.chunks == (1, 1, 40, 24) and ds.dtype == np.uint16
        assert ds._filters and next(iter(ds._filters)) == {"bslz4": BITSHUFFLE, "lz4": "32004"}[codec]
        got = ds[()]
        row, col = 1, 1  # index 6: the second row runs backwards, so its cell is (1, 4 - 1 - 2)
        assert (got[row, col] == 0).all(), "the failed point's frame is left out"
        want[row, col] = 0
        np.testing.assert_array_equal(got, want)
        # stored byte for byte: the chunk of index 0 (cell 0, 0) is the detector's chunk 0
        _, chunk = ds.id.read_direct_chunk((0, 0, 0, 0))
        assert bytes(chunk) == bytes(packed.chunk(0))


def test_nexus_refuses_a_changed_point_shape_and_an_out_of_range_chunk(tmp_path) -> None:
    run = new_run(tmp_path, document("nx-bad"))
    out = NexusFile(run, NexusSettings())
    out.write(0, 2, {"spec": np.ones((2, 8))}, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="per-point shape"):
        out.write(2, 4, {"spec": np.ones((2, 9))}, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="outside"):
        run.ledger.check(30, 10)
    out.abandon()
    assert out.claim.part.exists() and not out.claim.final.exists()


# ------------------------------------------------------------------ FIO


@pytest.mark.parametrize("kind", ["snake", "line"])
def test_fio_reads_back_the_same_numbers(tmp_path, kind) -> None:
    rows, cols = 4, 6
    doc = document("fio-1", kind, rows, cols)
    run = new_run(tmp_path, doc)
    n = rows * cols
    rng = np.random.default_rng(11)
    arrays = {"i0": rng.normal(1e5, 300, n), "ratio": rng.random(n).astype(np.float32),
              "counts": rng.integers(0, 2**40, n), "spectrum": rng.random((n, 16))}
    out = FioFile(run)
    drive(out, run, arrays, [5, 2], failed={3}, gaps={8, 9})
    [(path, digest)] = out.finish()
    assert path.suffix == ".fio" and read_checksums(path.parent)[path.name] == digest
    text = path.read_text()
    assert text.startswith("!\n! Comments\n!\n%c\n") and "\n%p\n" in text and "\n%d\n" in text
    fio = read_fio(path)
    assert fio.comments[0] == doc["scan"]["command"]
    assert fio.parameters["scan_number"] == "42" and fio.parameters["acquisition/energy_keV"] == "17.5"
    assert fio.parameters["ring/current_mA"] == "99.7" and fio.parameters["sample/name"] == "cell-7"
    motors = ["samx"] if kind == "line" else ["samx", "samy"]
    assert fio.columns == [*motors, "i0", "ratio", "counts"]  # the spectrum is not a counter
    assert fio.data.shape == (n, len(fio.columns))
    if kind == "line":
        np.testing.assert_array_equal(fio.data[:, 0], np.linspace(1.0, 2.0, n))
    else:  # motors as they moved: snake rows run back
        fast = np.linspace(-3, 3, cols)
        expect_x = [fast[c] if (i // cols) % 2 == 0 else fast[cols - 1 - c] for i, c in
                    ((i, i % cols) for i in range(n))]
        np.testing.assert_array_equal(fio.data[:, 0], expect_x)
        np.testing.assert_array_equal(fio.data[:, 1], np.repeat(np.linspace(10, 12, rows), cols))
    for k, name in enumerate(["i0", "ratio", "counts"], len(motors)):
        expect = arrays[name].astype(np.float64)
        expect[[3, 8, 9]] = np.nan
        np.testing.assert_array_equal(fio.data[:, k], expect, err_msg=name)
    # an independent reader: numpy on the rows after the column lines
    data_lines = text.split("\n%d\n")[1].splitlines()[len(fio.columns):]
    np.testing.assert_array_equal(np.loadtxt(data_lines), fio.data)


# ------------------------------------------------------------------ images


def test_images_decode_at_the_configured_size(tmp_path) -> None:
    rows, cols = 8, 10
    run = new_run(tmp_path, document("img-1", "raster", rows, cols))
    n = rows * cols
    rng = np.random.default_rng(5)
    arrays = {"Fe-K": rng.random(n), "xrd/pattern": rng.random((n, 300)), "frame": rng.random((n, 20, 30))}
    out = ImageFiles(run, ImageSettings(width=640, height=480))
    drive(out, run, arrays, [7], failed={4})
    written = out.finish()
    names = sorted(p.name for p, _ in written)
    assert names == sorted(f"img-1_{PIPE}_{s}.png" for s in ("Fe-K", "xrd_pattern", "frame"))
    sums = read_checksums(tmp_path / "processed" / "img-1")
    for path, digest in written:
        image = imread(path)
        assert image.shape == (480, 640, 4), path.name
        assert image[..., :3].std() > 0.05, f"{path.name} is blank"
        assert sums[path.name] == digest
    summed = out.products["xrd/pattern"]
    assert summed.count == n - 1
    np.testing.assert_allclose(summed.values, np.delete(arrays["xrd/pattern"], 4, axis=0).sum(axis=0))
    expect = arrays["Fe-K"].copy()
    expect[4] = np.nan
    np.testing.assert_array_equal(out.products["Fe-K"].values, map_by_hand("raster", expect, rows, cols))


def test_images_are_refreshed_during_a_scan_when_asked(tmp_path) -> None:
    run = new_run(tmp_path, document("img-2"))
    out = ImageFiles(run, ImageSettings(interval_seconds=0.01))
    out.write(0, 10, {"i0": np.arange(10.0)}, np.zeros(0, np.int64))
    out.tick(time.monotonic() + 1)
    interim = out.path("i0")
    assert imread(interim).shape == (600, 800, 4)
    assert interim.name not in read_checksums(interim.parent)  # only final images get a checksum
    out.abandon()


# ------------------------------------------------------------------ paths and claims


@pytest.mark.parametrize("processed, why", [
    ("../elsewhere", "contains '..'"),
    ("processed/../../etc", "contains '..'"),
    ("/etc/cron.d", "absolute"),
])
def test_paths_from_the_wire_cannot_leave_the_beamtime_root(tmp_path, processed, why) -> None:
    doc = document("bad-path")
    doc["beamtime"]["paths"]["processed"] = processed
    meta = parse_scan(doc, allow_absolute=True) if processed.startswith("/") else None
    if meta is None:
        with pytest.raises(ValueError, match=why):
            parse_scan(doc)  # the master refuses it too
        meta = parse_scan(document("bad-path"))
        meta.raw["beamtime"]["paths"]["processed"] = processed  # as if a bad document got past the master
    with pytest.raises(WriterError, match=why):
        OutputLayout(tmp_path).stem(meta, PIPE)


def test_a_symlink_out_of_the_root_is_refused(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "processed").symlink_to(outside)
    meta = parse_scan(document("link"))
    with pytest.raises(WriterError, match="outside the beamtime root"):
        OutputLayout(root).stem(meta, PIPE)


@pytest.mark.parametrize("template, why", [("{processed}/{nope}", "unknown fields"),
                                           ("{processed}/fixed", "must contain {scan}"),
                                           ("{processed/{scan}", "PathTemplate")])
def test_bad_templates_and_roots_are_refused(tmp_path, template, why) -> None:
    with pytest.raises(ValueError, match=why):
        OutputLayout(tmp_path, template)
    with pytest.raises(ValueError, match="absolute"):
        OutputLayout(tmp_path.relative_to(tmp_path.parent))
    with pytest.raises(ValueError, match="not a directory"):
        OutputLayout(tmp_path / "missing")


def test_one_writer_per_file_and_finished_files_are_never_overwritten(tmp_path) -> None:
    final = tmp_path / "scan" / "a.nxs"
    first = FileClaim(final, {"owner": "test/writer/one"})
    with pytest.raises(WriterError, match="being written by .*test/writer/one"):
        FileClaim(final, {"owner": "test/writer/two"})
    first.part.write_bytes(b"complete")
    first.publish()
    assert final.read_bytes() == b"complete"
    with pytest.raises(WriterError, match="exists already"):
        FileClaim(final, {"owner": "test/writer/two"})
    # a part file left by a killed writer is kept aside, not overwritten or published
    other = tmp_path / "scan" / "b.nxs"
    other.with_name("b.nxs.part").write_bytes(b"half")
    claim = FileClaim(other, {"owner": "test/writer/two"})
    kept = [p for p in other.parent.iterdir() if p.name.startswith("b.nxs.part.crashed-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"half" and claim.part.stat().st_size == 0  # a fresh part
    claim.release()


# ------------------------------------------------------------------ component on real sockets


def test_component_writes_refuses_bad_scans_and_goes_on(tmp_path) -> None:
    written: list[str] = []
    settings = NexusSettings()
    component = WriterComponent("test/writer/c", "", "127.0.0.1", "127.0.0.1", OutputLayout(tmp_path), "nexus",
                                lambda run: NexusFile(run, settings), WriterConfig(stale_seconds=1.0),
                                on_file=written.append)
    component.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 1000
    push.connect(component.endpoints[protocol.DATA_IN])
    try:
        bad = document("evil")
        bad["beamtime"]["paths"]["processed"] = "../../etc"
        codec.send(push, codec.Message(codec.SCAN_START, scan="evil", stream=PIPE, meta={protocol.META_SCAN: bad}))
        codec.send(push, codec.Message(codec.RESULT, scan="evil", stream=PIPE, index=0, count=2,
                                       arrays={"i0": np.ones(2)}))
        good = document("good")
        codec.send(push, codec.Message(codec.SCAN_START, scan="good", stream=PIPE, meta={protocol.META_SCAN: good}))
        values = np.arange(35.0)
        for start in range(0, 35, 10):
            codec.send(push, codec.Message(codec.RESULT, scan="good", stream=PIPE, index=start,
                                           count=min(10, 35 - start), arrays={"i0": values[start:start + 10]}))
        codec.send(push, codec.Message(codec.RESULT, scan="good", stream=PIPE, index=30, count=10,
                                       arrays={"i0": np.ones(10)}))  # beyond the scan: refused, file kept
        codec.send(push, codec.Message(codec.SCAN_END, scan="good", stream=PIPE, meta={"points": 35}))
        # a scan whose end never comes is finished as abandoned after StaleScanSeconds
        codec.send(push, codec.Message(codec.SCAN_START, scan="lost", stream=PIPE,
                                       meta={protocol.META_SCAN: document("lost")}))
        codec.send(push, codec.Message(codec.RESULT, scan="lost", stream=PIPE, index=0, count=3,
                                       arrays={"i0": np.ones(3)}))
        deadline = time.monotonic() + 10
        while len(written) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        push.close()
        component.stop()
    assert [os.path.basename(p) for p in written] == [f"good_{PIPE}.nxs", f"lost_{PIPE}.nxs"]
    assert component.counters.errors == 2 and component.skipped == 1
    assert "points [30, 40) outside the scan's 35" in component.counters.last_error
    assert "contains '..'" in component.refused[("evil", PIPE)]
    with h5py.File(written[0]) as f:
        np.testing.assert_array_equal(f["entry/i0/i0"][()], values.reshape(5, 7))
    with h5py.File(written[1]) as f:
        assert f["entry/process/status"][()].decode() == "abandoned"
        assert f["entry/process/points_received"][()] == 3
    files = component.list_files(0)
    assert [f["status"] for f in files] == ["complete", "abandoned"] and all(len(f["sha256"]) == 64 for f in files)
    assert not list(tmp_path.parent.glob("etc*")) and not (tmp_path / "etc").exists()


# ------------------------------------------------------------------ how a scan ended: one rule


def test_end_status_is_complete_only_when_every_point_was_delivered() -> None:
    ledger = PointLedger.for_points(10)
    ledger.mark_result(0, 6, np.array([2]))
    assert ledger.end_status({"points": 10}) == "incomplete"  # 6..9 never came
    assert ledger.end_status({"points": 6}) == "complete"  # an EndScan cut the scan at 6: all of it came
    assert ledger.end_status({}) == "complete"  # no count from the sorter: judged up to the last point delivered
    ledger.mark_gap(6, 4)
    assert ledger.end_status({"points": 10}) == "complete"  # gaps and failures are declared: delivered
    assert ledger.end_status({"points": 10}, aborted=True) == "aborted"
    assert ledger.end_status({"points": "10"}) == "complete" and ledger.end_status({"points": 99}) == "complete"


def run_writer(tmp_path, file_format: str, open_file, messages: list[codec.Message], files: int) -> WriterComponent:
    written: list[str] = []
    component = WriterComponent("test/writer/status", "", "127.0.0.1", "127.0.0.1", OutputLayout(tmp_path),
                                file_format, open_file, WriterConfig(), on_file=written.append)
    component.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 1000
    push.connect(component.endpoints[protocol.DATA_IN])
    try:
        for msg in messages:
            codec.send(push, msg)
        deadline = time.monotonic() + 10
        while len(written) < files and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        push.close()
        component.stop()
    return component


def status_scans() -> list[codec.Message]:
    """Four scans of 35 points as a sorter delivers them: whole; ended with 15
    points never delivered; aborted (its master died) after 10; and one whose
    sorter restarted, so [15, 20) comes twice around a re-sent scan_start."""
    values = np.arange(35.0)

    def start(scan: str, **meta) -> codec.Message:
        return codec.Message(codec.SCAN_START, scan=scan, stream=PIPE,
                             meta={protocol.META_SCAN: document(scan), **meta})

    def result(scan: str, index: int, stop: int) -> codec.Message:
        return codec.Message(codec.RESULT, scan=scan, stream=PIPE, index=index, count=stop - index,
                             arrays={"i0": values[index:stop]})

    def end(scan: str) -> codec.Message:
        return codec.Message(codec.SCAN_END, scan=scan, stream=PIPE, meta={"points": 35})

    return [start("whole"), result("whole", 0, 35), end("whole"),
            start("short"), result("short", 0, 20), end("short"),
            start("cut"), result("cut", 0, 10),
            codec.Message(codec.SCAN_ABORT, scan="cut", stream=PIPE, meta={"reason": "master gone", "delivered": 10}),
            start("resumed"), result("resumed", 0, 20), start("resumed", resume_from=15),
            result("resumed", 15, 35), end("resumed")]


def test_nexus_status_follows_the_rule_with_the_counts(tmp_path) -> None:
    settings = NexusSettings()
    component = run_writer(tmp_path, "nexus", lambda run: NexusFile(run, settings), status_scans(), 4)
    assert component.counters.errors == 0, component.counters.last_error
    files = {f["scan"]: f for f in component.list_files(0)}
    assert {s: f["status"] for s, f in files.items()} == {
        "whole": "complete", "short": "incomplete", "cut": "aborted", "resumed": "complete"}
    expected = {"whole": (35, 0, 0), "short": (20, 15, 0), "cut": (10, 25, 0), "resumed": (35, 0, 5)}
    for scan, (received, missing, duplicates) in expected.items():
        with h5py.File(files[scan]["path"]) as f:
            process = f["entry/process"]
            assert process["status"][()].decode() == files[scan]["status"]
            assert (process["points_received"][()], process["points_missing"][()],
                    process["points_duplicates"][()]) == (received, missing, duplicates), scan
            if scan == "resumed":  # delivered twice across the restart: counted, never shifted
                np.testing.assert_array_equal(f["entry/i0/i0"][()], np.arange(35.0).reshape(5, 7))
            if scan == "cut":
                assert json.loads(process["summary/data"][()])["reason"] == "master gone"
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.lock"))


def test_fio_ends_with_the_status_the_counts_and_the_reason(tmp_path) -> None:
    component = run_writer(tmp_path, "fio", FioFile, status_scans(), 4)
    assert component.counters.errors == 0, component.counters.last_error
    files = {f["scan"]: f for f in component.list_files(0)}
    assert {s: f["status"] for s, f in files.items()} == {
        "whole": "complete", "short": "incomplete", "cut": "aborted", "resumed": "complete"}
    status = {scan: read_fio(f["path"]).comments[3].rstrip() for scan, f in files.items()}
    assert all(status[scan].startswith(f"status {f['status']} points=35 ") for scan, f in files.items()), status
    assert status["cut"] == ("status aborted points=35 received=10 failed=0 gaps=0 missing=25 duplicates=0 "
                             "reason master gone")
    assert status["short"].endswith("received=20 failed=0 gaps=0 missing=15 duplicates=0")
    assert status["resumed"].endswith("received=35 failed=0 gaps=0 missing=0 duplicates=5")
    assert read_fio(files["cut"]["path"]).data.shape[0] == 10  # the rows delivered, no more
    resumed = read_fio(files["resumed"]["path"])
    np.testing.assert_array_equal(resumed.data[:, -1], np.arange(35.0))  # twice delivered, once written
