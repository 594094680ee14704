#!/usr/bin/env python
"""Benchmark of the data-plane wire codec (services/codec.py).

Two measurements per message shape:

1. in process: ``decode(encode(msg))`` per message (no sockets);
2. one PUSH/PULL hop over tcp loopback, the baseline and the codec in the same
   run: *raw* sends the pre-encoded frames with ``send_multipart(copy=False)``
   and receives them with ``recv_multipart(copy=False)`` (no codec at all);
   *codec* does ``codec.send`` / ``codec.recv`` (encode and decode every
   message). The ratio codec/raw is the share of the hop throughput the codec
   keeps.

The sender runs in a separate process (default) or thread; the receiver, which
is what is timed, runs in this process. Message rates are those the receiver
sees over a fixed window after a warm-up.

    python benchmarks/bench_codec.py                 # ~22 s, rich table
    python benchmarks/bench_codec.py --seconds 5 --json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import drain, report  # noqa: E402 - beside this script

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from services import codec  # noqa: E402
from services.codec import DATA, Message  # noqa: E402

# --------------------------------------------------------------------------- message shapes


def _counters() -> Message:
    rng = np.random.default_rng(1)
    names = ["i0", "i1", "it", "sec", "samx", "samy", "samz", "energy"]
    arrays = {name: np.array([rng.random()]) for name in names}  # 8 float64 scalars, block of 1
    return Message(DATA, "scan-0001", "counters", 12345, 1, arrays, {"t": 1.7e9})


def _points() -> Message:
    rng = np.random.default_rng(2)
    names = ["i0", "it", "fluo", "samx", "samy", "samz", "energy", "sec"]
    arrays = {name: rng.random(100) for name in names}  # a block of 100 points of 8 float64 counters
    return Message(DATA, "scan-0001", "counters", 12300, 100, arrays)


def _spectrum() -> Message:
    rng = np.random.default_rng(3)
    spectrum = rng.integers(0, 2**16, (1, 4096), dtype=np.uint32)  # 16 KB MCA spectrum
    return Message(DATA, "scan-0001", "xspress3:ch0", 12345, 1, {"spectrum": spectrum})


def _frame() -> Message:
    rng = np.random.default_rng(4)
    frame = rng.integers(0, 2**12, (1, 1024, 1024), dtype=np.uint32)  # 4 MiB detector frame
    return Message(DATA, "scan-0001", "eiger", 12345, 1, {"frame": frame}, {"exposure": 0.01})


CASES: dict[str, tuple[str, Callable[[], Message]]] = {
    "counters": ("8 float64 scalars, block of 1", _counters),
    "points": ("block of 100 points x 8 float64", _points),
    "spectrum": ("4096-channel uint32 spectrum", _spectrum),
    "frame": ("1024x1024 uint32 frame", _frame),
}


def _wire_bytes(frames: list[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


# --------------------------------------------------------------------------- in process


def bench_encode_decode(msg: Message, seconds: float) -> dict[str, float]:
    encode, decode = codec.encode, codec.decode
    for _ in range(50):  # warm-up (dtype cache, allocator)
        decode(encode(msg))
    batch = 1
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(batch):
            decode(encode(msg))
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            break
        if now - t0 < 0.02:
            batch *= 2
    elapsed = time.perf_counter() - start
    return {"messages": n, "seconds": elapsed, "us_per_msg": elapsed / n * 1e6, "msg_per_s": n / elapsed}


# --------------------------------------------------------------------------- one tcp hop


def _sender_worker(conn, stop) -> None:
    """Sender side of the hop (own process or thread): for each ("run", endpoint,
    mode, case) command, send that case's message until ``stop`` is set."""
    ctx = zmq.Context()
    try:
        while True:
            command = conn.recv()
            if command[0] == "quit":
                return
            _, endpoint, mode, case = command
            msg = CASES[case][1]()
            frames = codec.encode(msg)
            push = ctx.socket(zmq.PUSH)
            push.sndtimeo = 50
            # close with linger while the receiver drains: tearing a connection down
            # in the middle of a multipart message can trip a libzmq assertion
            # (session_base.cpp, "Resource temporarily unavailable")
            push.linger = 5000
            push.connect(endpoint)
            sent = 0
            try:
                if mode == "raw":
                    send_multipart = push.send_multipart
                    while not stop.is_set():
                        try:
                            send_multipart(frames, copy=False)
                            sent += 1
                        except zmq.Again:
                            pass
                else:
                    send = codec.send
                    while not stop.is_set():
                        try:
                            send(push, msg)
                            sent += 1
                        except zmq.Again:
                            pass
            finally:
                push.close()
            conn.send(("done", sent))
    finally:
        ctx.term()


class Sender:
    def __init__(self, kind: str) -> None:
        if kind == "process":
            mpctx = mp.get_context("spawn")
            self._conn, child = mpctx.Pipe()
            self.stop = mpctx.Event()
            self._worker = mpctx.Process(target=_sender_worker, args=(child, self.stop), daemon=True)
        else:
            self._conn, child = mp.Pipe()
            self.stop = threading.Event()
            self._worker = threading.Thread(target=_sender_worker, args=(child, self.stop), daemon=True)
        self._worker.start()

    def start(self, endpoint: str, mode: str, case: str) -> None:
        self.stop.clear()
        self._conn.send(("run", endpoint, mode, case))

    def finish(self, socket: zmq.Socket) -> int:
        """Stop the sender, draining ``socket`` until the sender has closed
        its end and nothing more arrives, so that no connection is torn down
        in the middle of a message."""
        self.stop.set()
        while not self._conn.poll(0):
            try:
                socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                time.sleep(0.001)
        kind, sent = self._conn.recv()
        assert kind == "done"
        drain(socket)
        return sent

    def close(self) -> None:
        self._conn.send(("quit",))
        self._worker.join(timeout=10)


def bench_hop(ctx: zmq.Context, sender: Sender, mode: str, case: str, seconds: float, warmup: float) -> dict[str, float]:
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = 5000
    pull.linger = 0
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    recv: Callable[[], Any]
    if mode == "raw":
        recv = lambda: pull.recv_multipart(copy=False)  # noqa: E731
    else:
        recv = lambda: codec.recv(pull)  # noqa: E731
    sender.start(f"tcp://127.0.0.1:{port}", mode, case)
    try:
        deadline = time.perf_counter() + warmup
        while time.perf_counter() < deadline:
            recv()
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            recv()
            n += 1
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
    finally:
        sender.finish(pull)
        pull.close(linger=0)
    return {"messages": n, "seconds": elapsed, "msg_per_s": n / elapsed}


# --------------------------------------------------------------------------- report


def _combine(windows: list[dict[str, float]], wire: int) -> dict[str, Any]:
    messages = sum(w["messages"] for w in windows)
    seconds = sum(w["seconds"] for w in windows)
    rate = messages / seconds
    return {
        "messages": messages,
        "seconds": seconds,
        "msg_per_s": rate,
        "mb_per_s": rate * wire / 1e6,
        "window_msg_per_s": [w["msg_per_s"] for w in windows],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    cases = args.cases
    n = len(cases)
    # budget: 20 % in process, 80 % on the hops: per case four windows in the
    # order raw, codec, codec, raw (cancels linear drift of a busy machine),
    # each with a fresh connection and 1/6 of its time as warm-up
    t_inproc = 0.2 * args.seconds / n
    t_window = 0.8 * args.seconds / (4 * n)
    warmup = t_window / 6
    results: dict[str, Any] = {
        "config": {
            "seconds": args.seconds,
            "sender": args.sender,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "cases": {},
    }
    ctx = zmq.Context()
    sender = Sender(args.sender)
    try:
        for case in cases:
            description, factory = CASES[case]
            msg = factory()
            frames = codec.encode(msg)
            payload = msg.nbytes
            wire = _wire_bytes(frames)
            inproc = bench_encode_decode(msg, t_inproc)
            inproc["mb_per_s"] = inproc["msg_per_s"] * payload / 1e6
            windows: dict[str, list[dict[str, float]]] = {"raw": [], "codec": []}
            for mode in ("raw", "codec", "codec", "raw"):
                windows[mode].append(bench_hop(ctx, sender, mode, case, t_window - warmup, warmup))
            raw, coded = (_combine(windows[mode], wire) for mode in ("raw", "codec"))
            results["cases"][case] = {
                "description": description,
                "arrays": len(msg.arrays),
                "payload_bytes": payload,
                "header_bytes": len(frames[0]),
                "wire_bytes": wire,
                "encode_decode": inproc,
                "hop_raw": raw,
                "hop_codec": coded,
                "ratio_codec_raw": coded["msg_per_s"] / raw["msg_per_s"],
            }
    finally:
        sender.close()
        ctx.term()
    return results


def _fmt_bytes(n: int) -> str:
    if n < 10_000:
        return f"{n:,}"
    if n < 2**20:
        return f"{n / 2**10:,.1f} Ki"
    return f"{n / 2**20:,.1f} Mi"


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg = results["config"]
    t1 = Table(title="encode + decode, in process (per message)")
    for col in ("case", "arrays", "payload B", "header B", "µs/msg", "msg/s", "MB/s"):
        t1.add_column(col, justify="left" if col == "case" else "right")
    t2 = Table(title=f"one PUSH/PULL hop, tcp loopback (sender: {cfg['sender']})")
    for col in ("case", "wire B", "raw msg/s", "raw MB/s", "codec msg/s", "codec MB/s", "ratio"):
        t2.add_column(col, justify="left" if col == "case" else "right")
    for case, r in results["cases"].items():
        ed, raw, coded = r["encode_decode"], r["hop_raw"], r["hop_codec"]
        t1.add_row(
            case,
            str(r["arrays"]),
            _fmt_bytes(r["payload_bytes"]),
            f"{r['header_bytes']:,}",
            f"{ed['us_per_msg']:.2f}",
            _fmt_rate(ed["msg_per_s"]),
            _fmt_rate(ed["mb_per_s"]),
        )
        ratio = r["ratio_codec_raw"]
        t2.add_row(
            case,
            _fmt_bytes(r["wire_bytes"]),
            _fmt_rate(raw["msg_per_s"]),
            _fmt_rate(raw["mb_per_s"]),
            _fmt_rate(coded["msg_per_s"]),
            _fmt_rate(coded["mb_per_s"]),
            f"[{'green' if ratio >= 0.8 else 'yellow' if ratio >= 0.5 else 'red'}]{ratio:.2f}[/]",
        )
    t2.caption = "ratio = codec msg/s / raw msg/s in the same run"
    console.print(t1)
    console.print(t2)
    for case, r in results["cases"].items():
        console.print(f"  {case}: {r['description']}", highlight=False)
    console.print(
        f"python {cfg['python']}, numpy {cfg['numpy']}, pyzmq {cfg['pyzmq']} (libzmq {cfg['libzmq']}), "
        f"{cfg['cpus']} CPUs; MB = 10^6 bytes; in-process MB/s counts array payload, hop MB/s header + buffers.",
        highlight=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seconds", type=float, default=18.0,
        help="total measurement budget (default 18; start-up and connection teardown add ~3-5 s)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable results (JSON) instead of tables")
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
        help=f"which message shapes to run (default: all of {', '.join(CASES)})",
    )
    parser.add_argument(
        "--sender", choices=("process", "thread"), default="process",
        help="run the hop's sender in a separate process (default) or a thread of this one",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    return report(args, run(args), print_tables, indent=2)


if __name__ == "__main__":
    sys.exit(main())
