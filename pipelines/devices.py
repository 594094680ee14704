"""The Tango faces of a pipeline's stages: PipelineMaster, PipelineWorker, Sorter.

Each device declares its properties, attributes and commands and delegates to
its Tango-free component (:mod:`pipelines.master`, :mod:`pipelines.worker`,
:mod:`pipelines.sorter`), which the unit and component tests drive directly.
"""

from __future__ import annotations

import json

from tango.server import attribute, command, device_property
from tango.utils import PyTangoThread

from pipelines.dispatch import Affinity
from pipelines.master import MasterComponent, MasterConfig
from pipelines.sorter import SorterComponent, SorterConfig
from pipelines.worker import WorkerComponent, WorkerConfig
from services.device import MeshDevice, config_property, console_script, throw_invalid
from services.registration import ManagerUnavailable
from services.scan_control import parse_abort


class PipelineMaster(MeshDevice):
    """Scan control, event formation and credit-based fan-out for one pipeline."""

    MaxQueueBytes = config_property(
        MasterConfig, "max_queue_bytes", doc="Burst queue bound: bytes of source data and unacknowledged work held")
    MaxUnitPoints = config_property(MasterConfig, "max_unit_points", doc="Most events in one unit of work")
    MaxUnitBytes = config_property(MasterConfig, "max_unit_bytes", doc="Most source bytes in one unit of work")
    IncompleteTimeoutSeconds = config_property(
        MasterConfig, "incomplete_timeout", doc="How long a stream may lag before its events go on marked incomplete")
    WorkerTimeoutSeconds = config_property(
        MasterConfig, "worker_timeout", doc="A worker silent this long is gone: its work goes to others")
    SorterTimeoutSeconds = config_property(
        MasterConfig, "sorter_timeout",
        doc="No sorter registered this long while scans run (after its lease expired): the scans are aborted, "
            "the consumers told directly")
    RecordDirectory = config_property(
        MasterConfig, "record_directory",
        doc="Record every scan's source streams, as they came, under this directory (<scan>/<pipeline>/: "
            "scan.json and one .tmrec per stream) for `tangomesh replay`; empty: no recording")
    Affinity = device_property(dtype=str, default_value="",  # empty: MasterConfig's default affinity (none)
                               doc='Default affinity, e.g. {"group": 100} or {"copy_to": "debug"}')
    Preload = config_property(
        MasterConfig, "preload",
        doc="Processors prepared at start-up, so that StartScan's check of their settings does not wait for "
            "heavy imports (xrd: pyFAI, seconds; * = every installed one); default none")

    component: MasterComponent

    def create_component(self) -> MasterComponent:
        config = self.config_from_properties(
            MasterConfig, affinity=Affinity.from_json(json.loads(self.Affinity) if self.Affinity else None))
        return MasterComponent(self.get_name(), self.Pipeline, self.bind_host, self.advertised_host, config,
                               self.create_link(), PyTangoThread)

    def _refuse(self, origin: str, exc: Exception) -> None:
        self.component.counters.error(f"{origin}: {exc}")
        throw_invalid(str(exc), f"PipelineMaster.{origin}")

    @command(dtype_in=str, doc_in="scan metadata JSON (services/schemas/scan.json)", dtype_out=str,
             doc_out="the scan id")
    def StartScan(self, document: str) -> str:
        try:
            plan = self.component.plan_scan(document)
            self.component.start_scan(plan)
        except ManagerUnavailable as exc:
            self._refuse("StartScan", ValueError(f"topology manager unavailable: {exc}"))
        except ValueError as exc:
            self._refuse("StartScan", exc)
        return plan.meta.scan_id

    @command(dtype_in=str, doc_in="scan id")
    def EndScan(self, scan_id: str) -> None:
        try:
            self.component.end_scan(scan_id)
        except ValueError as exc:
            self._refuse("EndScan", exc)

    @command(dtype_in=str, doc_in="scan id, or JSON {\"scan\": id, \"reason\": why} (services/schemas/abort.json): "
                                  "the reason goes with scan_abort to every consumer")
    def AbortScan(self, argument: str) -> None:
        try:
            scan_id, reason = parse_abort(argument)
            self.component.abort_scan(scan_id, reason)
        except ValueError as exc:
            self._refuse("AbortScan", exc)

    @attribute(dtype=str, doc="Id of the latest scan started")
    def CurrentScan(self) -> str:
        return self.component.current_scan

    @attribute(dtype=str, doc="Scans still taking data, oldest first: scan, points, streams, started, ending, "
                              "first_index (JSON); what an ingester asks once per detector series")
    def OpenScans(self) -> str:
        return json.dumps(self.component.open_scans())

    @attribute(dtype=float, doc="Fraction of the current scan's points delivered downstream", min_value=0, max_value=1)
    def Progress(self) -> float:
        return self.component.progress()

    @attribute(dtype=int, doc="Bytes held: source data not yet dispatched plus unacknowledged work", unit="B")
    def QueueBytes(self) -> int:
        return self.component.queue_bytes

    @attribute(dtype=float, doc="Events dispatched per second (last second)", unit="1/s")
    def EventsPerSecond(self) -> float:
        return self.component.events_per_second

    @attribute(dtype=bool, doc="True while the burst queue is full and sources wait")
    def SourcesHeld(self) -> bool:
        return self.component.sources_held

    @attribute(dtype=float, doc="Total time sources were held back", unit="s")
    def HeldSeconds(self) -> float:
        return self.component.held_seconds

    @attribute(dtype=int, doc="Workers currently known (by credit and heartbeat)")
    def Workers(self) -> int:
        return len(self.component.dispatcher.workers)

    @attribute(dtype=int, doc="Units sent again because their worker disappeared")
    def Redispatched(self) -> int:
        return self.component.dispatcher.redispatched

    @attribute(dtype=str, doc="Current scan: points formed, incomplete, acknowledged, gaps (JSON)")
    def ScanSummary(self) -> str:
        return json.dumps(self.component.scan_summary())

    @attribute(dtype=str, doc="Known workers: name, role, credit, units and points dispatched (JSON)")
    def WorkerTable(self) -> str:
        return json.dumps([{"name": w.name, "role": w.role, "credit": w.credit, "units": w.units,
                            "points": w.points, "in_flight": len(w.in_flight)}
                           for w in list(self.component.dispatcher.workers.values())])


class PipelineWorker(MeshDevice):
    """Runs the scan's processor (a modality plugin) over units of work."""

    Prefetch = config_property(WorkerConfig, "prefetch", doc="Units asked for ahead of processing (credit window)")
    HeartbeatSeconds = config_property(WorkerConfig, "heartbeat", doc="Heartbeat period towards the master")
    Role = config_property(WorkerConfig, "role", doc='"" for a normal worker, or e.g. "debug" for copies')
    ProcessingDelaySeconds = config_property(
        WorkerConfig, "processing_delay",
        doc="Extra time per unit, to rehearse a slow node when commissioning load balancing; leave 0")
    Preload = config_property(
        WorkerConfig, "preload",
        doc="Processors loaded with their heavy imports at start-up, so the first scan does not wait "
            "(* = every installed one; pyFAI alone is ~1.7 s and ~130 MB); default none: loaded by the first scan")

    component: WorkerComponent

    def create_component(self) -> WorkerComponent:
        return WorkerComponent(self.get_name(), self.Pipeline, self.config_from_properties(WorkerConfig),
                               self.create_link(), PyTangoThread)

    @attribute(dtype=str, doc="Processor of the latest scan")
    def Processor(self) -> str:
        return self.component.processor_name

    @attribute(dtype=int, doc="Points processed")
    def Points(self) -> int:
        return self.component.points

    @attribute(dtype=int, doc="Points whose processing failed (see the result's errors)")
    def FailedPoints(self) -> int:
        return self.component.failed_points

    @attribute(dtype=str, doc="Master work endpoint in use")
    def MasterEndpoint(self) -> str:
        return self.component.master_endpoint


class Sorter(MeshDevice):
    """Restores acquisition order and delivers a pipeline's results to its consumers."""

    ChunkPoints = config_property(SorterConfig, "chunk_points", doc="Most points merged into one chunk")
    ChunkSeconds = config_property(
        SorterConfig, "chunk_seconds", doc="A chunk leaves at most this long after its first result")
    GapTimeoutSeconds = config_property(
        SorterConfig, "gap_timeout", doc="How long a missing index is awaited before a gap record replaces it")
    MasterTimeoutSeconds = config_property(
        SorterConfig, "master_timeout",
        doc="How long an open scan's master may be missing from the topology before the scan is aborted")

    component: SorterComponent

    def create_component(self) -> SorterComponent:
        return SorterComponent(self.get_name(), self.Pipeline, self.bind_host, self.advertised_host,
                               self.config_from_properties(SorterConfig), self.create_link(), PyTangoThread)

    @attribute(dtype=str, doc="Latest scan started")
    def CurrentScan(self) -> str:
        return self.component.current_scan

    @attribute(dtype=int, doc="Chunks and gap records delivered")
    def ChunksOut(self) -> int:
        return self.component.chunks_out

    @attribute(dtype=int, doc="Points delivered as gap records (no result within the timeout)")
    def GapPoints(self) -> int:
        return self.component.gap_points

    @attribute(dtype=int, doc="Duplicate points dropped (re-dispatch races)")
    def DuplicatePoints(self) -> int:
        return self.component.duplicates

    @attribute(dtype=str, doc="Summaries of recently finished scans (JSON)")
    def FinishedScans(self) -> str:
        return json.dumps(dict(self.component.finished))


master_main = console_script(PipelineMaster)
worker_main = console_script(PipelineWorker)
sorter_main = console_script(Sorter)
