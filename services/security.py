"""Data-plane authentication: CurveZMQ keys per service, ZAP admission by the topology.

Why here, and why so: every stage's sockets are reachable by anything on the
network, and until now a forged ``scan_start`` to a writer opened a file. The
one place that decides who may talk on the data plane is this module
(docs/operating.md, "Data-plane authentication"):

* **Keys.** Each service (each :class:`Auth`) generates a CURVE keypair when it
  starts and keeps it in memory only; its public key travels in its
  registration as ``curve_key`` (Z85 text). A restarted service has a new key,
  and its re-registration replaces the old one in the topology.
* **Servers.** A bound socket goes through :meth:`Auth.serve`: it becomes a
  CURVE server with a ZAP domain of its own. The process's one ZAP handler
  (:class:`_Gate`, on ``inproc://zeromq.zap.01`` of the socket's context)
  admits a client key only if it belongs to a registered service the socket's
  :class:`Rule` takes (e.g. the master's ``work`` socket: workers of its
  pipeline). Every refusal is counted in the service's ``Errors`` and logged
  once per peer and minute: ZeroMQ clients retry in a loop. A client that
  speaks no CURVE at all fails the handshake inside ZeroMQ; the gate sees that
  on the socket's monitor and counts it the same way.
* **Clients.** A connecting socket goes through :meth:`Auth.connect`, which
  finds the server's key by its endpoint in the registrations (cached; looked
  up again on a miss).
* **Who sent it.** A message received over CURVE carries its sender's key as
  the ZAP ``User-Id`` (frame metadata); :meth:`Auth.sender` maps it to the
  registered :class:`Peer` with a dict lookup, so a consumer can take scan
  control only from its pipeline's sorter (:func:`check_consumer_sender`).
* **The switch.** One mesh-wide setting: the Tango free property
  ``tangomesh``/``DataPlaneAuth`` (``curve``, the default, or ``off``), read
  at start by every service and client tool (:func:`configure_from_database`).
  A component built without a topology link (unit tests and benchmarks that
  drive a single component with plain sockets) has nothing to admit peers by
  and runs plain.
"""

from __future__ import annotations

import itertools
import os
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from services import codec, protocol
from services.component import Counters
from services.registration import ManagerLink, ManagerUnavailable, TangoManagerLink

log = logging.getLogger("tangomesh.security")

#: The mesh-wide switch: a Tango free property (object, name) and its values.
SWITCH_OBJECT = "tangomesh"
SWITCH_PROPERTY = "DataPlaneAuth"
CURVE = "curve"
OFF = "off"
MODES = (CURVE, OFF)

#: Registration field holding a service's public key (Z85 text, 40 characters).
KEY_FIELD = "curve_key"
REFRESH_SECONDS = 1.0  # a key not known is looked up again at most this often
STALE_SECONDS = 10.0  # the gate re-reads the whole topology this often (departures)
#: A service missing from a lookup keeps its key this long: a restarted manager
#: knows only the services that have re-registered yet, and refusing a live
#: sorter's results meanwhile would lose data.
GRACE_SECONDS = 60.0
#: Topology reads an unknown key gets before it is refused (one per REFRESH_SECONDS): a
#: client may connect a moment before its own registration has reached the manager.
UNKNOWN_KEY_ATTEMPTS = 3
LOG_EVERY_SECONDS = 60.0  # a refused peer is logged at most this often
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_domains = itertools.count()  # ZAP domains (and their monitors' addresses) of this process
#: Monitor events of a handshake that failed before ZAP was asked (a client without CURVE).
HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

_mode: str | None = None  # None: not stated in this process yet (see mode_for)


def has_curve() -> bool:
    return bool(zmq.has("curve"))


def configure(mode: str) -> None:
    """Set this process's mode (``curve`` or ``off``); ValueError otherwise."""
    global _mode
    mode = (mode or CURVE).strip().lower()
    if mode not in MODES:
        raise ValueError(f"{SWITCH_OBJECT}/{SWITCH_PROPERTY} must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == CURVE and not has_curve():
        raise RuntimeError("this libzmq has no CURVE support: set the DataPlaneAuth property to 'off' to run plain")
    _mode = mode


def mode_for(link: ManagerLink | None) -> str:
    """This process's mode: as configured; else, for a service or tool that
    talks to a Tango topology manager, the mesh's switch in the Tango
    database (read once per process); else (in-process links of tests and
    benchmarks) the default, ``curve``."""
    if _mode is None:
        if isinstance(link, TangoManagerLink):
            return configure_from_database()
        return CURVE
    return _mode


def enabled(link: ManagerLink | None = None) -> bool:
    return mode_for(link) == CURVE


def read_switch(db: Any | None = None) -> str:
    """The mesh's ``DataPlaneAuth`` free property (``curve`` when unset)."""
    import tango

    db = db or tango.Database()
    values = list(db.get_property(SWITCH_OBJECT, [SWITCH_PROPERTY])[SWITCH_PROPERTY])
    return values[0].strip().lower() if values and values[0].strip() else CURVE


def write_switch(value: str, db: Any | None = None) -> None:
    """State the mesh's mode in the Tango database (``tangomesh up`` does this)."""
    import tango

    if value not in MODES:
        raise ValueError(f"DataPlaneAuth must be one of {', '.join(MODES)}, not {value!r}")
    (db or tango.Database()).put_property(SWITCH_OBJECT, {SWITCH_PROPERTY: [value]})


def configure_from_database(db: Any | None = None) -> str:
    """Read the switch and apply it to this process; returns the mode."""
    configure(read_switch(db))
    assert _mode is not None
    return _mode


# --------------------------------------------------------------------------- keys and peers


@dataclass(frozen=True)
class Keypair:
    public: bytes  # Z85, 40 bytes: what zmq's curve_* options take
    secret: bytes

    @classmethod
    def generate(cls) -> "Keypair":
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @property
    def text(self) -> str:
        return self.public.decode("ascii")


@dataclass(frozen=True)
class Peer:
    """A registered service, as far as authentication cares."""

    name: str
    kind: str
    pipeline: str
    key: str
    endpoints: tuple[str, ...] = ()


def _valid_key(key: Any) -> bool:
    if not isinstance(key, str) or len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError, IndexError):  # z85.decode raises these on characters outside its alphabet
        return False


class PeerKeys:
    """The public keys of the registered services, as one service's link sees them.

    Readers (the ZAP handler, the inlets' per-message check) use dict lookups
    on maps that are replaced whole, never edited, so no lock is taken on the
    data path. A miss is looked up again at most every ``refresh_seconds``; a
    manager that does not answer leaves the maps as they are.
    """

    def __init__(self, link: ManagerLink, refresh_seconds: float = REFRESH_SECONDS,
                 grace_seconds: float = GRACE_SECONDS, clock: Any = time.monotonic) -> None:
        self.link = link
        self.refresh_seconds = refresh_seconds
        self.grace_seconds = grace_seconds
        self.clock = clock
        self.lookups = 0  # full lookups made (tests watch the rate limit with it)
        self._by_name: dict[str, tuple[Peer, float]] = {}
        self._by_key: dict[str, Peer] = {}
        self._by_endpoint: dict[str, Peer] = {}
        self._refreshed_at = -float("inf")
        self._lock = threading.Lock()  # one refresh at a time; readers never take it

    # ------------------------------------------------------------ learning
    def learn(self, services: Iterable[dict[str, Any]], complete: bool = False) -> None:
        """Take the keys of ``services`` (any lookup's answer). ``complete``:
        the answer is the whole topology, so services missing from it are
        forgotten once they have been missing for the grace period."""
        now = self.clock()
        with self._lock:
            by_name = dict(self._by_name)
            seen = set()
            for s in services:
                key = s.get(KEY_FIELD)
                name = s.get("name")
                if not isinstance(name, str) or not _valid_key(key):
                    continue
                seen.add(name)
                by_name[name] = (Peer(name, s.get("kind", ""), s.get("pipeline", ""), key,
                                      tuple(sorted(v for v in s.get("endpoints", {}).values() if isinstance(v, str)))),
                                 now)
            if complete:
                by_name = {n: (p, t) for n, (p, t) in by_name.items() if n in seen or now - t < self.grace_seconds}
            self._by_name = by_name
            self._by_key = {p.key: p for p, _ in by_name.values()}
            self._by_endpoint = {e: p for p, _ in sorted(by_name.values(), key=lambda pt: pt[1]) for e in p.endpoints}

    def refresh(self) -> bool:
        """Read the whole topology now; False if the manager did not answer."""
        self._refreshed_at = self.clock()
        self.lookups += 1
        try:
            services = self.link.lookup({})
        except (ManagerUnavailable, ValueError) as exc:
            log.debug("key refresh failed: %s", exc)
            return False
        self.learn(services, complete=True)
        return True

    def refresh_if_due(self, period: float) -> bool:
        """Refresh if the last one is ``period`` seconds old (False if none was made)."""
        if self.clock() - self._refreshed_at < period:
            return False
        return self.refresh()

    def next_refresh_at(self) -> float:
        """When the rate limit next allows a refresh (``clock`` time)."""
        return self._refreshed_at + self.refresh_seconds

    # ------------------------------------------------------------ asking
    def known(self, key: str | None) -> Peer | None:
        """The registered service holding ``key``, from the cache only (the data path)."""
        return self._by_key.get(key) if key else None

    def peer(self, key: str) -> Peer | None:
        """As :meth:`known`, looking the topology up again on a miss (rate-limited)."""
        found = self._by_key.get(key)
        if found is None and self.refresh_if_due(self.refresh_seconds):
            found = self._by_key.get(key)
        return found

    def server_key(self, endpoint: str) -> bytes | None:
        """The public key of the service registered with ``endpoint``. On a
        miss the topology is read again, waiting out the rate limit once: a
        client cannot connect without the key."""
        found = self._by_endpoint.get(endpoint)
        if found is None:
            wait = self.refresh_seconds - (self.clock() - self._refreshed_at)
            if wait > 0:
                time.sleep(min(wait, self.refresh_seconds))
            self.refresh()
            found = self._by_endpoint.get(endpoint)
        return found.key.encode("ascii") if found is not None else None


class KeyedLink:
    """A :class:`ManagerLink` whose every lookup also teaches a :class:`PeerKeys`
    the keys in its answer: a component's own lookups (its master, its
    sorter, its consumers) keep the keys of the peers it connects to current."""

    def __init__(self, link: ManagerLink, peers: PeerKeys) -> None:
        self.inner = link
        self.peers = peers

    def register(self, info: dict[str, Any]) -> dict[str, Any]:
        return self.inner.register(info)

    def heartbeat(self, name: str) -> dict[str, Any]:
        return self.inner.heartbeat(name)

    def deregister(self, name: str) -> None:
        self.inner.deregister(name)

    def lookup(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        services = self.inner.lookup(query)
        self.peers.learn(services, complete=not query)
        return services


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """Which registered services a bound socket admits: these ``kinds``, of
    ``pipeline`` (``""``: of any pipeline)."""

    kinds: frozenset[str]
    pipeline: str = ""

    def admits(self, peer: Peer) -> bool:
        return peer.kind in self.kinds and (not self.pipeline or peer.pipeline == self.pipeline)

    def describe(self) -> str:
        what = " or ".join(sorted(self.kinds))
        return f"registered {what}" + (f" of pipeline {self.pipeline}" if self.pipeline else "")


def rule(*kinds: str, pipeline: str = "") -> Rule:
    return Rule(frozenset(str(k) for k in kinds), pipeline)


def consumer_rule(pipeline: str) -> Rule:
    """What a consumer's ``data_in`` admits: the sorters of its pipeline (of
    every pipeline for a consumer registered with pipeline ""), and their
    masters, which send scan_abort themselves when the sorter is gone."""
    return rule(protocol.Kind.SORTER, protocol.Kind.MASTER, pipeline=pipeline)


#: Messages a consumer takes only from the sorter of the message's pipeline.
SORTER_ONLY = frozenset({codec.SCAN_START, codec.SCAN_END, codec.SCAN_ABORT, codec.RESULT, codec.GAP})


def check_consumer_sender(peer: Peer | None, msg: codec.Message) -> None:
    """A consumer takes scan control and results only from a registered sorter
    of the message's pipeline (``msg.stream``); ValueError otherwise. One
    exception: the pipeline's master sends scan_abort itself when its sorter
    is gone (pipelines/master.py ``_abort``), so a scan does not stay open."""
    if msg.type not in SORTER_ONLY:
        return
    if peer is None:
        raise ValueError("sender is not a registered service")
    if peer.pipeline == msg.stream and (peer.kind == protocol.Kind.SORTER or
                                        (peer.kind == protocol.Kind.MASTER and msg.type == codec.SCAN_ABORT)):
        return
    raise ValueError(f"sent by {peer.name} ({peer.kind} of pipeline {peer.pipeline!r}): a consumer takes scan "
                     f"control and results of pipeline {msg.stream!r} only from that pipeline's sorter")


class UnknownPeer(ValueError):
    """No registered service has the endpoint a client was asked to connect to."""


# --------------------------------------------------------------------------- one service


class Auth:
    """One service's side of authentication: its keypair, its view of the
    mesh's keys, and the rule of each socket it serves.

    ``link`` None (a component driven without a topology) or the mode ``off``:
    every helper leaves the sockets plain.
    """

    def __init__(self, link: ManagerLink | None, counters: Counters, name: str,
                 on: bool | None = None) -> None:
        self.name = name
        self.counters = counters
        self.on = link is not None and (enabled(link) if on is None else on)
        self.keys = Keypair.generate()
        self.peers: PeerKeys | None = PeerKeys(link) if self.on and link is not None else None
        self.link: ManagerLink | None = KeyedLink(link, self.peers) if self.peers is not None and link else link
        self.refused = 0  # peers refused by the gate on the sockets this service serves
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    @property
    def public_key(self) -> str:
        """The registration's ``curve_key`` ("" when running plain: nobody needs it)."""
        return self.keys.text if self.on else ""

    def registration_fields(self) -> dict[str, str]:
        return {KEY_FIELD: self.keys.text} if self.on else {}

    def serve(self, socket: zmq.Socket, admits: Rule, what: str, watch: bool = True) -> None:
        """Make ``socket`` a CURVE server admitting ``admits``; call before bind.
        ``watch``: the gate reads the socket's monitor for handshakes that fail
        before ZAP (a client without CURVE). ZeroMQ allows one monitor per
        socket: a socket with a :class:`services.dataplane.DropWatch` passes
        False and has the watch report them (:meth:`handshake_failed`)."""
        if not self.on:
            return
        socket.curve_server = True
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        _serve(socket, self, admits, what, watch)

    def handshake_failed(self, what: str, endpoint: str) -> None:
        """Count a client whose handshake failed before ZAP (seen on the socket's monitor)."""
        self.refuse(what, f"a client of {endpoint}",
                    "handshake failed (no CURVE, or not ZMTP): data-plane authentication is on")

    def connect(self, socket: zmq.Socket, endpoint: str, server_key: bytes | str | None = None) -> None:
        """Connect ``socket`` to ``endpoint`` as this service; the server's key
        is found by endpoint in the topology unless given. UnknownPeer if no
        registered service has that endpoint; the socket is closed then (it can
        serve nothing), so callers only drop their reference."""
        if self.on:
            assert self.peers is not None
            key = server_key.encode("ascii") if isinstance(server_key, str) else server_key
            key = key or self.peers.server_key(endpoint)
            if key is None:
                socket.close(0)
                raise UnknownPeer(f"no registered service has the endpoint {endpoint}: its key is unknown")
            socket.curve_serverkey = key
            socket.curve_publickey = self.keys.public
            socket.curve_secretkey = self.keys.secret
        socket.connect(endpoint)

    def sender(self, frame: zmq.Frame) -> Peer | None:
        """The registered service that sent ``frame`` (received with copy=False), from the cache."""
        if self.peers is None:
            return None
        try:
            key = frame.get("User-Id")
        except zmq.ZMQError:  # no such property: not received over an authenticated connection
            return None
        return self.peers.known(key)

    def refuse(self, what: str, peer: str, why: str) -> None:
        """Count one refused peer; log it once per peer and minute with the count since."""
        self.refused += 1
        now = time.monotonic()
        logged_at, since = self._logged.get((what, peer), (-float("inf"), 0))
        message = f"{self.name}: refused {peer} on {what}: {why}"
        if now - logged_at >= LOG_EVERY_SECONDS:
            self.counters.refused(message + (f" ({since} more refusals since the last report)" if since else ""),
                                  log=True)
            self._logged[(what, peer)] = (now, 0)
        else:
            self.counters.refused(message, log=False)
            self._logged[(what, peer)] = (logged_at, since + 1)
        if len(self._logged) > 10_000:  # a scan of many source addresses must not grow this without bound
            self._logged.clear()


# --------------------------------------------------------------------------- the ZAP handler


@dataclass
class _Served:
    auth: Auth
    admits: Rule
    what: str
    domain: bytes = b""
    socket: Any = None  # weakref to the served socket: the entry ends when it is closed
    monitor: zmq.Socket | None = None


@dataclass
class _Gate:
    """The ZAP handler of one ZeroMQ context, for every socket it serves.

    ZeroMQ asks it about each CURVE handshake on a served socket (the socket's
    ZAP domain names it); it answers from the service's :class:`PeerKeys` and
    counts refusals. It also reads each served socket's monitor, where a
    handshake that failed before ZAP (a client without CURVE) shows.
    """

    context: zmq.Context
    domains: dict[bytes, _Served] = field(default_factory=dict)
    _new: queue.Queue = field(default_factory=queue.Queue)
    #: requests with an unknown key, waiting for the next topology read: (due, attempt, served, route, ...)
    _pending: list[tuple[Any, ...]] = field(default_factory=list)

    finished: bool = False

    def __post_init__(self) -> None:
        self.socket = self.context.socket(zmq.ROUTER)  # not REP: a request may wait while later ones are answered
        self.socket.linger = 0
        self.socket.bind(ZAP_ENDPOINT)  # before any served socket binds: ZeroMQ then asks for every handshake
        self._thread = threading.Thread(target=self._run, name="zap-gate", daemon=True)
        self._thread.start()

    def _retire_if_idle(self, monitors: dict[zmq.Socket, _Served]) -> bool:
        """Once no socket it serves is open, the gate ends (a later serve starts a new one)."""
        if monitors or self._pending:
            return False
        with _gates_lock:
            if self.domains:
                return False
            if not self._new.empty():
                return False
            self.finished = True
            if _gates.get(id(self.context)) is self:
                del _gates[id(self.context)]
            self.socket.unbind(ZAP_ENDPOINT)  # synchronous, unlike close: the next gate binds it at once
            self.socket.close(0)
        return True

    def add(self, socket: zmq.Socket, auth: Auth, admits: Rule, what: str, watch: bool) -> None:
        # numbered for the process's life: a gate's id(self) comes back once it is freed, while a monitor
        # of its last socket may still be bound to the address made from it
        domain = f"tangomesh-zap-{os.getpid()}-{next(_domains)}".encode()
        socket.zap_domain = domain
        served = _Served(auth, admits, what, domain, weakref.ref(socket))
        if watch:
            # an address of its own: pyzmq's default names it by the socket's fd, which a new socket may
            # reuse while this monitor still waits for the gate to read its last event
            served.monitor = socket.get_monitor_socket(HANDSHAKE_FAILURES | zmq.EVENT_MONITOR_STOPPED,
                                                       addr=f"inproc://{domain.decode()}-monitor")
        self.domains[domain] = served
        self._new.put(served)

    def _run(self) -> None:
        try:
            import tango
            ensure: Any = tango.EnsureOmniThread()  # a Tango client call from a thread of a device server
        except (ImportError, AttributeError):
            import contextlib
            ensure = contextlib.nullcontext()
        with ensure:
            self._loop()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        monitors: dict[zmq.Socket, _Served] = {}
        while True:
            if self._retire_if_idle(monitors):
                return
            while not self._new.empty():
                served = self._new.get()
                if served.monitor is not None:
                    monitors[served.monitor] = served
                    poller.register(served.monitor, zmq.POLLIN)
            for domain, served in list(self.domains.items()):  # a served socket closed: its entry ends
                sock = served.socket()
                if sock is None or sock.closed:
                    self.domains.pop(domain, None)
                    if served.monitor in monitors:
                        poller.unregister(served.monitor)
                        served.monitor.close(0)
                        del monitors[served.monitor]
            wait = min([200.0, *((due - time.monotonic()) * 1000 for due, *_ in self._pending)])
            try:
                ready = dict(poller.poll(max(1, int(wait))))
            except zmq.ContextTerminated:
                break
            try:
                if self.socket in ready:
                    self._answer(self.socket.recv_multipart())
                self._answer_pending()
                for monitor in [m for m in monitors if m in ready]:
                    if self._monitor_event(monitors[monitor]):
                        poller.unregister(monitor)
                        monitor.close(0)
                        del monitors[monitor]
                for auth in {id(s.auth): s.auth for s in list(self.domains.values())}.values():
                    if auth.peers is not None:
                        auth.peers.refresh_if_due(STALE_SECONDS)
            except zmq.ContextTerminated:
                break
            except Exception:  # the gate must outlive any surprise, or every handshake waits on it
                log.exception("ZAP handler step failed")
        for monitor in monitors:  # the context is terminating: it waits for every socket to close
            monitor.close(0)
        self.socket.close(0)

    def _answer(self, request: list[bytes]) -> None:
        """One ZAP request (ROUTER framing: routing id, empty delimiter, then RFC 27's frames)."""
        if len(request) < 8 or request[1] != b"":
            log.error("malformed ZAP request of %d frames", len(request))
            if len(request) >= 4:
                self.socket.send_multipart([request[0], b"", b"1.0", request[3], b"500", b"malformed", b"", b""])
            return
        route, _, version, request_id, domain, address, _identity, mechanism, *credentials = request
        served = self.domains.get(domain)
        if served is None or mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            # a socket we do not serve (someone set a domain of their own), or not CURVE: refuse
            return self._reply(route, version, request_id, None)
        key = z85.encode(credentials[0]).decode("ascii")
        assert served.auth.peers is not None
        peer = served.auth.peers.peer(key)
        if peer is None:
            # perhaps registering right now (a service connects as soon as it starts): decide after the
            # topology has been read again, at the rate limit's pace, a few times; the handshake waits
            due = served.auth.peers.next_refresh_at()
            self._pending.append((due, 1, served, route, version, request_id, address, key))
            return
        self._decide(served, peer, route, version, request_id, address, key)

    def _answer_pending(self) -> None:
        now = time.monotonic()
        due_now = [p for p in self._pending if p[0] <= now]
        if not due_now:
            return
        self._pending = [p for p in self._pending if p[0] > now]
        for _, attempt, served, route, version, request_id, address, key in due_now:
            assert served.auth.peers is not None
            peer = served.auth.peers.known(key)
            if peer is None and served.auth.peers.refresh_if_due(served.auth.peers.refresh_seconds):
                peer = served.auth.peers.known(key)
            if peer is None and attempt < UNKNOWN_KEY_ATTEMPTS:
                self._pending.append((served.auth.peers.next_refresh_at(), attempt + 1, served, route, version,
                                      request_id, address, key))
                continue
            self._decide(served, peer, route, version, request_id, address, key)

    def _decide(self, served: _Served, peer: Peer | None, route: bytes, version: bytes, request_id: bytes,
                address: bytes, key: str) -> None:
        if peer is not None and served.admits.admits(peer):
            return self._reply(route, version, request_id, key)
        why = (f"key {key[:8]}... is not a registered service's" if peer is None
               else f"{peer.name} is a {peer.kind} of pipeline {peer.pipeline!r}, not a {served.admits.describe()}")
        served.auth.refuse(served.what, f"{address.decode(errors='replace')} ({key[:8]}...)", why)
        self._reply(route, version, request_id, None)

    def _reply(self, route: bytes, version: bytes, request_id: bytes, key: str | None) -> None:
        """200 with the key as User-Id (receivers read it off each message), or 400."""
        if key is not None:
            self.socket.send_multipart([route, b"", version, request_id, b"200", b"OK", key.encode("ascii"), b""])
        else:
            self.socket.send_multipart([route, b"", version, request_id, b"400", b"not admitted", b"", b""])

    def _monitor_event(self, served: _Served) -> bool:
        """Handle one monitor event; True once the served socket has closed."""
        event = recv_monitor_message(served.monitor)
        if event["event"] == zmq.EVENT_MONITOR_STOPPED:
            return True
        served.auth.handshake_failed(served.what, event["endpoint"].decode(errors="replace"))
        return False


_gates: dict[int, _Gate] = {}  # by id of the context (a gate keeps its context alive while it runs)
_gates_lock = threading.Lock()


def _serve(socket: zmq.Socket, auth: Auth, admits: Rule, what: str, watch: bool) -> None:
    """Hand ``socket`` to its context's gate, starting one if none runs."""
    with _gates_lock:
        gate = _gates.get(id(socket.context))
        if gate is None or gate.finished or gate.context is not socket.context:
            gate = _gates[id(socket.context)] = _Gate(socket.context)
        gate.add(socket, auth, admits, what, watch)
