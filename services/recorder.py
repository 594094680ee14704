"""Recorder: a consumer that keeps a summary of every message it receives.

It is the tap that staff attach to a pipeline while commissioning ("what is
actually arriving?") and the recording consumer of the end-to-end tests: one
record per message with its header fields and, per array, dtype, shape and sum.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import zmq
from tango.server import attribute, command
from tango.utils import PyTangoThread

from services import codec, protocol, security
from services.component import Component
from services.dataplane import PullInlet
from services.device import MeshDevice, config_property, console_script
from services.registration import ManagerLink

log = logging.getLogger("tangomesh.recorder")


def _total(a: Any) -> float | list[float]:
    total = a.sum() if a.size else a.dtype.type(0)
    return [float(total.real), float(total.imag)] if a.dtype.kind == "c" else float(total)


def summarise(msg: codec.Message) -> dict[str, Any]:
    return {
        "type": msg.type,
        "scan": msg.scan,
        "stream": msg.stream,
        "index": msg.index,
        "count": msg.count,
        "arrays": {
            name: {"dtype": a.dtype.str, "shape": list(a.shape), "sum": _total(a)}
            for name, a in msg.arrays.items()
        },
    }


@dataclass(frozen=True)
class RecorderConfig:
    max_records: int = 100_000  # the newest records kept; older ones go first

    def __post_init__(self) -> None:
        if self.max_records < 1:
            raise ValueError("MaxRecords must be at least 1")


class RecorderComponent(Component):
    kind = protocol.Kind.RECORDER

    def __init__(
        self,
        name: str,
        pipeline: str,
        bind_host: str,
        advertised_host: str,
        config: RecorderConfig,
        thread_factory: Callable[..., threading.Thread] = threading.Thread,
        link: ManagerLink | None = None,
    ) -> None:
        super().__init__(name, pipeline, log)
        self.auth = security.Auth(link, self.counters, name)
        self.config = config
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=config.max_records)
        self.total = 0
        self._context = zmq.Context.instance()
        self.inlet = PullInlet(
            self._context, bind_host, advertised_host, self._record, self.counters, thread_factory, name="recorder-in",
            auth=self.auth, admits=security.consumer_rule(pipeline), check_sender=security.check_consumer_sender,
        )
        self.endpoints = {"data_in": self.inlet.endpoint}

    def start(self) -> None:
        self.inlet.start()

    def stop(self) -> None:
        super().stop()
        self.inlet.stop()

    def _record(self, msg: codec.Message) -> None:
        self.records.append(summarise(msg))
        self.total += 1

    def clear(self) -> None:
        self.records.clear()
        self.total = 0


class Recorder(MeshDevice):
    """Consumer that records a summary of every data-plane message."""

    MaxRecords = config_property(RecorderConfig, "max_records", doc="Records kept in memory (oldest go first)")

    component: RecorderComponent

    def create_component(self) -> RecorderComponent:
        return RecorderComponent(
            self.get_name(), self.Pipeline, self.bind_host, self.advertised_host,
            self.config_from_properties(RecorderConfig), PyTangoThread, self.create_link()
        )

    @attribute(dtype=int, doc="Messages recorded since start or Clear")
    def RecordCount(self) -> int:
        return self.component.total

    @command(dtype_in=int, doc_in="how many of the latest records (0: all kept)", dtype_out=str, doc_out="JSON list")
    def LatestRecords(self, n: int) -> str:
        records = list(self.component.records)
        return json.dumps(records[-n:] if n > 0 else records)

    @command
    def Clear(self) -> None:
        self.component.clear()


main = console_script(Recorder)
