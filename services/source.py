"""The client a detector stream uses to feed the mesh.

A source is a bound PUSH socket registered with the topology manager as kind
``source`` with ``capabilities.stream``; the pipeline's master connects to it
and reads while its burst queue has room. When the master holds the stream
back, the socket's high-water mark fills and :meth:`SourceClient.send` blocks:
that is the mesh's backpressure reaching the detector, never a drop. The
simulator, the Bluesky adapter and the ingesters all send through this class.

A source that knows what it sends describes its stream in its registration
(:func:`stream_descriptor`: dtype and shape of one point per array, the
largest block): the master sizes its ZMQ_MAXMSGSIZE for this source from it
(``services/dataplane.py`` ``stream_frame_cap``), and the source itself
refuses, with ValueError, a block its descriptor does not allow, rather than
have the master's socket drop it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np
import zmq

from services import codec, protocol, security
from services.component import Counters
from services.dataplane import bind
from services.registration import ManagerLink, RegistrationClient

log = logging.getLogger("tangomesh.source")


def stream_descriptor(arrays: Mapping[str, np.ndarray], max_block: int) -> dict[str, Any]:
    """The ``arrays`` and ``max_block`` capabilities of a source whose blocks
    look like ``arrays`` (any block of them: the leading axis is the point axis)."""
    if max_block < 1 or not arrays:
        raise ValueError("a stream descriptor needs at least one array and max_block >= 1")
    return {"arrays": {name: {"dtype": a.dtype.str, "shape": list(a.shape[1:])} for name, a in arrays.items()},
            "max_block": int(max_block)}


class SendTimeout(Exception):
    """A bounded send found the stream held back for its whole timeout; nothing was sent."""


class SourceClient:
    """One detector stream: a bound PUSH socket, registered as a source."""

    def __init__(self, stream: str, pipeline: str, link: ManagerLink, host: str = "127.0.0.1", hwm: int = 16,
                 prefix: str = "source", descriptor: Mapping[str, Any] | None = None,
                 thread_factory: Callable[..., threading.Thread] = threading.Thread) -> None:
        self.stream = stream
        name = f"{prefix}/{pipeline}-{stream}/{os.getpid()}"
        self.counters = Counters(log)  # refused peers (a PUSH socket reads nothing else)
        self.auth = security.Auth(link, self.counters, name)
        self.descriptor = dict(descriptor) if descriptor else None
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.sndhwm = hwm
        self.socket.linger = 0
        # whoever connects to a PUSH gets a share of its blocks: only the pipeline's master may
        self.auth.serve(self.socket, security.rule(protocol.Kind.MASTER, pipeline=pipeline), f"source {stream}")
        self.endpoint = bind(self.socket, host, host)
        self.blocked_seconds = 0.0
        self.registration = RegistrationClient(link, {
            "name": name, "kind": protocol.Kind.SOURCE, "pipeline": pipeline,
            "host": host, "pid": os.getpid(), "endpoints": {protocol.SOURCE_OUT: self.endpoint},
            "capabilities": {"stream": stream, **(self.descriptor or {})}, **self.auth.registration_fields()},
            thread_factory=thread_factory)
        self.registration.start()

    def send(self, msg: codec.Message, timeout: float | None = None) -> None:
        """Blocks while the master holds this stream back (its high-water mark
        is full); with ``timeout``, at most that long, then :class:`SendTimeout`
        with nothing sent, so that a caller can ask whether the master is still there."""
        frames = codec.encode(msg)
        try:
            codec.send_frames(self.socket, frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        t0 = time.monotonic()
        try:
            if timeout is None:
                codec.send_frames(self.socket, frames)
                return
            while True:
                left = t0 + timeout - time.monotonic()
                if left <= 0 or not self.socket.poll(max(1, int(left * 1000)), zmq.POLLOUT):
                    raise SendTimeout(f"the {self.stream} source's master took nothing for {timeout:g} s")
                try:
                    codec.send_frames(self.socket, frames, zmq.NOBLOCK)
                    return
                except zmq.Again:
                    continue
        finally:
            self.blocked_seconds += time.monotonic() - t0

    def block(self, scan: str, index: int, arrays: dict[str, np.ndarray], timeout: float | None = None) -> None:
        count = len(next(iter(arrays.values())))
        if self.descriptor:
            self._check(arrays, count)
        self.send(codec.Message(codec.DATA, scan=scan, stream=self.stream, index=index, count=count, arrays=arrays),
                  timeout)

    def gap(self, scan: str, start: int, stop: int, reason: str = "", timeout: float | None = None) -> None:
        """Points [start, stop) of this stream will never come (a detector's missed frames)."""
        self.send(protocol.source_gap(scan, self.stream, start, stop, reason), timeout)

    def end(self, scan: str, points: int, timeout: float | None = None) -> None:
        self.send(codec.Message(codec.SCAN_END, scan=scan, stream=self.stream, count=points), timeout)

    def _check(self, arrays: dict[str, np.ndarray], count: int) -> None:
        declared = self.descriptor["arrays"]
        if count > self.descriptor["max_block"]:
            raise ValueError(f"stream {self.stream}: a block of {count} points, more than the "
                             f"{self.descriptor['max_block']} it registered")
        for name, a in arrays.items():
            spec = declared.get(name)
            if spec is None or a.dtype.str != spec["dtype"] or list(a.shape[1:]) != spec["shape"]:
                raise ValueError(f"stream {self.stream}: array {name!r} {a.dtype.str}{list(a.shape[1:])} per point "
                                 f"is not what it registered ({spec or 'no such array'})")

    def close(self) -> None:
        self.registration.stop(deregister=True)
        self.socket.close(0)
