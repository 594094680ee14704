"""The sink's query endpoint: one ROUTER socket, codec ``query``/``reply`` messages.

A query is a codec message of type ``query`` whose meta is a document valid
against ``services/schemas/sink-query.json``; the reply is a ``reply`` message
whose meta is ``{"ok": true, "result": {...}}`` and whose arrays carry the data
(a product or a slice of it goes out without a copy), or
``{"ok": false, "error": "...", "evicted": bool}``. Clients use a DEALER (as
:class:`SinkClient` does) or a REQ socket; both work.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import numpy as np
import zmq

from services import codec, protocol
from services.component import Counters
from services.dataplane import DATA_MAX_FRAME_BYTES, BoundSocketThread, limit_frames
from services.registration import ManagerLink
from services.schema import SchemaError, validate
from sink.store import EvictedError, ScanStore, StoreError

log = logging.getLogger("tangomesh.sink.query")

SCHEMA = "sink-query"
QUERY = "query"  # role of the endpoint in the service's registration


class QueryError(RuntimeError):
    """The sink answered with an error (or not at all); the message is its answer."""

    def __init__(self, message: str, evicted: bool = False) -> None:
        super().__init__(message)
        self.evicted = evicted


def answer(store: ScanStore, query: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The result meta and arrays for a query; SchemaError or StoreError otherwise."""
    validate(SCHEMA, query)
    op = query["op"]
    if op == "list":
        return {"scans": store.list_scans(), "evicted": list(store.evicted)[-100:]}, {}
    if op == "stats":
        return store.stats(), {}
    if op == "info":
        return store.info(query["scan"]), {}
    if op == "latest":
        indices, values = store.latest(query["scan"], query["product"], query["n"])
        return {"scan": query["scan"], "product": query["product"], "points": len(indices)}, \
            {"indices": indices, "values": values}
    if "reduce" in query:
        entry, product, value, points = store.reduced(query["scan"], query["product"], query["reduce"])
        return {"scan": entry.scan_id, "product": product.name, "version": product.version, "points": points,
                "shape": list(value.shape), "reduce": query["reduce"]}, {"data": value}
    if "regrid" in query:
        entry, product, data = store.regridded(query["scan"], query["product"], query["regrid"])
    elif store.derivable(query["scan"], query["product"]):
        # asked while the scan runs: computed from its inputs as they are now (sink.derived)
        pipeline, _, result = query["product"].partition("/")
        data = store.derive(query["scan"], pipeline, result)
        entry = store.entry(query["scan"])
        return {"scan": entry.scan_id, "product": query["product"], "version": entry.version,
                "shape": list(data.shape), "rows": None, "cols": None, "regrid": None}, {"data": data}
    else:
        entry, product = store.product(query["scan"], query["product"])
        data = product.data
    selection = []
    for axis, key in enumerate(("rows", "cols")):
        if key not in query:
            selection.append(slice(None))
            continue
        if axis >= data.ndim:
            raise StoreError(f"{key} given for the {data.ndim}-D product {product.name}")
        start, stop = query[key]
        if not start < stop <= data.shape[axis]:
            raise StoreError(f"{key} [{start}, {stop}) is outside [0, {data.shape[axis]}] of {product.name}")
        selection.append(slice(start, stop))
    view = data[tuple(selection[:data.ndim])]
    return {"scan": entry.scan_id, "product": product.name, "version": product.version,
            "shape": list(data.shape), "rows": query.get("rows"), "cols": query.get("cols"),
            "regrid": query.get("regrid")}, {"data": view}


class QueryServer(BoundSocketThread):
    """Answers queries on one thread; a bad query gets an error reply, is
    counted and logged, and the loop goes on."""

    def __init__(self, context: zmq.Context, bind_host: str, advertised_host: str, store: ScanStore,
                 counters: Counters, thread_factory: Callable[..., threading.Thread] = threading.Thread) -> None:
        self.store = store
        self.counters = counters
        self.answered = 0
        super().__init__(context, zmq.ROUTER, bind_host, advertised_host, thread_factory, "sink-query")

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(100):
                continue
            frames = codec.recv_frames(self.socket)
            envelope = [frames[0]]
            body = frames[1:]
            if body and len(body[0]) == 0:  # a REQ client's delimiter
                envelope.append(body.pop(0))
            try:
                reply = self._reply(body)
            except Exception as exc:  # a bug must not end the endpoint
                log.exception("query failed")
                reply = codec.Message(codec.REPLY, meta={"ok": False, "error": f"internal error: {exc!r}"})
            try:
                codec.send(self.socket, reply, zmq.NOBLOCK, prefix=envelope)
            except codec.CodecError as exc:
                self.counters.error(f"query reply not encodable: {exc}")
                codec.send(self.socket, codec.Message(codec.REPLY, meta={"ok": False, "error": str(exc)}),
                           zmq.NOBLOCK, prefix=envelope)
            except zmq.Again:
                self.counters.error("query reply dropped: the client is not reading")

    def _reply(self, body: list[Any]) -> codec.Message:
        try:
            msg = codec.decode(body)
            if msg.type != codec.QUERY:
                raise StoreError(f"the query endpoint takes 'query' messages, not {msg.type!r}")
            meta, arrays = answer(self.store, msg.meta)
        except EvictedError as exc:
            return codec.Message(codec.REPLY, meta={"ok": False, "error": str(exc), "evicted": True})
        except (codec.CodecError, SchemaError, StoreError) as exc:
            self.counters.error(f"refused query: {exc}")
            return codec.Message(codec.REPLY, meta={"ok": False, "error": str(exc), "evicted": False})
        self.answered += 1
        return codec.Message(codec.REPLY, meta={"ok": True, "result": meta}, arrays=arrays)


class SinkClient:
    """Questions to a sink's query endpoint, one at a time."""

    def __init__(self, endpoint: str, timeout: float = 10.0, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout * 1000)
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            self._socket = self._context.socket(zmq.DEALER)
            self._socket.linger = 0
            limit_frames(self._socket, DATA_MAX_FRAME_BYTES)  # a reply holds a product's array
            self._socket.connect(self.endpoint)
        return self._socket

    def request(self, op: str, **fields: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The result meta and arrays; QueryError with the sink's message otherwise."""
        sock = self._connect()
        codec.send(sock, codec.Message(codec.QUERY, meta={"op": op, **fields}))
        if not sock.poll(self.timeout_ms):
            self.close()  # a late reply must not answer the next question
            raise QueryError(f"no answer from the sink at {self.endpoint} within {self.timeout_ms / 1000:g} s")
        reply = codec.recv(sock)
        if reply.type != codec.REPLY:
            raise QueryError(f"the sink answered with a {reply.type!r} message")
        if not reply.meta.get("ok"):
            raise QueryError(str(reply.meta.get("error", "unknown error")), bool(reply.meta.get("evicted")))
        return reply.meta.get("result", {}), reply.arrays

    def list(self) -> dict[str, Any]:
        return self.request("list")[0]

    def info(self, scan: str) -> dict[str, Any]:
        return self.request("info", scan=scan)[0]

    def stats(self) -> dict[str, Any]:
        return self.request("stats")[0]

    def get(self, scan: str, product: str, rows: tuple[int, int] | None = None,
            cols: tuple[int, int] | None = None, regrid: str | None = None, reduce: str | None = None) -> np.ndarray:
        """A product or a slice; with ``regrid`` (a pipeline delivering corrected
        positions, e.g. ``"position"``) resampled onto the nominal grid first;
        with ``reduce="sum"`` the running sum of a 1-D product over its points."""
        fields: dict[str, Any] = {"scan": scan, "product": product}
        if reduce is not None:
            fields["reduce"] = reduce
        if regrid is not None:
            fields["regrid"] = regrid
        if rows is not None:
            fields["rows"] = list(rows)
        if cols is not None:
            fields["cols"] = list(cols)
        return self.request("get", **fields)[1]["data"]

    def latest(self, scan: str, product: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self.request("latest", scan=scan, product=product, n=n)[1]
        return arrays["indices"], arrays["values"]

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None


def find_sinks(link: ManagerLink) -> list[dict[str, Any]]:
    """Registered sinks with a query endpoint, by name."""
    return sorted((s for s in link.lookup({"kind": protocol.Kind.SINK}) if QUERY in s.get("endpoints", {})),
                  key=lambda s: s["name"])
