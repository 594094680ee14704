"""What every benchmark script does the same way: report, and empty a socket."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import zmq


def report(args: argparse.Namespace, results: dict[str, Any], print_tables: Callable[[dict[str, Any]], None],
           ok: bool = True, indent: int = 1) -> int:
    """Print ``results`` as JSON (``--json``) or as the benchmark's tables; the exit status."""
    if args.json:
        print(json.dumps(results, indent=indent))
    else:
        print_tables(results)
    return 0 if ok else 1


def drain(sock: zmq.Socket, quiet_ms: int = 20) -> None:
    """Read and drop what is still queued, until the socket is quiet for ``quiet_ms``."""
    sock.rcvtimeo = quiet_ms
    try:
        while True:
            sock.recv_multipart(copy=False)
    except zmq.Again:
        pass
