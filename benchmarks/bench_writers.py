#!/usr/bin/env python
"""Benchmark of the NexusWriter: MB/s written with Bitshuffle/LZ4 compression.

Writer: the decoded sorter messages (scan_start, results, scan_end) handed
one by one to the inlet handler of a ``WriterComponent`` with the NeXus
format, as its inlet thread does. Timed until the file is final: metadata
tree, data, flushed, fsync'ed, renamed and its SHA-256 recorded.

End to end: a sender process plays the sorter and pushes the pre-encoded
messages over loopback TCP to the running component (real sockets and inlet
thread; the thin Tango layer is not on the data path). On this 2-core machine
the sender and ZeroMQ's I/O thread compete with the compression for the CPU.

Baseline, in the same run: plain ``h5py`` writing the same blocks into one
dataset of the same shape, chunks and filter, in one loop, then closing the
file (no fsync, no checksum, no metadata, no sockets). Each figure is the
median of ``--repeat`` runs.

Cases: 4 MiB frames (1024 x 1024 uint32, sparse photon counts like an Eiger
frame) one per message, and 16 KiB spectra (4096 uint32 channels) 100 per
message. MB/s counts the uncompressed bytes.

    python benchmarks/bench_writers.py            # ~1 min, rich table
    python benchmarks/bench_writers.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from bench_sink import run_sender  # noqa: E402
from services import protocol  # noqa: E402
from services import codec  # noqa: E402
from services.ops import simulate
from writers.component import WriterComponent, WriterConfig  # noqa: E402
from writers.layout import OutputLayout  # noqa: E402
from writers.nexus import NexusFile, NexusSettings, chunk_shape  # noqa: E402

PIPE = "bench"
DISTINCT = 8  # distinct blocks cycled through: realistic content without minutes of random numbers


def scan_doc(scan_id: str, points: int, cols: int) -> dict[str, Any]:
    geometry = {"type": "raster", "snake": False, "axes": [
        {"name": "samx", "units": "um", "start": 0.0, "stop": cols - 1.0, "points": cols},
        {"name": "samy", "units": "um", "start": 0.0, "stop": points // cols - 1.0, "points": points // cols}]}
    return simulate.scan_document(scan_id, 1, points, PIPE, simulate.PROFILES["counters"], geometry=geometry)


def blocks(case: str, per_message: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if case == "frames":  # a few hundred photons per frame on a dark background, and a bright ring
        y, x = np.mgrid[:1024, :1024]
        ring = np.exp(-((np.hypot(y - 512, x - 512) - 300) / 4) ** 2) * 20
        return [rng.poisson(ring + 0.02, (per_message, 1024, 1024)).astype("<u4") for _ in range(DISTINCT)]
    channels = np.arange(4096)
    shape = 50 * np.exp(-((channels - 1600) / 12) ** 2) + 30 * np.exp(-((channels - 3200) / 15) ** 2) + 2
    return [rng.poisson(shape, (per_message, 4096)).astype("<u4") for _ in range(DISTINCT)]


def messages(scan_id: str, points: int, cols: int, per_message: int, data: list[np.ndarray]) -> list[list[bytes]]:
    out = [codec.encode(codec.Message(codec.SCAN_START, scan=scan_id, stream=PIPE,
                                      meta={protocol.META_SCAN: scan_doc(scan_id, points, cols)}))]
    for k, start in enumerate(range(0, points, per_message)):
        msg = codec.Message(codec.RESULT, scan=scan_id, stream=PIPE, index=start, count=per_message,
                            arrays={"data": data[k % DISTINCT]})
        out.append(codec.encode(msg))
    out.append(codec.encode(codec.Message(codec.SCAN_END, scan=scan_id, stream=PIPE, meta={"points": points})))
    return [[bytes(f) for f in fs] for fs in out]


def new_writer(root: Path) -> WriterComponent:
    settings = NexusSettings()
    return WriterComponent("bench/writer/nexus", "", "127.0.0.1", "127.0.0.1", OutputLayout(root), "nexus",
                           lambda run: NexusFile(run, settings), WriterConfig())


def writer_alone(root: Path, frames: list[list[bytes]]) -> tuple[float, Path]:
    writer = new_writer(root)
    decoded = [codec.decode(fs) for fs in frames]
    t0 = time.perf_counter()
    for msg in decoded:
        writer.inlet.handler(msg)
    wall = time.perf_counter() - t0
    writer.stop()
    assert writer.files_written == 1 and writer.counters.errors == 0, writer.counters.last_error
    return wall, Path(writer.last_file)


def end_to_end(root: Path, frames: list[list[bytes]]) -> tuple[float, Path]:
    writer = new_writer(root)
    writer.start()
    proc, go = run_sender(writer.inlet.endpoint, frames)
    t0 = time.perf_counter()
    go.set()
    deadline = time.monotonic() + 600
    while writer.files_written < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    wall = time.perf_counter() - t0
    proc.join()
    writer.stop()
    assert writer.files_written == 1 and writer.counters.errors == 0, writer.counters.last_error
    return wall, Path(writer.last_file)


def plain_h5py(root: Path, case: str, points: int, cols: int, per_message: int, data: list[np.ndarray]) -> float:
    settings = NexusSettings()
    point_shape = data[0].shape[1:]
    map_shape = (points // cols, cols)
    path = root / f"{case}-plain.h5"
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("data", shape=(*map_shape, *point_shape), dtype=data[0].dtype,
                              chunks=chunk_shape(map_shape, point_shape, data[0].dtype.itemsize, settings.chunk_bytes),
                              **settings.filter_args(data[0].dtype))
        flat = ds  # rows of the map are filled in order, like ours
        for k, start in enumerate(range(0, points, per_message)):
            row, col = divmod(start, cols)
            flat[row, col:col + per_message] = data[k % DISTINCT]
    return time.perf_counter() - t0


def check(path: Path, points: int, cols: int, per_message: int, data: list[np.ndarray]) -> int:
    """What was written is what was sent; the file's size."""
    with h5py.File(path) as f:
        ds = f["entry/data/data"]
        assert ds.shape[:2] == (points // cols, cols)
        np.testing.assert_array_equal(ds[0, :per_message], data[0])
        last = (points // per_message - 1) % DISTINCT
        np.testing.assert_array_equal(ds[-1, cols - per_message:], data[last])
    return path.stat().st_size


def run_case(case: str, points: int, cols: int, per_message: int, repeat: int) -> dict[str, Any]:
    data = blocks(case, per_message)
    times: dict[str, list[float]] = {"baseline": [], "writer": [], "end_to_end": []}
    with tempfile.TemporaryDirectory(dir=Path.home() if Path.home().exists() else None) as tmp:
        root = Path(tmp)
        for k in range(repeat):
            os.sync()  # every run starts without the previous one's dirty pages to write back
            times["baseline"].append(plain_h5py(root, f"{case}-{k}", points, cols, per_message, data))
            for label, run in (("writer", writer_alone), ("end_to_end", end_to_end)):
                frames = messages(f"{case}-{label}-{k}", points, cols, per_message, data)
                os.sync()
                wall, path = run(root, frames)
                times[label].append(wall)
                size = check(path, points, cols, per_message, data)
    nbytes = points * data[0][0].nbytes
    median = {label: float(np.median(t)) for label, t in times.items()}
    return {"case": case, "points": points, "point_bytes": int(data[0][0].nbytes), "points_per_message": per_message,
            "MB": nbytes / 1e6, "compressed_MB": size / 1e6,
            **{f"{label}_MB_per_s": nbytes / t / 1e6 for label, t in median.items()},
            "writer_ratio": median["baseline"] / median["writer"],
            "end_to_end_ratio": median["baseline"] / median["end_to_end"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--spectra", type=int, default=40_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cases = [("frames", args.frames, 20, 1, args.repeat), ("spectra", args.spectra, 200, 100, args.repeat)]
    results = {"machine": {"python": platform.python_version(), "h5py": h5py.version.version,
                           "hdf5": h5py.version.hdf5_version, "zmq": zmq.zmq_version()},
               "cases": [run_case(*c) for c in cases]}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="NexusWriter vs plain h5py (Bitshuffle/LZ4, same chunks), uncompressed MB/s, medians")
    for col in ("case", "points", "MB", "on disk MB", "plain h5py", "writer", "ratio", "end to end", "ratio"):
        table.add_column(col, justify="right")
    for r in results["cases"]:
        table.add_row(f"{r['case']} {r['point_bytes'] // 1024} KiB", f"{r['points']:,}", f"{r['MB']:,.0f}",
                      f"{r['compressed_MB']:,.0f}", f"{r['baseline_MB_per_s']:,.0f}", f"{r['writer_MB_per_s']:,.0f}",
                      f"{r['writer_ratio']:.2f}", f"{r['end_to_end_MB_per_s']:,.0f}", f"{r['end_to_end_ratio']:.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
