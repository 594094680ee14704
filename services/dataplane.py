"""Sockets of the data plane: binding, and the receive loop every consumer uses."""

from __future__ import annotations

import logging
import threading
from typing import Callable

import zmq

from services import codec
from services.component import Counters
from services.security import Auth, Peer, Rule

log = logging.getLogger(__name__)

POLL_MS = 100
#: Largest frame a data inlet accepts (ZMQ_MAXMSGSIZE): a result chunk of
#: pixel-detector frames is hundreds of MiB; a forged size header beyond this
#: makes ZeroMQ drop that peer instead of allocating the memory it claims.
DATA_MAX_FRAME_BYTES = 2**30
#: Largest frame of a control or query socket (credits, acks, queries).
CONTROL_MAX_FRAME_BYTES = 2**20


def limit_frames(socket: zmq.Socket, max_bytes: int) -> None:
    """Cap inbound frames at ``max_bytes``; set before bind or connect, since
    ZeroMQ applies it to connections made afterwards. A peer that sends a
    larger frame is disconnected by ZeroMQ itself (nothing of it is read)."""
    socket.maxmsgsize = max_bytes


def bind(socket: zmq.Socket, bind_host: str, advertised_host: str) -> str:
    """Bind to a free TCP port; return the endpoint others should connect to."""
    port = socket.bind_to_random_port(f"tcp://{bind_host}")
    return f"tcp://{advertised_host}:{port}"


class BoundSocketThread:
    """A socket bound to a free port and the one thread that serves it;
    subclasses implement ``_run`` (looping until ``_stop`` is set)."""

    def __init__(self, context: zmq.Context, socket_type: int, bind_host: str, advertised_host: str,
                 thread_factory: Callable[..., threading.Thread], name: str,
                 max_frame_bytes: int = CONTROL_MAX_FRAME_BYTES, auth: Auth | None = None,
                 admits: Rule | None = None) -> None:
        self.socket = context.socket(socket_type)
        self.socket.linger = 0
        limit_frames(self.socket, max_frame_bytes)
        self.auth = auth
        if auth is not None and admits is not None:
            auth.serve(self.socket, admits, name)
        self.endpoint = bind(self.socket, bind_host, advertised_host)
        self._stop = threading.Event()
        self._thread = thread_factory(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.socket.close(0)

    def _run(self) -> None:
        raise NotImplementedError


class PullInlet(BoundSocketThread):
    """A bound PULL socket drained by one thread.

    Each valid message goes to ``handler`` on that thread. While the handler is
    busy nothing more is read, the socket's high-water mark fills and senders
    block: backpressure, never a drop. A frame set that does not decode, or that
    the handler refuses by raising ``ValueError`` (``CodecError`` is one), is
    counted and logged, and the loop goes on.

    With ``auth`` and ``admits`` the socket admits only those registered
    services (services/security.py); ``check_sender`` then sees each message
    with the registered service that sent it (None when authentication is
    off: nothing to check) and refuses it by raising ``ValueError``.
    """

    def __init__(
        self,
        context: zmq.Context,
        bind_host: str,
        advertised_host: str,
        handler: Callable[[codec.Message], None],
        counters: Counters,
        thread_factory: Callable[..., threading.Thread] = threading.Thread,
        hwm: int = 1000,
        name: str = "inlet",
        max_frame_bytes: int = DATA_MAX_FRAME_BYTES,
        auth: Auth | None = None,
        admits: Rule | None = None,
        check_sender: Callable[[Peer | None, codec.Message], None] | None = None,
    ) -> None:
        self.handler = handler
        self.counters = counters
        super().__init__(context, zmq.PULL, bind_host, advertised_host, thread_factory, name, max_frame_bytes,
                         auth, admits)
        self.check_sender = check_sender if auth is not None and auth.on else None
        self.socket.set_hwm(hwm)  # applies to the peers, which all connect later

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(POLL_MS):
                continue
            try:
                frames = codec.recv_frames(self.socket)
                msg = codec.decode(frames)
            except codec.CodecError as exc:
                self.counters.error(f"refused data-plane message on {self.endpoint}: {exc}")
                continue
            self.counters.events_in += 1
            try:
                if self.check_sender is not None:
                    assert self.auth is not None
                    self.check_sender(self.auth.sender(frames[0]), msg)
                self.handler(msg)
            except ValueError as exc:
                self.counters.error(
                    f"refused {msg.type} scan={msg.scan!r} stream={msg.stream!r} index={msg.index}: {exc}"
                )
            except Exception as exc:  # a bug in a handler must not kill the service's data path
                log.exception("handler failed")
                self.counters.error(f"handler failed on {msg.type} index={msg.index}: {exc!r}")
