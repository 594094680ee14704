"""The writer Tango devices: NexusWriter, ImageWriter and FioWriter.

Each is a consumer of sorted results (kind ``writer``) over a
:class:`~writers.component.WriterComponent`; they differ only in the format
and its properties. ``LastFile`` pushes a change event whenever a file is
made final (Lavue's ``tangofile`` source follows it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tango.server import attribute, command, device_property
from tango.utils import PyTangoThread

from services.device import MeshDevice, config_property, console_script
from writers.component import ScanFile, ScanRun, WriterComponent, WriterConfig
from writers.fio import FioFile
from writers.images import ImageFiles, ImageSettings
from writers.layout import OutputLayout
from writers.nexus import NexusFile, NexusSettings


class WriterDevice(MeshDevice):
    """Base of the writers; subclasses say which files they make."""

    BeamtimeRoot = device_property(
        dtype=str, default_value="",
        doc="Absolute directory every output path is inside (environment variables and ~ are expanded)")
    CreateRoot = device_property(dtype=bool, default_value=False,
                                 doc="Create BeamtimeRoot if it is missing (demo and test meshes)")
    PathTemplate = config_property(
        OutputLayout, "template",
        doc="File path below BeamtimeRoot without suffix; fields: processed, beamtime, beamline, scan, "
            "scan_name, number, pipeline")
    StaleScanSeconds = config_property(
        WriterConfig, "stale_seconds", doc="A scan with no message for this long is finished as abandoned")
    MaxOpenScans = config_property(WriterConfig, "max_open_scans", doc="Scans written at the same time, at most")

    file_format = ""
    component: WriterComponent

    def init_device(self) -> None:
        super().init_device()
        self.set_change_event("LastFile", True, False)

    def create_component(self) -> WriterComponent:
        root = Path(os.path.expanduser(os.path.expandvars(self.BeamtimeRoot))) if self.BeamtimeRoot else None
        if root is None:
            raise ValueError("BeamtimeRoot is not set")
        if self.CreateRoot and root.is_absolute():
            root.mkdir(parents=True, exist_ok=True)
        layout = self.config_from_properties(OutputLayout, root=root)
        return WriterComponent(self.get_name(), self.Pipeline, self.bind_host, self.advertised_host, layout,
                               self.file_format, self.open_file, self.config_from_properties(WriterConfig),
                               PyTangoThread, on_file=self._file_written, link=self.create_link())

    def open_file(self, run: ScanRun) -> ScanFile:
        raise NotImplementedError

    def _file_written(self, path: str) -> None:
        self.push_change_event("LastFile", path)

    @attribute(dtype=str, doc="Path of the last file made final (change events)")
    def LastFile(self) -> str:
        return self.component.last_file

    @attribute(dtype=int, doc="Files made final since start")
    def FilesWritten(self) -> int:
        return self.component.files_written

    @attribute(dtype=int, doc="Bytes of the files made final since start", unit="B")
    def BytesWritten(self) -> int:
        return self.component.bytes_written

    @attribute(dtype=int, doc="Scans being written now")
    def OpenScans(self) -> int:
        return len(self.component.runs)

    @attribute(dtype=int, doc="Messages skipped because their scan was refused (see Errors for why)")
    def SkippedMessages(self) -> int:
        return self.component.skipped

    @attribute(dtype=str, doc="BeamtimeRoot in force")
    def Root(self) -> str:
        return str(self.component.layout.root)

    @command(dtype_in=int, doc_in="how many of the latest files (0: all kept)", dtype_out=str,
             doc_out="JSON list: path, sha256, bytes, scan, pipeline, status, written")
    def ListFiles(self, n: int) -> str:
        return json.dumps(self.component.list_files(n))


class NexusWriter(WriterDevice):
    """One NeXus/HDF5 file per scan and pipeline, with the full metadata tree."""

    Compression = config_property(NexusSettings, "compression", doc="bitshuffle-lz4 (hdf5plugin), gzip or none")
    ChunkBytes = config_property(NexusSettings, "chunk_bytes", doc="Target HDF5 chunk size in bytes")
    FlushSeconds = config_property(NexusSettings, "flush_seconds", doc="Flush the file being written this often")

    file_format = "nexus"

    def create_component(self) -> WriterComponent:
        self.settings = self.config_from_properties(NexusSettings)
        return super().create_component()

    def open_file(self, run: ScanRun) -> ScanFile:
        return NexusFile(run, self.settings)


class ImageWriter(WriterDevice):
    """PNG maps and plots of every product at scan end (and every IntervalSeconds)."""

    WidthPixels = config_property(ImageSettings, "width", doc="Image width")
    HeightPixels = config_property(ImageSettings, "height", doc="Image height")
    Colormap = config_property(ImageSettings, "colormap", doc="matplotlib colour map of maps")
    IntervalSeconds = config_property(
        ImageSettings, "interval_seconds", doc="Refresh the images during a scan this often (0: at scan end only)")
    MaxBytes = config_property(
        ImageSettings, "max_bytes", doc="Memory for one scan's maps and sums; products beyond it get no image")

    file_format = "images"

    def create_component(self) -> WriterComponent:
        self.settings = self.config_from_properties(ImageSettings)
        return super().create_component()

    def open_file(self, run: ScanRun) -> ScanFile:
        return ImageFiles(run, self.settings)


class FioWriter(WriterDevice):
    """DESY FIO ascii files of the counter-type (scalar) products."""

    file_format = "fio"

    def open_file(self, run: ScanRun) -> ScanFile:
        return FioFile(run)


nexus_main = console_script(NexusWriter)
image_main = console_script(ImageWriter)
fio_main = console_script(FioWriter)
