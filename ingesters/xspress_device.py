"""The Tango face of the Xspress3 ingester: XspressIngester (MAX IV ``xspress3-streamer`` ZeroMQ stream).

A thin device over :class:`ingesters.xspress_component.XspressComponent`, like
:class:`ingesters.devices.EigerIngester` over the EIGER's: properties become
its config, attributes read its counters; the masters' ``OpenScans`` are read
through Tango once per series, never per frame. Run as the console script
``XspressIngester <instance>`` or ``python -m ingesters.xspress_device <instance>``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tango.server import attribute
from tango.utils import PyTangoThread

from ingesters.xspress_component import XspressComponent, XspressConfig
from services.device import MeshDevice, config_property, console_script, run_server
from services.registration import master_proxy


class XspressIngester(MeshDevice):
    """An Xspress3 / Xspress3 Mini stream (MAX IV xspress3-streamer, ZeroMQ PUB) as one tangomesh source stream."""

    StreamerEndpoint = config_property(
        XspressConfig, "endpoint",
        doc="The xspress3-streamer's ZeroMQ PUB, tcp://host:port (the port the streamer device publishes on)")
    Stream = config_property(XspressConfig, "stream", doc="Stream name on the data plane (as the scan document says)")
    Pipelines = config_property(XspressConfig, "pipelines", doc="Pipelines fed; default: the Pipeline property")
    BlockFrames = config_property(
        XspressConfig, "block_frames", doc="Most frames per block; fewer when the streamer has sent nothing more")
    ScanWaitSeconds = config_property(
        XspressConfig, "scan_wait",
        doc="How long a new series waits for an open scan taking the stream, then is refused")
    ChannelsKept = config_property(
        XspressConfig, "channels", doc="Detector channels kept, in this order (0-based); empty keeps all")

    component: XspressComponent

    def create_component(self) -> XspressComponent:
        pipelines = tuple(self.Pipelines) or ((self.Pipeline,) if self.Pipeline else ())
        config = self.config_from_properties(XspressConfig, pipelines=pipelines)
        link = self.create_link()

        def open_scans(pipeline: str) -> list[dict[str, Any]]:
            return json.loads(master_proxy(link, pipeline, timeout_ms=3000).OpenScans)

        return XspressComponent(self.get_name(), config, link, self.advertised_host, open_scans, PyTangoThread)

    @attribute(dtype=int, doc="Number of the latest series start as this ingester counts them (-1: none yet)")
    def Series(self) -> int:
        return self.component.series

    @attribute(dtype=str, doc="Scan the open series feeds ('' when none is open)")
    def CurrentScan(self) -> str:
        return self.component.current_scan

    @attribute(dtype=int, doc="Frames sent on")
    def Frames(self) -> int:
        return self.component.mapper.frames

    @attribute(dtype=int, doc="Acquisition indices declared missing (frames that never arrived)")
    def GapPoints(self) -> int:
        return self.component.mapper.gap_points

    @attribute(dtype=int, doc="Series refused: no open scan took the stream within ScanWaitSeconds")
    def RefusedSeries(self) -> int:
        return self.component.refused_series

    @attribute(dtype=int, doc="Frames discarded with refused series")
    def DiscardedFrames(self) -> int:
        return self.component.mapper.drained

    @attribute(dtype=int, doc="Series that started while another was open (the streamer restarted)")
    def Restarts(self) -> int:
        return self.component.restarts

    @attribute(dtype=float, doc="Time spent waiting for the masters to take blocks (backpressure)", unit="s")
    def BlockedSeconds(self) -> float:
        return self.component.blocked_seconds


main = console_script(XspressIngester)

if __name__ == "__main__":  # python -m ingesters.xspress_device <instance>: the server is still XspressIngester
    run_server((XspressIngester,), ["XspressIngester", *sys.argv[1:]])
