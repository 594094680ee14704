"""The Tango face of the ingesters: EigerIngester (DECTRIS SIMPLON stream v1/v2).

A thin device over :class:`ingesters.eiger.EigerComponent`: properties
become its config, attributes read its counters. The masters' ``OpenScans``
are read through Tango here, once per detector series, never per frame.
"""

from __future__ import annotations

import json
from typing import Any

from tango.server import attribute
from tango.utils import PyTangoThread

from ingesters.eiger import EigerComponent, EigerConfig
from services.device import MeshDevice, config_property, console_script
from services.registration import master_proxy


class EigerIngester(MeshDevice):
    """A DECTRIS EIGER / EIGER2 / PILATUS4 stream (SIMPLON v1 or v2) as one tangomesh source stream."""

    DetectorEndpoint = config_property(
        EigerConfig, "endpoint", doc="The detector's stream: tcp://DCU:9999 (stream v1) or tcp://DCU:31001 (v2)")
    Stream = config_property(EigerConfig, "stream", doc="Stream name on the data plane (as the scan document says)")
    Pipelines = config_property(EigerConfig, "pipelines", doc="Pipelines fed; default: the Pipeline property")
    BlockFrames = config_property(
        EigerConfig, "block_frames", doc="Most frames per block; fewer when the detector has sent nothing more")
    ScanWaitSeconds = config_property(
        EigerConfig, "scan_wait", doc="How long a new series waits for an open scan taking the stream, then is refused")

    component: EigerComponent

    def create_component(self) -> EigerComponent:
        pipelines = tuple(self.Pipelines) or ((self.Pipeline,) if self.Pipeline else ())
        config = self.config_from_properties(EigerConfig, pipelines=pipelines)
        link = self.create_link()

        def open_scans(pipeline: str) -> list[dict[str, Any]]:
            return json.loads(master_proxy(link, pipeline, timeout_ms=3000).OpenScans)

        return EigerComponent(self.get_name(), config, link, self.advertised_host, open_scans, PyTangoThread)

    @attribute(dtype=int, doc="Series number of the latest series start (-1: none yet)")
    def Series(self) -> int:
        return self.component.series

    @attribute(dtype=str, doc="Scan the open series feeds ('' when none is open)")
    def CurrentScan(self) -> str:
        return self.component.current_scan

    @attribute(dtype=int, doc="Frames sent on")
    def Frames(self) -> int:
        return self.component.mapper.frames

    @attribute(dtype=int, doc="Acquisition indices declared missing (frames the detector skipped or never sent)")
    def GapPoints(self) -> int:
        return self.component.mapper.gap_points

    @attribute(dtype=int, doc="Series refused: no open scan took the stream within ScanWaitSeconds")
    def RefusedSeries(self) -> int:
        return self.component.refused_series

    @attribute(dtype=int, doc="Frames discarded with refused series")
    def DiscardedFrames(self) -> int:
        return self.component.mapper.drained

    @attribute(dtype=int, doc="Series that started while another was open (the detector restarted)")
    def Restarts(self) -> int:
        return self.component.restarts

    @attribute(dtype=float, doc="Time spent waiting for the masters to take blocks (backpressure)", unit="s")
    def BlockedSeconds(self) -> float:
        return self.component.blocked_seconds


main = console_script(EigerIngester)
