"""The Tango face of the ingesters: EigerIngester (DECTRIS SIMPLON stream v1/v2), PcapIngester (PandABox PCAP).

Thin devices over :class:`ingesters.eiger.EigerComponent` and
:class:`ingesters.panda.PcapComponent`: properties become their config,
attributes read their counters. The masters' ``OpenScans`` are read through
Tango here, once per detector series or capture, never per frame.
"""

from __future__ import annotations

import json
from typing import Any

from tango.server import attribute, command
from tango.utils import PyTangoThread

from ingesters.eiger import EigerComponent, EigerConfig
from ingesters.panda import PcapComponent, PcapConfig, RepublishComponent
from ingesters.replay import FileComponent, FileConfig
from services.device import MeshDevice, config_property, console_script, throw_invalid
from services.registration import ManagerLink, master_proxy


def open_scans_of(link: ManagerLink):
    """How an ingester reads a pipeline master's ``OpenScans`` (once per series or capture)."""
    def open_scans(pipeline: str) -> list[dict[str, Any]]:
        return json.loads(master_proxy(link, pipeline, timeout_ms=3000).OpenScans)

    return open_scans


class SeriesIngester(MeshDevice):
    """What every ingester of a frame-numbered series stream shows (EIGER, Xspress3):
    the attributes read the component's series mapper and counters."""

    @attribute(dtype=int, doc="Number of the latest series start (-1: none yet)")
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

    @attribute(dtype=int, doc="Series that started while another was open (the detector or streamer restarted)")
    def Restarts(self) -> int:
        return self.component.restarts

    @attribute(dtype=float, doc="Time spent waiting for the masters to take blocks (backpressure)", unit="s")
    def BlockedSeconds(self) -> float:
        return self.component.blocked_seconds


class EigerIngester(SeriesIngester):
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
        return EigerComponent(self.get_name(), config, link, self.advertised_host, open_scans_of(link), PyTangoThread)

main = console_script(EigerIngester)


class PcapIngester(MeshDevice):
    """A PandABox / PandABlocks position-capture stream (PCAP data port) as one tangomesh source stream."""

    PandaHost = config_property(
        PcapConfig, "panda", doc="The PandA's data port: host or host:port (port 8889); tcp://host:port: the ZeroMQ "
                                 "PUB of a MAX IV-style PCAP republisher instead")
    Stream = config_property(PcapConfig, "stream", doc="Stream name on the data plane (as the scan document says)")
    Pipelines = config_property(PcapConfig, "pipelines", doc="Pipelines fed; default: the Pipeline property")
    CaptureOptions = config_property(
        PcapConfig, "capture", doc="Options line written to the data port: XML, FRAMED or ASCII, SCALED or RAW")
    BlockPoints = config_property(
        PcapConfig, "block_points", doc="Most samples per block; fewer when the PandA has sent nothing more")
    ArrayNames = config_property(
        PcapConfig, "arrays", doc="COLUMN=name lines (e.g. INENC1.VAL.Value=x_enc); default: the column, sanitised")
    ScanWaitSeconds = config_property(
        PcapConfig, "scan_wait", doc="How long a new capture waits for an open scan taking the stream, then is refused")
    ReconnectSeconds = config_property(PcapConfig, "reconnect", doc="Seconds between attempts to connect")

    component: PcapComponent

    def create_component(self) -> PcapComponent:
        pipelines = tuple(self.Pipelines) or ((self.Pipeline,) if self.Pipeline else ())
        config = self.config_from_properties(PcapConfig, pipelines=pipelines)
        link = self.create_link()
        kind = RepublishComponent if config.republished else PcapComponent
        return kind(self.get_name(), config, link, self.advertised_host, open_scans_of(link), PyTangoThread)

    @attribute(dtype=bool, doc="The data port answered OK and the connection is up")
    def Connected(self) -> bool:
        return self.component.connected

    @attribute(dtype=int, doc="Connections made to the data port (more than one: the PandA went away and came back)")
    def Connections(self) -> int:
        return self.component.connections

    @attribute(dtype=int, doc="Captures (arms) seen")
    def Captures(self) -> int:
        return self.component.captures

    @attribute(dtype=str, doc="Scan the open capture feeds ('' when none is open)")
    def CurrentScan(self) -> str:
        return self.component.current_scan

    @attribute(dtype=int, doc="Samples sent on")
    def Samples(self) -> int:
        return self.component.mapper.points

    @attribute(dtype=int, doc="Acquisition indices declared missing (samples the PandA never sent)")
    def GapPoints(self) -> int:
        return self.component.mapper.gap_points

    @attribute(dtype=int, doc="Captures refused: no open scan took the stream within ScanWaitSeconds")
    def RefusedCaptures(self) -> int:
        return self.component.refused_series

    @attribute(dtype=int, doc="Samples discarded with refused captures")
    def DiscardedSamples(self) -> int:
        return self.component.mapper.drained

    @attribute(dtype=int, doc="Captures ended by a fault (overrun, framing, DMA error) or a lost connection")
    def FaultedCaptures(self) -> int:
        return self.component.faulted_captures

    @attribute(dtype=str, doc="Reason of the latest capture's END line ('lost' for a cut connection)")
    def LastEndReason(self) -> str:
        return self.component.last_end

    @attribute(dtype=float, doc="Time spent waiting for the masters to take blocks (backpressure)", unit="s")
    def BlockedSeconds(self) -> float:
        return self.component.blocked_seconds


pcap_main = console_script(PcapIngester)


class FileIngester(MeshDevice):
    """An EIGER's HDF5 output (DECTRIS master + data files) replayed as one tangomesh source stream."""

    MasterFile = config_property(FileConfig, "master", doc="The DECTRIS master file (<name>_master.h5)")
    Stream = config_property(FileConfig, "stream", doc="Stream name on the data plane (as the scan document says)")
    Pipelines = config_property(FileConfig, "pipelines", doc="Pipelines fed; default: the Pipeline property")
    Pace = config_property(
        FileConfig, "pace", doc="recorded (the file's frame_time apart), max, or frames per second")
    BlockFrames = config_property(FileConfig, "block_frames", doc="Most frames per block")
    ScanWaitSeconds = config_property(
        FileConfig, "scan_wait", doc="How long a replay waits for an open scan taking the stream, then is refused")

    component: FileComponent

    def create_component(self) -> FileComponent:
        pipelines = tuple(self.Pipelines) or ((self.Pipeline,) if self.Pipeline else ())
        config = self.config_from_properties(FileConfig, pipelines=pipelines)
        link = self.create_link()
        return FileComponent(self.get_name(), config, link, self.advertised_host, open_scans_of(link), PyTangoThread)

    @command(dtype_in=str, doc_in='JSON (services/schemas/file-replay.json), e.g. {"pace": 10, "first": 0, '
                                  '"count": 100}; {} replays MasterFile whole at Pace', dtype_out=int,
             doc_out="the replay's series number")
    def Replay(self, request: str) -> int:
        try:
            return self.component.replay(request)
        except ValueError as exc:
            self.component.counters.error(f"Replay: {exc}")
            throw_invalid(str(exc), "FileIngester.Replay")

    @attribute(dtype=bool, doc="A replay is queued, looking for its scan or playing")
    def Playing(self) -> bool:
        return self.component.playing

    @attribute(dtype=int, doc="Replays started")
    def Replays(self) -> int:
        return self.component.replays

    @attribute(dtype=str, doc="Scan the playing replay feeds ('' when none)")
    def CurrentScan(self) -> str:
        return self.component.current_scan

    @attribute(dtype=int, doc="Frames sent on")
    def Frames(self) -> int:
        return self.component.mapper.frames

    @attribute(dtype=int, doc="Acquisition indices declared missing")
    def GapPoints(self) -> int:
        return self.component.mapper.gap_points

    @attribute(dtype=int, doc="Replays refused: no open scan took the stream within ScanWaitSeconds")
    def RefusedReplays(self) -> int:
        return self.component.refused_series


file_main = console_script(FileIngester)