"""A stand-in for the ``xspress3-streamer``'s ZeroMQ PUB: publishes recorded messages as they were sent.

The socket is an XPUB (to a subscriber exactly a PUB) so that the test can
see the ingester's subscription arrive before it publishes: a PUB drops
whatever it sends before a subscriber has joined (the slow joiner), and the
real streamer gives no sign either. With ``XPUB_NODROP`` a slow subscriber
holds the replay back instead of losing messages silently, so a test's
losses are only the ones it makes (``drop``).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import zmq

from support.simulators import REBIND_PORTS


class XspressReplay:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.context = zmq.Context()  # its own: restart() ends it, so the old socket's port is surely free
        self.socket = self._socket()
        # outside the ephemeral range: restart() binds the port again while the ingester's SUB reconnects
        port = self.socket.bind_to_random_port(f"tcp://{host}", *REBIND_PORTS)
        self.endpoint = f"tcp://{host}:{port}"
        self.subscribers = 0
        self.sent = 0

    def _socket(self) -> zmq.Socket:
        sock = self.context.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.sndhwm = 100_000
        sock.linger = 0
        return sock

    def restart(self) -> None:
        """As when the streamer's process restarts: the socket closed, a new one bound on the same
        address, nobody subscribed to it until a subscriber reconnects."""
        self.socket.close(0)
        self.context.term()  # returns once every socket of it is closed and its listener released
        self.context = zmq.Context()
        self.socket = self._socket()
        deadline = time.monotonic() + 10
        while True:  # and should the kernel still hold the address a moment: try again
            try:
                self.socket.bind(self.endpoint)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.subscribers = 0

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        """Until a subscriber's subscription has arrived (its messages would reach it from then on)."""
        deadline = time.monotonic() + timeout
        while self.subscribers < 1:
            if not self.socket.poll(max(1, int(1000 * (deadline - time.monotonic()))), zmq.POLLIN):
                raise TimeoutError(f"no subscriber on {self.endpoint} within {timeout} s")
            if self.socket.recv()[:1] == b"\x01":
                self.subscribers += 1

    def play(self, messages: Sequence[list[bytes]], pace: float = 0.0,
             drop: Callable[[int, list[bytes]], bool] = lambda k, m: False) -> int:
        """Publish each recorded message (its parts as one multipart message), ``pace`` seconds
        apart; a message for which ``drop(position, parts)`` is true is not sent. Returns how many went."""
        sent = 0
        for k, parts in enumerate(messages):
            if drop(k, parts):
                continue
            self.socket.send_multipart(parts, copy=len(parts[-1]) < 65536)
            sent += 1
            if pace:
                time.sleep(pace)
        self.sent += sent
        return sent

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()
