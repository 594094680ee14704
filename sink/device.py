"""The Sink Tango device: properties, attributes and commands over SinkComponent.

Change events (pushed by the device, at the viewer rate, only when a value
changed): ``CurrentScan``, ``PointsExpected``, ``PointsReceived``,
``Progress`` and the ``Preview`` image of the product chosen with
``PreviewProduct`` (Lavue's ``tangoevents`` source, Taurus, Jive).
"""

from __future__ import annotations

import json
import math

import numpy as np
from tango import AttrWriteType
from tango.server import attribute, command, device_property
from tango.utils import PyTangoThread

from services.device import MeshDevice, config_property, console_script, throw_invalid
from sink.component import SinkComponent, SinkConfig
from sink.store import StoreError
from sink.views import preview_image

PREVIEW_MAX_SIDE = 2048
EVENT_ATTRIBUTES = ("CurrentScan", "PointsExpected", "PointsReceived", "Progress", "Preview", "PreviewName")


class Sink(MeshDevice):
    """Keeps the latest scans in memory as maps; answers queries; feeds Lavue."""

    MemoryBudgetBytes = config_property(
        SinkConfig, "budget_bytes", doc="Bytes of product arrays kept; least recently used scans go first")
    ViewerRateHz = config_property(
        SinkConfig, "viewer_rate_hz", doc="Most pictures per second per Lavue topic and Tango preview")
    DatasourcesSeconds = config_property(
        SinkConfig, "announce_seconds", doc="Period of the Lavue datasources announcement (also sent on change)")
    StaleScanSeconds = config_property(
        SinkConfig, "stale_seconds", doc="A scan still open but idle this long may be evicted")
    PreviewMaxSide = device_property(dtype=int, default_value=512,
                                     doc=f"Largest side of the Preview image (decimated above; at most {PREVIEW_MAX_SIDE})")
    ViewerHwm = config_property(SinkConfig, "viewer_hwm", doc="Send high-water mark of the Lavue stream")

    component: SinkComponent

    def init_device(self) -> None:
        self._preview_product = ""
        self._preview = np.full((1, 1), np.nan)
        self._preview_name = ""
        self._preview_state: tuple = ()
        self._progress = ("", 0, 0)
        self._events_at = -math.inf
        super().init_device()
        for name in EVENT_ATTRIBUTES:
            self.set_change_event(name, True, False)

    def create_component(self) -> SinkComponent:
        if not 1 <= self.PreviewMaxSide <= PREVIEW_MAX_SIDE:
            raise ValueError(f"PreviewMaxSide must be in [1, {PREVIEW_MAX_SIDE}]")
        return SinkComponent(self.get_name(), self.Pipeline, self.bind_host, self.advertised_host,
                             self.config_from_properties(SinkConfig), PyTangoThread, on_refresh=self._refresh_events,
                             link=self.create_link())

    # ------------------------------------------------------------ events (viewer thread)
    def _refresh_events(self, now: float) -> None:
        if now - self._events_at < 1.0 / self.ViewerRateHz:
            return
        self._events_at = now
        p = self.component.progress()
        if (p.scan, p.expected, p.received) != self._progress:
            scan_changed = p.scan != self._progress[0]
            self._progress = (p.scan, p.expected, p.received)
            if scan_changed:
                self.push_change_event("CurrentScan", p.scan)
                self.push_change_event("PointsExpected", p.expected)
            self.push_change_event("PointsReceived", p.received)
            self.push_change_event("Progress", p.received / p.expected if p.expected else 0.0)
        topic = self._chosen_topic()
        if not topic:
            return
        live = self.component.live_products().get(topic)
        state = (topic, live[0].scan_id, live[1].version) if live else ()
        if state == self._preview_state:
            return
        frame = self.component.frame(topic)
        if frame is None:
            return
        self._preview = preview_image(frame, self.PreviewMaxSide)
        self._preview_name = frame.meta["name"]
        self._preview_state = state
        self.push_change_event("Preview", self._preview)
        self.push_change_event("PreviewName", self._preview_name)

    def _chosen_topic(self) -> str:
        topics = self.component.topics
        if self._preview_product in topics:
            return self._preview_product
        return topics[0] if topics and not self._preview_product else ""

    # ------------------------------------------------------------ attributes
    @attribute(dtype=str, doc="Latest scan received")
    def CurrentScan(self) -> str:
        return self.component.progress().scan

    @attribute(dtype=int, doc="Points the current scan will have")
    def PointsExpected(self) -> int:
        return self.component.progress().expected

    @attribute(dtype=int, doc="Points of the current scan received from every pipeline")
    def PointsReceived(self) -> int:
        return self.component.progress().received

    @attribute(dtype=float, doc="PointsReceived / PointsExpected", format="%.3f")
    def Progress(self) -> float:
        p = self.component.progress()
        return p.received / p.expected if p.expected else 0.0

    @attribute(dtype=int, doc="Bytes of the scans held (the budget's accounting)", unit="B")
    def ResidentBytes(self) -> int:
        return self.component.store.resident

    @attribute(dtype=int, doc="Most bytes held at once since start", unit="B")
    def PeakBytes(self) -> int:
        return self.component.store.peak

    @attribute(dtype=int, doc="MemoryBudgetBytes in force", unit="B")
    def BudgetBytes(self) -> int:
        return self.component.store.budget

    @attribute(dtype=int, doc="Scans held")
    def ScanCount(self) -> int:
        return len(self.component.store.scans)

    @attribute(dtype=int, doc="Scans evicted to stay within the budget")
    def Evictions(self) -> int:
        return self.component.store.evictions

    @attribute(dtype=int, doc="Products refused because they did not fit the budget")
    def RefusedProducts(self) -> int:
        return self.component.store.refused_products

    @attribute(dtype=(str,), max_dim_x=4096, doc="Live products (Lavue topics) of the latest scans")
    def Products(self) -> list[str]:
        return self.component.topics

    @attribute(dtype=str, doc="host:port of the Lavue ZMQ stream (topic: host:port:<product>)")
    def LavueAddress(self) -> str:
        return self.component.lavue.address

    @attribute(dtype=str, access=AttrWriteType.READ_WRITE, memorized=True, hw_memorized=True,
               doc="Product shown by Preview (e.g. counters/i1_norm); empty: the first live product")
    def PreviewProduct(self) -> str:
        return self._preview_product

    @PreviewProduct.write
    def PreviewProduct(self, value: str) -> None:
        value = value.strip()
        if value and value not in self.component.topics and self.component.topics:
            throw_invalid(f"no live product {value!r}; live: {', '.join(self.component.topics)}",
                          "Sink.PreviewProduct")
        self._preview_product = value
        self._preview_state = ()

    @attribute(dtype=((float,),), max_dim_x=PREVIEW_MAX_SIDE, max_dim_y=PREVIEW_MAX_SIDE,
               doc="Preview of PreviewProduct for the current scan (rows = slow axis; decimated to PreviewMaxSide)")
    def Preview(self) -> np.ndarray:
        return self._preview

    @attribute(dtype=str, doc="Scan, product and version shown by Preview")
    def PreviewName(self) -> str:
        return self._preview_name

    # ------------------------------------------------------------ commands
    @command(dtype_out=str, doc_out="JSON list of the scans held: status, points, sizes")
    def ListScans(self) -> str:
        return json.dumps(self.component.store.list_scans())

    @command(dtype_in=str, doc_in="scan id", dtype_out=str,
             doc_out="JSON: counts, status, products with shapes and dtypes, and the scan metadata")
    def ScanInfo(self, scan: str) -> str:
        try:
            return json.dumps(self.component.store.info(scan.strip()))
        except StoreError as exc:
            self.component.counters.error(f"ScanInfo refused: {exc}")
            throw_invalid(str(exc), "Sink.ScanInfo")


main = console_script(Sink)
