"""The Tango face of the Xspress3 ingester: XspressIngester (MAX IV ``xspress3-streamer`` ZeroMQ stream).

A thin device over :class:`ingesters.xspress_component.XspressComponent`, like
:class:`ingesters.devices.EigerIngester` over the EIGER's: properties become
its config, attributes read its counters; the masters' ``OpenScans`` are read
through Tango once per series, never per frame. Run as the console script
``XspressIngester <instance>`` or ``python -m ingesters.xspress_device <instance>``.
"""

from __future__ import annotations

import sys

from tango.utils import PyTangoThread

from ingesters.xspress_component import XspressComponent, XspressConfig
from ingesters.devices import SeriesIngester, open_scans_of
from services.device import config_property, console_script, run_server


class XspressIngester(SeriesIngester):
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
        return XspressComponent(self.get_name(), config, link, self.advertised_host, open_scans_of(link),
                                PyTangoThread)


main = console_script(XspressIngester)

if __name__ == "__main__":  # python -m ingesters.xspress_device <instance>: the server is still XspressIngester
    run_server((XspressIngester,), ["XspressIngester", *sys.argv[1:]])
