"""What every stage of a pipeline (master, worker, sorter) sets up the same way."""

from __future__ import annotations

import logging
import threading
from typing import Iterator

import zmq

from services import codec, schema, security
from services.component import Component
from services.registration import ManagerLink


class PipelineComponent(Component):
    """A component bound to one pipeline, with the topology link, the process's
    ZeroMQ context, and threads started by :meth:`start` and joined by :meth:`stop`."""

    def __init__(self, name: str, pipeline: str, link: ManagerLink, log: logging.Logger) -> None:
        super().__init__(name, pipeline, log)
        if not pipeline:
            raise ValueError(f"the Pipeline property must name the pipeline this {self.kind} serves")
        schema.preload("scan")  # at start, not as a ~60 ms stall on the first scan
        self.auth = security.Auth(link, self.counters, name)
        self.link = self.auth.link or link  # its lookups teach the auth the keys of the peers found
        self.context = zmq.Context.instance()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads; subclasses close their sockets after this."""
        super().stop()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(5)

    def drain(self, sock: zmq.Socket, where: str, limit: int = 256) -> Iterator[codec.Message]:
        """Up to ``limit`` messages waiting on ``sock`` (then the loop serves its
        other sockets). A malformed one is counted, logged and skipped, never
        raised: one bad peer must not stop a stage."""
        return (msg for _, msg in self.drain_frames(sock, where, limit))

    def drain_frames(self, sock: zmq.Socket, where: str,
                     limit: int = 256) -> Iterator[tuple[list[zmq.Frame], codec.Message]]:
        """:meth:`drain`, each message with the frames it came in (to record it as it was)."""
        for _ in range(limit):
            try:
                frames = codec.recv_frames(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = codec.decode(frames)
            except codec.CodecError as exc:
                self.counters.error(f"refused message on {where}: {exc}")
                continue
            yield frames, msg

    def drain_routed(self, sock: zmq.Socket, where: str, limit: int = 256) -> Iterator[tuple[bytes, codec.Message]]:
        """:meth:`drain` for a ROUTER socket: (peer identity, message)."""
        for _ in range(limit):
            try:
                yield codec.recv_routed(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            except codec.CodecError as exc:
                self.counters.error(f"refused message on {where}: {exc}")
