#!/usr/bin/env python
"""Benchmark of the Sink: ingest rate and query latency.

Ingest: a sender process plays the sorter and pushes pre-encoded result chunks
(scan_start, results, scan_end) to a ``SinkComponent`` in this process (real
sockets, real store, real viewer thread publishing to Lavue at 5 Hz; the thin
Tango layer is not on the data path). Timed from the first chunk sent to the
store holding every point. The baseline, in the same run, is a bare PULL
socket draining the same frames (receive only: no decode, no placement).

Cases: small results (7 float64 scalars per point, like the ``counters``
processor) and 16 KB spectra (4096 uint32 channels per point), in chunks of 1
point (the worst case) and of the sizes the sorter makes under load.

Query latency: ``get`` of a whole 1000 x 1000 float32 map and of a 100-row
slice through ``SinkClient`` over loopback, p50/p99 of many requests.

    python benchmarks/bench_sink.py            # ~30 s, rich tables
    python benchmarks/bench_sink.py --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from services import protocol  # noqa: E402
from services import codec  # noqa: E402
from services.ops import simulate
from sink.component import SinkComponent, SinkConfig  # noqa: E402
from sink.queries import SinkClient  # noqa: E402

PIPE = "bench"
COUNTERS = ("i0", "i1", "diode", "sum", "i1_norm", "diode_norm", "sum_norm")


def scan_doc(scan_id: str, points: int, cols: int = 100) -> dict[str, Any]:
    geometry = {"type": "raster", "snake": True, "axes": [
        {"name": "samx", "units": "um", "start": 0.0, "stop": cols - 1.0, "points": cols},
        {"name": "samy", "units": "um", "start": 0.0, "stop": points // cols - 1.0, "points": points // cols}]}
    return simulate.scan_document(scan_id, 1, points, PIPE, simulate.PROFILES["counters"], geometry=geometry)


def chunks(case: str, scan_id: str, points: int, per_chunk: int) -> list[list[bytes]]:
    """The whole scan as the sorter would send it, encoded once."""
    frames = [codec.encode(codec.Message(codec.SCAN_START, scan=scan_id, stream=PIPE,
                                         meta={protocol.META_SCAN: scan_doc(scan_id, points)}))]
    rng = np.random.default_rng(0)
    if case == "small":
        block = {n: rng.random(per_chunk) for n in COUNTERS}
    else:
        block = {"mca": rng.integers(0, 1000, (per_chunk, 4096)).astype("<u4"), "i0": rng.random(per_chunk)}
    for start in range(0, points, per_chunk):
        msg = codec.Message(codec.RESULT, scan=scan_id, stream=PIPE, index=start, count=per_chunk, arrays=block)
        frames.append([bytes(f) for f in codec.encode(msg)])
    frames.append(codec.encode(codec.Message(codec.SCAN_END, scan=scan_id, stream=PIPE, meta={"delivered": points})))
    return [[bytes(f) for f in fs] for fs in frames]


def sender(endpoint: str, frames: list[list[bytes]], go: Any) -> None:
    context = zmq.Context()  # not the parent's: contexts do not survive a fork
    sock = context.socket(zmq.PUSH)
    sock.connect(endpoint)
    go.wait()
    for fs in frames:
        sock.send_multipart(fs, copy=False)
    sock.close(linger=-1)
    context.term()


def run_sender(endpoint: str, frames: list[list[bytes]]) -> tuple[mp.Process, Any]:
    go = mp.get_context("fork").Event()
    proc = mp.get_context("fork").Process(target=sender, args=(endpoint, frames, go), daemon=True)
    proc.start()
    time.sleep(0.3)  # connected
    return proc, go


def ingest(case: str, points: int, per_chunk: int) -> dict[str, Any]:
    sink = SinkComponent("bench/sink/1", "", "127.0.0.1", "127.0.0.1", SinkConfig(budget_bytes=4 * 2**30))
    sink.start()
    scan_id = f"{case}-{per_chunk}"
    frames = chunks(case, scan_id, points, per_chunk)
    proc, go = run_sender(sink.inlet.endpoint, frames)
    t0 = time.perf_counter()
    go.set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with sink.store.lock:
            entry = sink.store.scans.get(scan_id)
            if entry is not None and entry.status == "complete":
                break
        time.sleep(0.0005)
    wall = time.perf_counter() - t0
    proc.join()
    info = sink.store.info(scan_id)
    assert info["received"] == points and sink.counters.errors == 0, (info["received"], sink.counters.last_error)
    sink.stop()
    baseline = raw_pull(frames)
    return {"case": case, "points_per_chunk": per_chunk, "points": points, "results_per_s": points / wall,
            "MB_per_s": sum(len(f) for fs in frames for f in fs) / wall / 1e6,
            "raw_pull_results_per_s": points / baseline, "ratio": baseline / wall}


def raw_pull(frames: list[list[bytes]]) -> float:
    sock = zmq.Context.instance().socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc, go = run_sender(f"tcp://127.0.0.1:{port}", frames)
    t0 = time.perf_counter()
    go.set()
    for _ in frames:
        sock.recv_multipart(copy=False)
    wall = time.perf_counter() - t0
    proc.join()
    sock.close(0)
    return wall


def query_latency(requests: int) -> list[dict[str, Any]]:
    sink = SinkComponent("bench/sink/2", "", "127.0.0.1", "127.0.0.1", SinkConfig(budget_bytes=2**30))
    sink.start()
    points = 1_000_000
    meta = codec.Message(codec.SCAN_START, scan="map", stream=PIPE, meta={protocol.META_SCAN: scan_doc("map", points, 1000)})
    sink._ingest(codec.decode(codec.encode(meta)))
    values = np.random.default_rng(1).random(points, dtype=np.float32)
    sink.store.add_result("map", PIPE, 0, points, {"fe": values})
    client = SinkClient(sink.queries.endpoint)
    out = []
    for label, kwargs in (("1000x1000 float32 map", {}), ("100-row slice", {"rows": (400, 500)})):
        times = []
        for _ in range(requests):
            t0 = time.perf_counter()
            data = client.get("map", f"{PIPE}/fe", **kwargs)
            times.append(time.perf_counter() - t0)
        expected_rows = kwargs.get("rows", (0, 1000))
        assert data.shape == (expected_rows[1] - expected_rows[0], 1000) and data.dtype == np.float32
        t = np.array(times) * 1e3
        out.append({"query": label, "bytes": data.nbytes, "p50_ms": float(np.percentile(t, 50)),
                    "p99_ms": float(np.percentile(t, 99)), "max_ms": float(t.max())})
    client.close()
    sink.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    cases = [("small", 20_000, 1), ("small", 200_000, 100), ("small", 1_000_000, 1000),
             ("spectra", 10_000, 1), ("spectra", 20_000, 20), ("spectra", 20_000, 200)]
    results = {"machine": {"python": platform.python_version(), "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__},
               "ingest": [ingest(*c) for c in cases], "queries": query_latency(args.requests)}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Sink ingest (sender process -> SinkComponent, loopback)")
    for col in ("case", "points/chunk", "results/s", "MB/s", "raw PULL results/s", "ratio"):
        table.add_column(col, justify="right")
    for r in results["ingest"]:
        table.add_row(r["case"], str(r["points_per_chunk"]), f"{r['results_per_s']:,.0f}", f"{r['MB_per_s']:,.0f}",
                      f"{r['raw_pull_results_per_s']:,.0f}", f"{r['ratio']:.2f}")
    Console().print(table)
    table = Table(title=f"Sink query latency ({args.requests} requests each)")
    for col in ("query", "bytes", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    for r in results["queries"]:
        table.add_row(r["query"], f"{r['bytes']:,}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
