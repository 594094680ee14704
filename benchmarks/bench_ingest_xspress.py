"""Ingest rate of the XspressIngester's component against a raw SUB receive of the same stream.

The stream is the MAX IV ``xspress3-streamer``'s format: a header, per frame
a JSON image header, raw ``(4, 4096)`` uint32 spectra (Poisson counts) and
the scaler list pickled by numpy as the device does, then the series end;
in the new 3-part form (one message per frame) and the old form (three
single-part messages per frame). It is published from this process on an
XPUB with ``XPUB_NODROP`` (so a slow receiver holds the sender back instead
of losing frames), once to a bare SUB (the floor: ZeroMQ alone), once
through :class:`ingesters.xspress_component.XspressComponent` to a PULL
connected where a master would, data-plane authentication off (decode, restricted unpickle, dead time,
map frame numbers, block, re-send: the ingester's whole cost). Sender,
ingester and receiver share this process (and its GIL).

    python benchmarks/bench_ingest_xspress.py [--frames 20000] [--block 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import report  # noqa: E402 - beside this script
from ingesters.xspress_component import XspressComponent, XspressConfig  # noqa: E402
from services import codec, security  # noqa: E402
from topology_manager.component import TopologyComponent, TopologyConfig  # noqa: E402
from topology_manager.local import LocalManagerLink  # noqa: E402

CHANNELS, BINS = 4, 4096


def stream(frames: int, multipart: bool) -> list[list[bytes]]:
    rng = np.random.default_rng(3)
    spectra = rng.poisson(2.0, size=(CHANNELS, BINS)).astype("<u4").tobytes()
    n = CHANNELS
    scalers = pickle.dumps([np.zeros(n), np.full(n, 12000, np.uint32), np.full(n, 11000, np.uint32),
                            np.full(n, 7999990, np.uint32), np.full(n, 7999990, np.uint32),
                            np.full(n, 400, np.uint32), np.full(n, 6, np.int32), np.ones(n)], protocol=4)
    out = [[json.dumps({"htype": "header", "filename": "/data/bench.hdf5", "overwritable": False}).encode()]]
    for i in range(frames):
        head = json.dumps({"htype": "image", "frame": i, "shape": [CHANNELS, BINS], "type": "uint32",
                           "compression": "none", "exptime": 0.001}).encode()
        out += [[head, spectra, scalers]] if multipart else [[head], [spectra], [scalers]]
    return out + [[b'{"htype": "series_end"}']]


def publisher() -> tuple[zmq.Socket, str]:
    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.sndhwm = 1000
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def send_when_subscribed(pub: zmq.Socket, messages: list[list[bytes]]) -> threading.Thread:
    def run() -> None:
        while pub.recv()[:1] != b"\x01":  # the subscription: from now on nothing is lost
            pass
        for m in messages:
            while True:
                try:
                    pub.send_multipart(m, copy=False, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:  # NODROP: the subscriber is full, wait
                    pub.poll(100, zmq.POLLOUT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def raw(messages: list[list[bytes]]) -> float:
    pub, endpoint = publisher()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    t0 = time.perf_counter()
    sender = send_when_subscribed(pub, messages)
    for _ in messages:
        sub.recv_multipart(copy=False)
    elapsed = time.perf_counter() - t0
    sender.join()
    pub.close(0)
    sub.close(0)
    return elapsed


def ingested(messages: list[list[bytes]], frames: int, block: int) -> tuple[float, int]:
    pub, endpoint = publisher()
    topology = TopologyComponent("bench/topology/manager", TopologyConfig(lease_seconds=30, heartbeat_seconds=5))
    topology.start()
    link = LocalManagerLink(topology.registry)
    scan = [{"scan": "bench", "points": frames, "streams": ["xspress3"], "started": 1.0, "ending": False,
             "first_index": {}}]
    ingester = XspressComponent("bench/xspress/ingester", XspressConfig(endpoint, "xspress3", ("bench",), block),
                                link, "127.0.0.1", lambda pipeline: scan)
    ingester.start()
    pull = zmq.Context.instance().socket(zmq.PULL)  # where the master would read
    pull.connect(ingester.sources["bench"].endpoint)
    t0 = time.perf_counter()
    sender = send_when_subscribed(pub, messages)
    got, blocks = 0, 0
    while True:
        msg = codec.recv(pull)
        if msg.type == codec.SCAN_END:
            break
        assert msg.type == codec.DATA, msg.type
        got += msg.count
        blocks += 1
    elapsed = time.perf_counter() - t0
    assert got == frames and ingester.counters.errors == 0, (got, frames, ingester.counters.errors)
    sender.join()
    ingester.stop()
    topology.stop()
    pub.close(0)
    pull.close(0)
    return elapsed, blocks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    security.configure(security.OFF)  # plain sockets, like the raw SUB it is compared with
    results: dict = {"frames": args.frames, "channels": CHANNELS, "bins": BINS, "block": args.block}
    for form, multipart in (("multipart", True), ("old", False)):
        messages = stream(args.frames, multipart)
        t_raw = raw(messages)
        t_ingest, blocks = ingested(messages, args.frames, args.block)
        results[form] = {"raw_frames_per_s": round(args.frames / t_raw),
                         "ingest_frames_per_s": round(args.frames / t_ingest), "blocks_out": blocks,
                         "ingest_MB_per_s": round(args.frames * CHANNELS * BINS * 4 / t_ingest / 1e6)}

    def tables(r: dict) -> None:
        print(f"Xspress3 stream, {r['frames']} frames of {r['channels']} x {r['bins']} uint32, blocks of {r['block']}")
        for form in ("multipart", "old"):
            f = r[form]
            print(f"  {form:9} raw SUB receive   : {f['raw_frames_per_s']:>7} frames/s")
            print(f"  {form:9} XspressComponent : {f['ingest_frames_per_s']:>7} frames/s  "
                  f"{f['ingest_MB_per_s']:>5} MB/s of spectra ({f['blocks_out']} blocks out)")

    return report(args, results, tables)


if __name__ == "__main__":
    sys.exit(main())
