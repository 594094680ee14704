r"""How the stages of a pipeline talk on the data plane (on top of services.codec).

::

    source --PUSH(bound)--> master --ROUTER/DEALER credit--> workers --PUSH--> sorter --PUSH--> consumers
                               ^  \____________ scan_start / scan_end / scan_abort ___________^       |
                               |______________________________ acks ______________________________|  (sorter -> master)

* Sources bind a PUSH socket and register it as ``data_out`` (kind ``source``,
  ``capabilities.stream``); the master connects one PULL socket per source, so
  it can stop reading one stream while it waits for another.
* The master binds ``work`` (ROUTER) for workers and ``acks`` (PULL) for the
  sorter. Workers ask for work with ``credit`` messages and heartbeat with
  ``credit`` of 0; a unit of work is a ``data`` block of joined streams whose
  arrays are named ``stream/array``.
* The sorter binds ``results_in`` (PULL): workers push ``result`` blocks, the
  master pushes the scan's ``scan_start``/``scan_end``/``scan_abort`` there
  directly. Consumers (kinds in :data:`CONSUMER_KINDS`) bind ``data_in``.
"""

from __future__ import annotations

from typing import Any, Iterable

from services import codec

KIND_SOURCE = "source"
KIND_MASTER = "master"
KIND_WORKER = "worker"
KIND_SORTER = "sorter"
#: Services the sorter delivers to: every one registered for the pipeline (or for all, pipeline "").
CONSUMER_KINDS = ("sink", "writer", "recorder")

SOURCE_OUT = "data_out"
WORK = "work"
ACKS = "acks"
RESULTS_IN = "results_in"
DATA_IN = "data_in"

#: Meta keys of pipeline messages.
META_SCAN = "scan"  # scan_start: the whole scan document
META_ACKS = "acks"  # scan_start to the sorter: where to acknowledge
META_MISSING = "missing"  # data unit: streams absent from every point of the unit
META_ERRORS = "errors"  # result: {"index": "why this point failed"}
META_INCOMPLETE = "incomplete"  # result/chunk: {stream: [[start, stop], ...]} of points formed without it
META_RANGES = "ranges"  # ack: [[start, stop], ...] delivered (or declared gaps)
META_POINTS = "points"  # scan_end: how many acquisition indices the scan has


def array_key(stream: str, name: str) -> str:
    """Name of a source array inside a unit of work."""
    return f"{stream}/{name}"


def credit(count: int, worker: str, role: str = "") -> codec.Message:
    """A worker asks for ``count`` more units (0: a heartbeat)."""
    return codec.Message(codec.CREDIT, count=count, meta={"worker": worker, "role": role})


def ack(scan: str, ranges: Iterable[tuple[int, int]], gap: bool = False) -> codec.Message:
    return codec.Message(codec.ACK, scan=scan, meta={META_RANGES: [list(r) for r in ranges], "gap": gap})


def ack_ranges(msg: codec.Message) -> list[tuple[int, int]]:
    """The ranges of an ack, validated (ValueError names the problem)."""
    ranges = msg.meta.get(META_RANGES)
    if not isinstance(ranges, list):
        raise ValueError("ack without a list of ranges")
    out = []
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2 or not all(type(x) is int for x in r)
                or not 0 <= r[0] < r[1] <= codec.MAX_INDEX):
            raise ValueError(f"bad ack range {r!r}")
        out.append((r[0], r[1]))
    return out


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Sorted, coalesced ``[[start, stop], ...]``."""
    merged: list[list[int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def merge_incomplete(into: dict[str, list[list[int]]], more: dict[str, Any]) -> None:
    for stream, ranges in more.items():
        into[stream] = merge_ranges([*map(tuple, into.get(stream, [])), *map(tuple, ranges)])
