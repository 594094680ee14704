"""The client a detector stream uses to feed the mesh.

A source is a bound PUSH socket registered with the topology manager as kind
``source`` with ``capabilities.stream``; the pipeline's master connects to it
and reads while its burst queue has room. When the master holds the stream
back, the socket's high-water mark fills and :meth:`SourceClient.send` blocks:
that is the mesh's backpressure reaching the detector, never a drop. The
simulator, the Bluesky adapter and the ingesters all send through this class.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import numpy as np
import zmq

from services import codec, protocol
from services.dataplane import bind
from services.registration import ManagerLink, RegistrationClient


class SourceClient:
    """One detector stream: a bound PUSH socket, registered as a source."""

    def __init__(self, stream: str, pipeline: str, link: ManagerLink, host: str = "127.0.0.1", hwm: int = 16,
                 prefix: str = "source", thread_factory: Callable[..., threading.Thread] = threading.Thread) -> None:
        self.stream = stream
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.sndhwm = hwm
        self.socket.linger = 0
        self.endpoint = bind(self.socket, host, host)
        self.blocked_seconds = 0.0
        self.registration = RegistrationClient(link, {
            "name": f"{prefix}/{pipeline}-{stream}/{os.getpid()}", "kind": protocol.Kind.SOURCE, "pipeline": pipeline,
            "host": host, "pid": os.getpid(), "endpoints": {protocol.SOURCE_OUT: self.endpoint},
            "capabilities": {"stream": stream}}, thread_factory=thread_factory)
        self.registration.start()

    def send(self, msg: codec.Message) -> None:
        """Blocks while the master holds this stream back (its high-water mark is full)."""
        frames = codec.encode(msg)
        try:
            codec.send_frames(self.socket, frames, zmq.NOBLOCK)
        except zmq.Again:
            t0 = time.monotonic()
            codec.send_frames(self.socket, frames)
            self.blocked_seconds += time.monotonic() - t0

    def block(self, scan: str, index: int, arrays: dict[str, np.ndarray]) -> None:
        count = len(next(iter(arrays.values())))
        self.send(codec.Message(codec.DATA, scan=scan, stream=self.stream, index=index, count=count, arrays=arrays))

    def end(self, scan: str, points: int) -> None:
        self.send(codec.Message(codec.SCAN_END, scan=scan, stream=self.stream, count=points))

    def close(self) -> None:
        self.registration.stop(deregister=True)
        self.socket.close(0)
