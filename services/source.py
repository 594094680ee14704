"""The client a detector stream uses to feed the mesh.

A source is a bound PUSH socket registered with the topology manager as kind
``source`` with ``capabilities.stream``; the pipeline's master connects to it
and reads while its burst queue has room. When the master holds the stream
back, the socket's high-water mark fills and :meth:`SourceClient.send` blocks:
that is the mesh's backpressure reaching the detector, never a drop. The
simulator, the Bluesky adapter and the ingesters all send through this class.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import zmq

from services import codec, protocol, security
from services.component import Counters
from services.dataplane import bind
from services.registration import ManagerLink, RegistrationClient

log = logging.getLogger("tangomesh.source")


class SendTimeout(Exception):
    """A bounded send found the stream held back for its whole timeout; nothing was sent."""


class SourceClient:
    """One detector stream: a bound PUSH socket, registered as a source."""

    def __init__(self, stream: str, pipeline: str, link: ManagerLink, host: str = "127.0.0.1", hwm: int = 16,
                 prefix: str = "source") -> None:
        self.stream = stream
        name = f"{prefix}/{pipeline}-{stream}/{os.getpid()}"
        self.counters = Counters(log)  # refused peers (a PUSH socket reads nothing else)
        self.auth = security.Auth(link, self.counters, name)
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
            "capabilities": {"stream": stream}, **self.auth.registration_fields()})
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
        self.send(codec.Message(codec.DATA, scan=scan, stream=self.stream, index=index, count=count, arrays=arrays),
                  timeout)

    def end(self, scan: str, points: int, timeout: float | None = None) -> None:
        self.send(codec.Message(codec.SCAN_END, scan=scan, stream=self.stream, count=points), timeout)

    def close(self) -> None:
        self.registration.stop(deregister=True)
        self.socket.close(0)
