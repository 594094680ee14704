r"""How the stages of a pipeline talk on the data plane (on top of services.codec).

::

    source --PUSH(bound)--> master --ROUTER/DEALER credit--> workers --PUSH--> sorter --PUSH--> consumers
                               ^  \____________ scan_start / scan_end / scan_abort ___________^       |
                               |______________________________ acks ______________________________|  (sorter -> master)

* Sources bind a PUSH socket and register it as ``data_out`` (kind ``source``,
  ``capabilities.stream``); the master connects one PULL socket per source, so
  it can stop reading one stream while it waits for another.
* A source may also send a ``gap`` block without arrays (:func:`source_gap`):
  indices ``[index, index + count)`` of its stream will never come (a
  detector skipped frames). The master declares them missing at once, as it
  would after its incomplete timeout; the events there go on marked
  incomplete. A source's ``scan_end`` with ``count`` declares the rest.
* The master binds ``work`` (ROUTER) for workers and ``acks`` (PULL) for the
  sorter. Workers ask for work with ``credit`` messages and heartbeat with
  ``credit`` of 0; a unit of work is a ``data`` block of joined streams whose
  arrays are named ``stream/array``.
* The sorter binds ``results_in`` (PULL): workers push ``result`` blocks, the
  master pushes the scan's ``scan_start``/``scan_end``/``scan_abort`` there
  directly. Consumers (kinds in :data:`CONSUMER_KINDS`) bind ``data_in``.
* Recovery (docs/pipeline.md, "When a stage dies"): after a sorter restart
  the master re-sends each active scan's scan_start with ``resume_from`` and
  ``acked`` (:func:`check_resume`), and tells workers the new ``sorter``
  (:func:`check_sorter`); a scan whose master died ends in scan_abort with a
  ``reason``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Iterable

from services import codec

class Kind(StrEnum):
    """What a service registers as (``kind`` in its registration). A str, so it
    travels in JSON and Lookup queries as the plain word."""

    TOPOLOGY = "topology"
    SOURCE = "source"
    MASTER = "master"
    WORKER = "worker"
    SORTER = "sorter"
    SINK = "sink"
    WRITER = "writer"
    RECORDER = "recorder"
    INGESTER = "ingester"  # a detector protocol's ingester device; its streams register as SOURCE
    AUTOSCALER = "autoscaler"  # fits a pipeline's worker count to its load (services/ops/autoscaler.py)


#: Services the sorter delivers to: every one registered for the pipeline (or for all, pipeline "").
CONSUMER_KINDS = (Kind.SINK, Kind.WRITER, Kind.RECORDER)

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
META_OPEN = "open"  # credit: all the credit the worker holds open
META_RESUME = "resume_from"  # scan_start re-sent to a restarted sorter (and forwarded): first index not acknowledged
META_ACKED = "acked"  # scan_start re-sent to a restarted sorter: [[start, stop], ...] the master has had acked
META_SORTER = "sorter"  # scan_start to workers: the sorter's results_in endpoint to push this scan's results to
META_REASON = "reason"  # scan_abort (and gap): why, in words for people


def source_gap(scan: str, stream: str, start: int, stop: int, reason: str = "") -> codec.Message:
    """A source says indices [start, stop) of ``stream`` never come (missed frames)."""
    return codec.Message(codec.GAP, scan=scan, stream=stream, index=start, count=stop - start,
                         meta={META_REASON: reason} if reason else {})


def array_key(stream: str, name: str) -> str:
    """Name of a source array inside a unit of work."""
    return f"{stream}/{name}"


def credit(count: int, worker: str, role: str = "", open_units: int | None = None) -> codec.Message:
    """A worker asks for ``count`` more units (0: a heartbeat). ``open_units``
    is all the credit the worker holds open after this message: a master that
    had given the worker up (it was silent too long) starts it from there,
    since increments alone would leave it at 0 for good."""
    meta: dict[str, Any] = {"worker": worker, "role": role}
    if open_units is not None:
        meta[META_OPEN] = open_units
    return codec.Message(codec.CREDIT, count=count, meta=meta)


MAX_CREDIT = 10_000  # units one credit message may ask for


def check_credit(msg: codec.Message) -> tuple[str, str, int, int | None]:
    """(worker, role, units, open units or None) of a credit message; ValueError naming the problem."""
    worker, role, open_units = msg.meta.get("worker"), msg.meta.get("role", ""), msg.meta.get(META_OPEN)
    if msg.type != codec.CREDIT or not isinstance(worker, str) or not isinstance(role, str) \
            or not 0 <= msg.count <= MAX_CREDIT \
            or not (open_units is None or (type(open_units) is int and 0 <= open_units <= MAX_CREDIT)):
        raise ValueError(f"refused {msg.type} on the work socket: workers send credit "
                         f"with a worker name and 0..{MAX_CREDIT} units")
    return worker, role, msg.count, open_units


def check_result_meta(meta: dict[str, Any]) -> None:
    """The meta a worker may attach to a result; ValueError otherwise."""
    errors = meta.get(META_ERRORS, {})
    if not isinstance(errors, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in errors.items()):
        raise ValueError("result errors must map index text to a message")
    incomplete = meta.get(META_INCOMPLETE, {})
    if not isinstance(incomplete, dict) or not all(
            isinstance(ranges, list) and all(isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
                                             for r in ranges)
            for ranges in incomplete.values()):
        raise ValueError("result incomplete must map a stream to [[start, stop], ...]")


def check_resume(meta: dict[str, Any]) -> int | None:
    """Where a resumed scan's delivery stands: the ``resume_from`` index of a
    scan_start the master re-sent after the sorter restarted (None for a first
    start); ValueError if it or its ``acked`` ranges are malformed, or the
    ranges leave a hole below ``resume_from`` (delivery is in order, so what
    was acknowledged is a prefix). The master sends ``acked`` to the sorter;
    the sorter forwards ``resume_from`` alone to the consumers."""
    resume = meta.get(META_RESUME)
    if resume is None:
        return None
    if type(resume) is not int or not 0 <= resume <= codec.MAX_INDEX:
        raise ValueError(f"{META_RESUME} must be an index, not {resume!r}")
    if META_ACKED not in meta:
        return resume
    acked = meta[META_ACKED]
    if not isinstance(acked, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and 0 <= r[0] < r[1]
            for r in acked):
        raise ValueError(f"{META_ACKED} must be [[start, stop], ...]")
    prefix = merge_ranges(map(tuple, acked))
    if resume and (not prefix or prefix[0][0] != 0 or prefix[0][1] < resume):
        raise ValueError(f"{META_RESUME} {resume} beyond the acknowledged ranges {prefix[:3]}")
    return resume


def acked_prefix(ranges: Iterable[tuple[int, int]]) -> int:
    """The first index not covered by ``ranges`` counting from 0: where a
    resumed scan's delivery goes on."""
    merged = merge_ranges(ranges)
    return merged[0][1] if merged and merged[0][0] == 0 else 0


def check_sorter(meta: dict[str, Any]) -> str | None:
    """The ``sorter`` endpoint a scan_start names for a worker (None if it names none); ValueError if malformed."""
    sorter = meta.get(META_SORTER)
    if sorter is not None and (not isinstance(sorter, str) or "://" not in sorter or len(sorter) > 256):
        raise ValueError(f"{META_SORTER} must be an endpoint, not {str(sorter)[:40]!r}")
    return sorter


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
