"""PandABox PCAP ingest: our decoder against the ``pandablocks`` client's, and the PcapIngester's
component against a raw TCP receive of the same bytes.

The stream is a real RAW capture (the PandABlocks team's ``raw_dump.bin``
from the ``pandablocks`` 0.10.4 sdist: 8 fields, 44-byte samples, with
``PCAP.GATE_DURATION``), its payload tiled to ``--samples`` samples and
framed as that PandA framed it (BIN frames of 1489 samples, 65524 bytes).

* decoder: the same bytes fed in 64 KiB pieces (what one ``recv`` gives) to
  :class:`ingesters.pcap.PcapDecoder` (rows, then rows plus the scaled
  per-field columns the ingester sends) and to
  ``pandablocks.connections.DataConnection`` (rows), samples/s;
* ingest: a TCP server thread plays the PandA; once a bare ``recv`` loop
  reads the bytes (the floor), once :class:`ingesters.panda.PcapComponent`
  reads, decodes, scales, maps and re-sends them as blocks to a PULL where a
  master would read. Sender, ingester and receiver share this process (and
  its GIL); a deployed ingester has its own.

    python benchmarks/bench_ingest_pcap.py [--samples 1000000] [--block 1000] [--json]
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from common import report  # noqa: E402 - beside this script
from ingesters import pcap  # noqa: E402
from ingesters.panda import PcapComponent, PcapConfig  # noqa: E402
from services import codec, security  # noqa: E402
from support.panda import Capture, dump  # noqa: E402 - fetches the sdist's dumps once
from topology_manager.component import TopologyComponent, TopologyConfig  # noqa: E402
from topology_manager.local import LocalManagerLink  # noqa: E402

FRAME_SAMPLES = 1489  # what the recording PandA put in one BIN frame
PIECE = 1 << 16


def capture_bytes(samples: int) -> bytes:
    """The data port's bytes after OK for one capture of ``samples`` samples."""
    cap = Capture.of(dump("raw_dump"))
    size = cap.sample_bytes
    payload = cap.payload()
    reps = -(-samples * size // len(payload))
    body = (payload * reps)[:samples * size]
    step = FRAME_SAMPLES * size
    framed = b"".join(b"BIN " + struct.pack("<I", 8 + len(body[i:i + step])) + body[i:i + step]
                      for i in range(0, len(body), step))
    return cap.header + framed + f"END {samples} Ok\n".encode()


def decode_ours(data: bytes, with_columns: bool) -> tuple[float, int]:
    decoder = pcap.PcapDecoder()
    start, n = None, 0
    t0 = time.perf_counter()
    for i in range(0, len(data), PIECE):
        for e in decoder.feed(data[i:i + PIECE]):
            if isinstance(e, pcap.CaptureStart):
                start = e
            elif isinstance(e, pcap.Samples):
                n += len(e)
                if with_columns:
                    pcap.columns(start, e.rows)
    return time.perf_counter() - t0, n


def decode_pandablocks(data: bytes) -> tuple[float, int]:
    from pandablocks.connections import DataConnection
    from pandablocks.responses import FrameData

    conn = DataConnection()
    conn.connect(scaled=False)
    n = 0
    t0 = time.perf_counter()
    for i in range(0, len(data), PIECE):
        for e in conn.receive_bytes(data[i:i + PIECE]):
            if isinstance(e, FrameData):
                n += len(e.data)
    return time.perf_counter() - t0, n


class PandaServer:
    """Accepts one connection, reads the options line, sends OK and ``data``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        with client:
            line = b""
            while not line.endswith(b"\n"):
                line += client.recv(1)
            client.sendall(b"OK\n")
            view = memoryview(self.data)
            for i in range(0, len(view), 1 << 20):
                client.sendall(view[i:i + (1 << 20)])
            time.sleep(0.5)
        self.listener.close()


def raw(data: bytes) -> float:
    server = PandaServer(data)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"XML FRAMED RAW\n")
    want, got = len(data) + 3, 0
    t0 = time.perf_counter()
    while got < want:
        got += len(sock.recv(1 << 20))
    elapsed = time.perf_counter() - t0
    sock.close()
    return elapsed


def ingested(data: bytes, samples: int, block: int) -> tuple[float, int]:
    server = PandaServer(data)
    topology = TopologyComponent("bench/topology/manager", TopologyConfig(lease_seconds=30, heartbeat_seconds=5))
    topology.start()
    link = LocalManagerLink(topology.registry)
    scan = [{"scan": "bench", "points": samples, "streams": ["panda"], "started": 1.0, "ending": False,
             "first_index": {}}]
    config = PcapConfig(f"127.0.0.1:{server.port}", "panda", ("bench",), "XML FRAMED RAW", block)
    ingester = PcapComponent("bench/pcap/ingester", config, link, "127.0.0.1", lambda pipeline: scan)
    pull = zmq.Context.instance().socket(zmq.PULL)  # where the master would read
    pull.rcvtimeo = 30_000  # a stall fails the run instead of hanging it
    t0 = time.perf_counter()
    ingester.start()
    pull.connect(ingester.sources["bench"].endpoint)
    got, blocks = 0, 0
    while True:
        msg = codec.recv(pull)
        if msg.type == codec.SCAN_END:
            break
        if msg.type == codec.DATA:
            got += msg.count
            blocks += 1
    elapsed = time.perf_counter() - t0
    assert got == samples, (got, samples)
    ingester.stop()
    topology.stop()
    pull.close(0)
    return elapsed, blocks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    security.configure(security.OFF)  # the plain PULL here plays the master: no CurveZMQ (bench_pipeline measures it)
    data = capture_bytes(args.samples)
    import pandablocks

    t_rows, n1 = decode_ours(b"OK\n" + data, False)
    t_cols, n2 = decode_ours(b"OK\n" + data, True)
    t_pb, n3 = decode_pandablocks(b"OK\n" + data)
    assert n1 == n2 == n3 == args.samples, (n1, n2, n3)
    t_raw = raw(data)
    t_ingest, blocks = ingested(data, args.samples, args.block)
    mb = len(data) / 1e6
    results = {"samples": args.samples, "sample_bytes": 44, "MB": round(mb, 1), "block": args.block,
               "pandablocks": pandablocks.__version__,
               "decoder_rows_samples_per_s": round(args.samples / t_rows),
               "decoder_columns_samples_per_s": round(args.samples / t_cols),
               "pandablocks_samples_per_s": round(args.samples / t_pb),
               "raw_tcp_samples_per_s": round(args.samples / t_raw), "raw_tcp_MB_per_s": round(mb / t_raw),
               "ingest_samples_per_s": round(args.samples / t_ingest), "ingest_MB_per_s": round(mb / t_ingest),
               "blocks_out": blocks}

    def tables(r: dict) -> None:
        print(f"PandA PCAP, {r['samples']} samples of {r['sample_bytes']} B ({r['MB']} MB, the real RAW dump tiled)")
        print(f"  decoder, rows              : {r['decoder_rows_samples_per_s']:>10} samples/s")
        print(f"  decoder, rows + columns    : {r['decoder_columns_samples_per_s']:>10} samples/s")
        print(f"  pandablocks {r['pandablocks']} DataConnection: {r['pandablocks_samples_per_s']:>10} samples/s")
        print(f"  raw TCP receive            : {r['raw_tcp_samples_per_s']:>10} samples/s  "
              f"{r['raw_tcp_MB_per_s']} MB/s")
        print(f"  PcapComponent (to a PULL)  : {r['ingest_samples_per_s']:>10} samples/s  {r['ingest_MB_per_s']} MB/s "
              f"({r['blocks_out']} blocks of {r['block']})")

    return report(args, results, tables)


if __name__ == "__main__":
    sys.exit(main())
