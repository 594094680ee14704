"""A MacroServer's link to the mesh: what the tangomesh recorder calls.

:func:`describe` reads Sardana's objects (the scan macro, the data
description of ``_startRecordList``) into a :class:`mapping.SardanaScan`;
:class:`MeshScan` runs one scan on the mesh: it checks that every selected
pipeline is up, calls ``StartScan`` on their masters (``ScanMasters``: on all
or none), sends each record as one block of the stream with ``SourceClient``
(ZeroMQ only: no Tango call per record), and ends with ``EndScan`` or, for a
stopped, aborted or failed macro, ``AbortScan`` with the reason.

The sources (one bound socket per pipeline and stream, registered with the
topology manager) live as long as the MacroServer process: Sardana makes a
recorder per scan, but the master must find the stream registered before
StartScan, and a socket closed at the end of a scan could lose its last
blocks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Mapping

from services import protocol
from services.ops.masters import ScanMasters, describe as describe_error
from services.ops.sardana.mapping import (Column, MeshSettings, SardanaMappingError, SardanaScan, document, end_reason,
                                          finite, point_arrays)
from services.registration import ManagerLink, TangoManagerLink, wait_registered
from services.scan_document import GRID, LINE, POINTS, Scanned, json_safe, wire_dtype
from services.source import SendTimeout, SourceClient

log = logging.getLogger("tangomesh.sardana")

#: How long one record may wait for the mesh to take it before the macro fails (the mesh pushing back that long
#: means a stage is stuck: failing the macro says so, where waiting forever would hang the beamline).
SEND_TIMEOUT_S = 60.0
#: How long StartScan on all masters may take, from the recorder's start.
START_DEADLINE_S = 20.0


# ---------------------------------------------------------------- Sardana's objects -> plain data
def _motion(macro: Any) -> tuple[str, int, list[Scanned], bool, list[str]]:
    """pattern, points, scanned motors, snake, moving motors of a scan macro, from the attributes
    Sardana's scan macros set in ``prepare`` (mesh: nr_intervs, bidirectional_mode; aNscan: nr_interv)."""
    motors = [m.getName() for m in getattr(macro, "motors", []) or []]
    points = int(getattr(macro, "nb_points", 0) or 0)
    starts, finals = getattr(macro, "starts", None), getattr(macro, "finals", None)
    intervals = getattr(macro, "nr_intervs", None)
    if intervals is not None and len(motors) == 2 and starts is not None and finals is not None:
        scanned = [Scanned(motors[i], float(starts[i]), float(finals[i]), int(intervals[i]) + 1) for i in (0, 1)]
        return GRID, points, scanned, bool(getattr(macro, "bidirectional_mode", False)), motors
    step = getattr(macro, "mode", "s") in ("s", "ct", "h")  # step, hardware-timed, hybrid: evenly spaced points
    if len(motors) == 1 and step and hasattr(macro, "nr_interv") and starts is not None and points > 0:
        return LINE, points, [Scanned(motors[0], float(starts[0]), float(finals[0]), points)], False, motors
    return POINTS, points, [], False, motors


def _columns(datadesc: list[Any]) -> tuple[list[Column], dict[str, str]]:
    columns, skipped = [], {}
    for desc in datadesc:
        key = str(desc.name)
        if key == "point_nb":
            continue  # the acquisition index itself
        dtype = wire_dtype(str(getattr(desc, "dtype", "") or ""))
        shape = tuple(int(n) for n in (getattr(desc, "shape", None) or ()))
        if getattr(desc, "value_ref_enabled", False):
            skipped[key] = "a value reference (the data is in a file), not streamed"
        elif dtype is None:
            skipped[key] = f"dtype {getattr(desc, 'dtype', None)!r} is not numeric"
        elif len(shape) > 1:
            skipped[key] = f"{len(shape)}-d per point: a detector of this size streams to the mesh itself"
        else:
            # motors, timestamp and epoch are named by their key; channels (full Tango names) by their label
            name = key if "/" not in key else str(getattr(desc, "label", "") or key.rsplit("/", 1)[-1])
            name = name.replace("/", "_")
            columns.append(Column(key, name, dtype, shape, str(getattr(desc, "data_units", "") or "")))
    names = [c.name for c in columns]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SardanaMappingError(f"columns labelled {twice} twice: give the channels unique labels")
    return columns, skipped


def describe(macro: Any, environ: Mapping[str, Any]) -> SardanaScan:
    """A scan as plain data, from the scan macro and the record list's environment."""
    pattern, points, scanned, snake, moving = _motion(macro)
    columns, skipped = _columns(list(environ.get("datadesc", [])))
    counters = set(environ.get("counters", []))
    channels = {c.name: {"name": c.key, "units": c.units, "dtype": c.dtype, "shape": list(c.shape)}
                for c in columns if c.key in counters}
    snapshot, sources = {}, {}
    for desc in environ.get("preScanSnapShot", []) or []:
        label = str(getattr(desc, "label", "") or desc.name)
        snapshot[label] = finite(json_safe(getattr(desc, "pre_scan_value", None)))
        sources[label] = str(getattr(desc, "source", "") or desc.name)
    mntgrp = ""
    try:
        mntgrp = str(macro.getEnv("ActiveMntGrp"))
    except Exception:  # noqa: BLE001 - the scan ran with Sardana's own choice: not knowing it is no error
        pass
    started = environ.get("startts") or time.time()
    return SardanaScan(
        serial=int(environ.get("serialno", 0)), command=str(environ.get("title") or macro.getMacroCommand()),
        macro=str(macro.getName()), macro_id=str(environ.get("macro_id") or macro.getID()), started=float(started),
        pattern=pattern, points=points, scanned=scanned, snake=snake, moving=moving, columns=columns,
        skipped=skipped, measurement_group=mntgrp, channels=channels,
        integration_time=float(macro.integ_time) if isinstance(getattr(macro, "integ_time", None), (int, float))
        else None,
        snapshot=snapshot, snapshot_sources=sources, sample=environ.get("SampleInfo") or None,
        extra={"user": environ.get("user"), "scan_dir": environ.get("ScanDir"), "scan_file": environ.get("ScanFile"),
               "ref_moveables": environ.get("ref_moveables"), "estimated_time_s": environ.get("estimatedtime"),
               "source_info": environ.get("SourceInfo") or {}})


def settings_from(get_env: Callable[[str], Any], names: tuple[str, ...]) -> MeshSettings:
    """The ``TangoMesh*`` settings through ``get_env`` (a macro's getEnv; a missing one raises)."""
    env = {}
    for name in names:
        try:
            env[name] = get_env(name)
        except Exception:  # noqa: BLE001 - Sardana's UnknownEnv: the setting's default applies
            pass
    return MeshSettings.from_env(env)


# ---------------------------------------------------------------- the process's link to the mesh
class MeshLink:
    """The topology link and the sources of one MacroServer process, per (manager, host, stream)."""

    _shared: dict[tuple[str, str, str], "MeshLink"] = {}
    _lock = threading.Lock()

    def __init__(self, manager: str, host: str, stream: str, link: ManagerLink | None = None) -> None:
        self.manager, self.host, self.stream = manager, host, stream
        self.link = link or TangoManagerLink(manager)
        self.sources: dict[str, SourceClient] = {}

    @classmethod
    def shared(cls, settings: MeshSettings) -> "MeshLink":
        key = (settings.manager, settings.host, settings.stream)
        with cls._lock:
            if key not in cls._shared:
                cls._shared[key] = cls(*key)
            return cls._shared[key]

    def sources_for(self, pipelines: list[str]) -> list[SourceClient]:
        """This stream's source in each pipeline, registered (made on first use).
        The sources of pipelines no longer selected are closed: a source left
        registered would be joined by every later scan of its pipeline that
        does not list its streams (their last scan ended before this one began)."""
        from tango.utils import PyTangoThread  # a Tango server process: its client threads are omni threads

        for pipeline in [p for p in self.sources if p not in pipelines]:
            self.sources.pop(pipeline).close()
        made = []
        for pipeline in pipelines:
            if pipeline not in self.sources:
                self.sources[pipeline] = SourceClient(self.stream, pipeline, self.link, self.host, prefix="sardana",
                                                      thread_factory=PyTangoThread)
                made.append(self.sources[pipeline])
        if made:
            wait_registered(*(s.registration for s in made))
        return [self.sources[p] for p in pipelines]

    def check_up(self, pipelines: list[str]) -> None:
        """RuntimeError naming each selected pipeline that cannot take a scan now
        (no master, no sorter or no worker registered), before anything starts."""
        try:
            services = self.link.lookup({})
        except Exception as exc:  # noqa: BLE001 - the manager is the mesh's one fixed point
            raise RuntimeError(f"tangomesh: the topology manager {self.manager} does not answer "
                               f"({describe_error(exc)}): is the mesh running?") from None
        down = []
        for pipeline in pipelines:
            kinds = {s["kind"] for s in services if s.get("pipeline") == pipeline}
            missing = [k for k in (protocol.Kind.MASTER, protocol.Kind.SORTER, protocol.Kind.WORKER) if k not in kinds]
            if missing:
                down.append(f"pipeline {pipeline} is down (no {', no '.join(missing)} registered)")
        if down:
            raise RuntimeError("tangomesh: the scan cannot start: " + "; ".join(down))


class MeshScan:
    """One Sardana scan on the mesh, from StartScan to EndScan or AbortScan."""

    def __init__(self, scan: SardanaScan, settings: MeshSettings, link: MeshLink | None = None) -> None:
        self.scan = scan
        self.settings = settings
        self.document = document(scan, settings)  # first: a mapping error refuses the scan before any call
        self.scan_id: str = self.document["scan"]["id"]
        self.link = link or MeshLink.shared(settings)
        self.sent = 0
        self.problems = 0
        self.masters: ScanMasters | None = None
        self.sources: list[SourceClient] = []
        self.open = False

    def start(self) -> None:
        """StartScan on every selected pipeline's master, or RuntimeError naming the pipeline that refused."""
        pipelines = self.settings.pipelines
        self.link.check_up(pipelines)
        self.sources = self.link.sources_for(pipelines)
        self.masters = ScanMasters(self.link.link, pipelines, deadline=time.monotonic() + START_DEADLINE_S)
        try:
            self.masters.start(self.document)
        except RuntimeError as exc:
            raise RuntimeError(f"tangomesh: scan {self.scan_id} refused: {exc}") from None
        self.open = True
        log.info("scan %s (%s) started on %s", self.scan_id, self.scan.command, ", ".join(pipelines))

    def record(self, data: Mapping[str, Any]) -> None:
        """One record: a block of one point at index ``point_nb`` to every pipeline."""
        if not self.open:
            return
        index = int(data["point_nb"])
        arrays = point_arrays(self.scan.columns, data, self._problem)
        for source in self.sources:
            source.block(self.scan_id, index, arrays, timeout=SEND_TIMEOUT_S)
        self.sent += 1

    def _problem(self, why: str) -> None:
        self.problems += 1
        if self.problems <= 10:
            log.warning("scan %s: %s (the point holds the fill value)", self.scan_id, why)

    def end(self, status: str) -> str:
        """EndScan after a normal end (``status`` ``Normal``), AbortScan with the
        reason otherwise; returns what happened, in words."""
        if not self.open or self.masters is None:
            return "not started"
        self.open = False
        if status == "Normal":
            try:
                for source in self.sources:
                    source.end(self.scan_id, self.sent, timeout=SEND_TIMEOUT_S)
            except SendTimeout as exc:  # a stuck pipeline: without the abort its master would hold the scan open
                self.masters.abort(self.scan_id, reason=f"the Sardana stream's end was not taken: {exc}")
                raise RuntimeError(f"tangomesh: scan {self.scan_id} aborted: {exc}") from None
            refused = self.masters.end(self.scan_id)
            if refused:
                log.warning("EndScan %s refused: %s", self.scan_id, refused)
                self.masters.abort(self.scan_id, only=refused, reason=f"EndScan refused: {json.dumps(refused)}")
                return f"ended, but EndScan was refused by {', '.join(sorted(refused))}"
            return "ended"
        reason = end_reason(status, self.scan.command, self.sent, self.scan.points)
        self.masters.abort(self.scan_id, reason=reason)
        log.warning("scan %s aborted: %s", self.scan_id, reason)
        return f"aborted: {reason}"


# ---------------------------------------------------------------- what an operator asks
def status_lines(link: ManagerLink, read_master: Callable[[str], dict[str, Any]] | None = None) -> list[str]:
    """The mesh's state in a few lines: per pipeline its master, sorter and
    workers, and each master's open scans; then the services of no pipeline."""
    services = link.lookup({})
    read_master = read_master or _read_master
    lines = []
    by_pipeline: dict[str, list[dict[str, Any]]] = {}
    for service in services:
        by_pipeline.setdefault(service.get("pipeline") or "", []).append(service)
    for pipeline in sorted(p for p in by_pipeline if p):
        members = by_pipeline[pipeline]
        kinds = {k: [s["name"] for s in members if s["kind"] == k] for k in {s["kind"] for s in members}}
        workers = len(kinds.get(protocol.Kind.WORKER, []))
        masters = kinds.get(protocol.Kind.MASTER, [])
        state = "up" if masters and kinds.get(protocol.Kind.SORTER) and workers else "DOWN"
        lines.append(f"pipeline {pipeline}: {state}; master {', '.join(masters) or 'none'}; "
                     f"sorter {', '.join(kinds.get(protocol.Kind.SORTER, [])) or 'none'}; {workers} worker(s); "
                     f"{len(kinds.get(protocol.Kind.SOURCE, []))} source(s)")
        for master in masters:
            info = read_master(master)
            scans = info.get("open_scans", [])
            lines.append(f"  master {master}: {info.get('error') or f'{len(scans)} open scan(s)'}"
                         + "".join(f"\n    {s.get('scan')}: {s.get('points')} points, streams "
                                   f"{', '.join(s.get('streams', []))}" for s in scans))
    others = by_pipeline.get("", [])
    if others:
        lines.append("services of every pipeline: " + ", ".join(f"{s['name']} ({s['kind']})" for s in others))
    return lines or ["the topology manager knows no services: is the mesh running?"]


def _read_master(name: str) -> dict[str, Any]:
    import tango

    try:
        proxy = tango.DeviceProxy(name)
        proxy.set_timeout_millis(1500)
        return {"open_scans": json.loads(proxy.read_attribute("OpenScans").value)}
    except Exception as exc:  # noqa: BLE001 - a master that does not answer is what the operator must see
        return {"error": f"does not answer ({describe_error(exc)})"}
