"""Ingest rate of the EigerIngester's component against a raw receive of the same stream.

A SIMPLON stream v1 of 4 MiB EIGER-like frames (1024 x 2048 uint16 Poisson
counts, bitshuffle-LZ4 with the 12-byte header, as a DCU sends them) is
pushed from this process, once to a bare PULL socket (the floor: ZeroMQ
alone), once through :class:`ingesters.eiger.EigerComponent` to a PULL
connected where a master would (decode, map frame numbers, block, re-send:
the ingester's whole cost). Frames stay compressed throughout; the numbers
are frames/s and compressed MB/s, side by side. Sender, ingester and
receiver share this process (and its GIL); a deployed ingester has its own.

    python benchmarks/bench_ingest.py [--frames 2000] [--block 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import report  # noqa: E402 - beside this script
from ingesters.eiger import EigerComponent, EigerConfig  # noqa: E402
from services import codec, security  # noqa: E402
from services.compression import CompressedFrames  # noqa: E402
from topology_manager.component import TopologyComponent, TopologyConfig  # noqa: E402
from topology_manager.local import LocalManagerLink  # noqa: E402

Y, X = 1024, 2048


def v1_stream(frames: int) -> list[list[bytes]]:
    rng = np.random.default_rng(1)
    image = rng.poisson(3.0, size=(Y, X)).astype("<u2")
    chunk = bytes(CompressedFrames.compress(image[None]).chunk(0))
    desc = json.dumps({"htype": "dimage_d-1.0", "shape": [X, Y], "type": "uint16", "encoding": "bs16-lz4<",
                       "size": len(chunk)}).encode()
    dconfig = json.dumps({"htype": "dconfig-1.0", "start_time": 0, "stop_time": 1, "real_time": 1}).encode()
    header = [json.dumps({"htype": "dheader-1.0", "series": 1, "header_detail": "basic"}).encode(),
              json.dumps({"nimages": frames, "ntrigger": 1, "x_pixels_in_detector": X}).encode()]
    images = [[json.dumps({"htype": "dimage-1.0", "series": 1, "frame": i, "hash": ""}).encode(), desc, chunk,
               dconfig] for i in range(frames)]
    return [header, *images, [json.dumps({"htype": "dseries_end-1.0", "series": 1}).encode()]]


def pusher(messages: list[list[bytes]]) -> tuple[zmq.Socket, str]:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def raw(messages: list[list[bytes]]) -> float:
    push, endpoint = pusher(messages)
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.connect(endpoint)
    sender = threading.Thread(target=lambda: [push.send_multipart(m, copy=False) for m in messages])
    t0 = time.perf_counter()
    sender.start()
    for _ in messages:
        pull.recv_multipart(copy=False)
    elapsed = time.perf_counter() - t0
    sender.join()
    push.close(0)
    pull.close(0)
    return elapsed


def ingested(messages: list[list[bytes]], frames: int, block: int) -> tuple[float, int]:
    push, endpoint = pusher(messages)
    topology = TopologyComponent("bench/topology/manager", TopologyConfig(lease_seconds=30, heartbeat_seconds=5))
    topology.start()
    link = LocalManagerLink(topology.registry)
    scan = [{"scan": "bench", "points": frames, "streams": ["eiger"], "started": 1.0, "ending": False,
             "first_index": {}}]
    ingester = EigerComponent("bench/eiger/ingester", EigerConfig(endpoint, "eiger", ("bench",), block), link,
                              "127.0.0.1", lambda pipeline: scan)
    ingester.start()
    pull = zmq.Context.instance().socket(zmq.PULL)  # where the master would read
    pull.connect(ingester.sources["bench"].endpoint)
    sender = threading.Thread(target=lambda: [push.send_multipart(m, copy=False) for m in messages])
    t0 = time.perf_counter()
    sender.start()
    got, blocks = 0, 0
    while True:
        msg = codec.recv(pull)
        if msg.type == codec.SCAN_END:
            break
        got += msg.count
        blocks += 1
    elapsed = time.perf_counter() - t0
    assert got == frames, (got, frames)
    sender.join()
    ingester.stop()
    topology.stop()
    push.close(0)
    pull.close(0)
    return elapsed, blocks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    security.configure(security.OFF)  # the plain PULL here plays the master: no CurveZMQ (bench_pipeline measures it)
    messages = v1_stream(args.frames)
    compressed = len(messages[1][2])
    t_raw = raw(messages)
    t_ingest, blocks = ingested(messages, args.frames, args.block)
    results = {"frames": args.frames, "frame_MiB_decoded": Y * X * 2 / 2**20, "frame_MiB_compressed":
               round(compressed / 2**20, 3), "block": args.block, "blocks_out": blocks,
               "raw_frames_per_s": round(args.frames / t_raw), "ingest_frames_per_s": round(args.frames / t_ingest),
               "raw_MB_per_s": round(args.frames * compressed / t_raw / 1e6),
               "ingest_MB_per_s": round(args.frames * compressed / t_ingest / 1e6)}

    def tables(r: dict) -> None:
        print(f"SIMPLON v1, {r['frames']} frames of {r['frame_MiB_decoded']:.0f} MiB "
              f"({r['frame_MiB_compressed']} MiB bslz4), blocks of {r['block']}")
        print(f"  raw PULL receive : {r['raw_frames_per_s']:>7} frames/s  {r['raw_MB_per_s']:>6} MB/s")
        print(f"  EigerComponent   : {r['ingest_frames_per_s']:>7} frames/s  {r['ingest_MB_per_s']:>6} MB/s "
              f"({r['blocks_out']} blocks out)")

    return report(args, results, tables)


if __name__ == "__main__":
    sys.exit(main())
