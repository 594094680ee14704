"""Lavue's ZMQ stream, published (see ../shared/reference/lavue.md).

Lavue connects a SUB socket to our bound PUB socket and shows
``[topic, raw C-order bytes, JSON metadata, b"JSON"]`` frames; it also listens
to ``datasources`` announcements to fill its list of topics. Lavue takes one
message per refresh and never skips ahead, so the caller publishes each topic
at most at the viewer's refresh rate, always the latest state, and the send
high-water mark is tiny: a viewer that falls behind loses stale pictures, not
the latest one. (This stream is a view; the sink's store and the files keep
every point.)
"""

from __future__ import annotations

import json

import numpy as np
import zmq

from services.dataplane import bind
from sink.views import LiveFrame

DATASOURCES = b"datasources"
JSON_MARKER = b"JSON"


class LavuePublisher:
    def __init__(self, context: zmq.Context, bind_host: str, advertised_host: str, hwm: int = 2) -> None:
        self.socket = context.socket(zmq.PUB)
        self.socket.sndhwm = hwm
        self.socket.linger = 0
        self.endpoint = bind(self.socket, bind_host, advertised_host)
        self.frames = 0
        self.announcements = 0

    @property
    def address(self) -> str:
        """``host:port`` as typed into Lavue (``host:port:topic`` selects a topic)."""
        return self.endpoint.removeprefix("tcp://")

    def publish(self, topic: str, frame: LiveFrame) -> None:
        xy = frame.xy
        meta = {**frame.meta, "shape": list(xy.shape), "dtype": xy.dtype.str}
        data = np.ascontiguousarray(xy).reshape(-1).view(np.uint8)
        # PUB never blocks: past the high-water mark a slow viewer misses this picture
        self.socket.send_multipart([topic.encode(), data, json.dumps(meta).encode(), JSON_MARKER],
                                   zmq.NOBLOCK, copy=xy.nbytes < 65536)
        self.frames += 1

    def announce(self, topics: list[str]) -> None:
        self.socket.send_multipart([DATASOURCES, json.dumps({"datasources": topics}).encode(), JSON_MARKER],
                                   zmq.NOBLOCK)
        self.announcements += 1

    def close(self) -> None:
        self.socket.close(0)
