"""Sockets of the data plane: binding, and the receive loop every consumer uses."""

from __future__ import annotations

import logging
import os
import socket as pysocket
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np
import zmq

from services import codec
from services.component import Counters
from services.security import HANDSHAKE_FAILURES, Auth, Peer, Rule

log = logging.getLogger(__name__)

POLL_MS = 100
#: Largest frame a data inlet accepts (ZMQ_MAXMSGSIZE): a result chunk of
#: pixel-detector frames is hundreds of MiB; a forged size header beyond this
#: makes ZeroMQ drop that peer instead of allocating the memory it claims.
DATA_MAX_FRAME_BYTES = 2**30
#: Largest frame of a control or query socket (credits, acks, queries).
CONTROL_MAX_FRAME_BYTES = 2**20


#: Margin over the largest frame a stream descriptor promises: an eighth plus 64 KiB, for
#: codecs whose worst case exceeds the raw size (LZ4, bitshuffle add a little on noise).
FRAME_MARGIN = 1 / 8
FRAME_SLACK_BYTES = 64 * 2**10


def stream_frame_cap(capabilities: Mapping[str, Any]) -> int:
    """ZMQ_MAXMSGSIZE for the socket reading a source, from the stream
    descriptor in its registration (``arrays``: dtype and shape of one point
    per array, ``max_block``: most points per message; see
    ``services/schemas/registration.json``): the largest array frame it can
    send, plus :data:`FRAME_MARGIN`, never below the header frame's
    :data:`CONTROL_MAX_FRAME_BYTES`, never above :data:`DATA_MAX_FRAME_BYTES`.
    A source that does not describe its stream gets the latter. ValueError
    for a descriptor that cannot be sized."""
    arrays, max_block = capabilities.get("arrays"), capabilities.get("max_block")
    if arrays is None and max_block is None:
        return DATA_MAX_FRAME_BYTES
    if not isinstance(arrays, Mapping) or not arrays or not isinstance(max_block, int) or max_block < 1:
        raise ValueError("a stream descriptor needs 'arrays' (name -> dtype, shape) and 'max_block' >= 1")
    largest = 0
    for name, spec in arrays.items():
        try:
            itemsize = np.dtype(spec["dtype"]).itemsize
            points = int(np.prod([int(n) for n in spec["shape"]], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"array {name!r} of the stream descriptor: {exc}") from None
        largest = max(largest, max_block * points * itemsize)
    cap = int(largest * (1 + FRAME_MARGIN)) + FRAME_SLACK_BYTES
    return min(max(cap, CONTROL_MAX_FRAME_BYTES), DATA_MAX_FRAME_BYTES)


def limit_frames(socket: zmq.Socket, max_bytes: int) -> None:
    """Cap inbound frames at ``max_bytes``; set before bind or connect, since
    ZeroMQ applies it to connections made afterwards. A peer that sends a
    larger frame is disconnected by ZeroMQ itself (nothing of it is read)."""
    socket.maxmsgsize = max_bytes


#: At most one log line per socket and this many seconds about peers ZeroMQ dropped (each is counted).
DROP_LOG_PERIOD_S = 10.0
_CONNECTION_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


class DropWatch:
    """Counts the peers ZeroMQ itself drops from ``socket``: a frame over its
    ZMQ_MAXMSGSIZE (or broken framing) ends the connection inside libzmq,
    and nothing of it reaches the application.

    libzmq 4.3.5 reports such a drop only as ``ZMQ_EVENT_DISCONNECTED``, with
    the connection's file descriptor as value and no errno: the very event a
    peer that leaves produces (checked in tests/unit/test_dataplane_limits.py).
    What differs is the connection: a peer that left has closed it (end of
    file) or reset it, a dropped peer has not. So at ``ACCEPTED``/``CONNECTED``
    the watch keeps a duplicate of the descriptor, and at ``DISCONNECTED``
    peeks at it without reading: still open (bytes of the refused frame
    pending, or nothing yet) means ZeroMQ dropped a live peer. A peer that
    sends its oversized frame at once may be dropped before the watch gets to
    the descriptor (the handshake takes a few round trips, well under a
    millisecond on one host): a connection that ended before it could be
    looked at is counted as dropped too, since mesh peers connect to stay. A connecting
    socket's session then ends for good (libzmq does not reconnect after a
    protocol error): :meth:`poll` returns True and the owner reconnects.

    Call :meth:`poll` when :attr:`monitor` is readable (register it in the
    loop's poller): events are rare, nothing of this is on the data path.
    """

    def __init__(self, socket: zmq.Socket, where: str, counters: Counters,
                 handshake_failed: Callable[[str], None] | None = None) -> None:
        self.socket = socket
        self.where = where
        self.counters = counters
        self.dropped = 0
        # ZeroMQ allows one monitor per socket: on an authenticated server socket this watch also
        # reports the handshakes that failed before ZAP (services/security.py counts them)
        self.handshake_failed = handshake_failed
        # a refused handshake (either side) ends its connection too: that is a refusal, not a drop
        self.monitor = socket.get_monitor_socket(_CONNECTION_EVENTS | HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._refused_handshakes = 0  # failed handshakes whose disconnection is a refusal, not a drop
        self._connections: dict[int, pysocket.socket | None] = {}  # fd -> our duplicate (None: gone already)
        self._logged_at = -DROP_LOG_PERIOD_S
        self._unlogged = 0

    def poll(self) -> bool:
        """Handle the pending events; True if a peer was dropped."""
        from zmq.utils.monitor import recv_monitor_message

        dropped = False
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            except zmq.ZMQError:  # closed under us
                return dropped
            if event["event"] & (HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                self._refused_handshakes += 1  # counted as a refusal (here, or by the ZAP handler): not a drop
                if self.handshake_failed is not None and event["event"] & HANDSHAKE_FAILURES:
                    endpoint = event["endpoint"]
                    self.handshake_failed(endpoint.decode(errors="replace") if isinstance(endpoint, bytes)
                                          else str(endpoint))
                continue
            fd = int(event["value"])
            if event["event"] in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                self._forget(fd)
                self._connections[fd] = _duplicate(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED and fd in self._connections:
                connection = self._connections.pop(fd)
                if self._refused_handshakes:
                    self._refused_handshakes -= 1
                elif connection is None or _still_open(connection):
                    dropped = True
                    self._count(event["endpoint"])
                if connection is not None:
                    connection.close()

    def _count(self, endpoint: bytes | str) -> None:
        self.dropped += 1
        peer = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else str(endpoint)
        message = (f"{self.where}: ZeroMQ dropped a peer on {peer} (a frame over the "
                   f"{self.socket.maxmsgsize} byte cap, or broken framing); nothing of it was read")
        now = time.monotonic()
        log_now = now - self._logged_at >= DROP_LOG_PERIOD_S
        self.counters.error(message + (f" ({self._unlogged} more since the last such line)"
                                       if log_now and self._unlogged else ""), log=log_now)
        if log_now:
            self._logged_at, self._unlogged = now, 0
        else:
            self._unlogged += 1

    def _forget(self, fd: int) -> None:
        connection = self._connections.pop(fd, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Before the socket is closed, or after (a refused connect closes it first)."""
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        for fd in list(self._connections):
            self._forget(fd)


def _duplicate(fd: int) -> pysocket.socket | None:
    """Our own handle on libzmq's connection ``fd``; None if it is closed already."""
    try:
        copy = os.dup(fd)
    except OSError:
        return None
    try:
        return pysocket.socket(fileno=copy)
    except OSError:  # the number is something else by now
        os.close(copy)
        return None


def _still_open(connection: pysocket.socket) -> bool:
    """The peer has neither closed nor reset this connection."""
    try:
        return connection.recv(1, pysocket.MSG_PEEK | pysocket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:  # reset, or not a socket any more
        return False


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
            auth.serve(self.socket, admits, name, watch=False)  # the subclass's DropWatch reports failed handshakes
        self.endpoint = bind(self.socket, bind_host, advertised_host)
        self._stop = threading.Event()
        self._thread = thread_factory(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._close()

    def _close(self) -> None:
        self.socket.close(0)

    def _run(self) -> None:
        raise NotImplementedError


class PullInlet(BoundSocketThread):
    """A bound PULL socket drained by one thread.

    Each valid message goes to ``handler`` on that thread. While the handler is
    busy nothing more is read, the socket's high-water mark fills and senders
    block: backpressure, never a drop. A frame set that does not decode, or that
    the handler refuses by raising ``ValueError`` (``CodecError`` is one), is
    counted and logged, and the loop goes on; so is a peer ZeroMQ drops for
    a frame over ``max_frame_bytes`` (:class:`DropWatch`), while the others go on.

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
        served = auth is not None and auth.on and admits is not None
        self.drops = DropWatch(self.socket, f"{name} {self.endpoint}", counters,
                               (lambda endpoint: auth.handshake_failed(name, endpoint)) if served else None)

    def _close(self) -> None:
        self.drops.close()
        super()._close()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.drops.monitor, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            if self.drops.monitor in ready:
                self.drops.poll()
            if self.socket not in ready:
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
