"""Autoscaler: a Tango device that keeps each pipeline's worker count fitted to its load.

Once a second it reads the pipeline's master (``Workers``, ``QueueBytes``,
``SourcesHeld``, ``EventsPerSecond``, ``OpenScans``; the queue's bound from
the master's registration), asks the policy (``services/ops/autoscale.py``)
and applies a decision with ``tangomesh scale``'s own code
(:func:`services.ops.mesh.scale_workers`) through the configured backend: this
host's servers (``local``: started through the mesh home's supervisor, as
``tangomesh up`` does) or Slurm batch jobs (``slurm``,
``services/ops/slurm.py``). Decisions are attributes (``TargetWorkers``,
``LastDecision``, ``Decisions``) and a column of ``tangomesh status``.

It is an operator tool with a Tango face (like the supervisor, it starts and
stops servers), so it lives with them in ``services/ops``.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tango
from tango.server import attribute
from tango.utils import PyTangoThread

from services import protocol
from services.component import Component
from services.device import MeshDevice, config_property, console_script
from services.ops.autoscale import Decision, Load, ScalePolicy, Scaler
from services.registration import ManagerLink

log = logging.getLogger("tangomesh.autoscaler")

BACKENDS = ("local", "slurm")
DECISIONS_KEPT = 50


@dataclass(frozen=True)
class AutoscalerConfig:
    min_workers: int = 1
    max_workers: int = 4
    step_up: int = 1
    queue_high: float = 0.5
    up_after_s: float = 2.0
    idle_down_s: float = 20.0
    cooldown_s: float = 5.0
    period_s: float = 1.0
    backend: str = "local"
    mesh_file: str = ""  # the mesh the workers belong to ("": deploy/mesh.json)
    slurm_partition: str = ""
    slurm_reservation: str = ""
    slurm_account: str = ""
    slurm_time_limit: str = ""
    slurm_cpus: int = 1
    slurm_mem_mb: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"Backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.period_s <= 0:
            raise ValueError("PeriodSeconds must be positive")
        self.policy  # noqa: B018 - validates the policy's fields now, at start-up

    @property
    def policy(self) -> ScalePolicy:
        return ScalePolicy(self.min_workers, self.max_workers, self.step_up, self.queue_high, self.up_after_s,
                           self.idle_down_s, self.cooldown_s)


class AutoscalerComponent(Component):
    """The loop: ``read_load()`` -> policy -> ``scale_to(n)`` (returns the workers running)."""

    kind = protocol.Kind.AUTOSCALER

    def __init__(self, name: str, pipeline: str, config: AutoscalerConfig, read_load: Callable[[], Load],
                 scale_to: Callable[[int], int], thread_factory: Callable[..., threading.Thread] = threading.Thread,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name, pipeline, log)
        if not pipeline:
            raise ValueError("the Pipeline property must name the pipeline to scale")
        self.config = config
        self.scaler = Scaler(config.policy)
        self.read_load, self.scale_to, self.clock = read_load, scale_to, clock
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=DECISIONS_KEPT)
        self.workers = -1  # as last read; -1: not read yet
        self.target = -1
        self.capabilities = {"backend": config.backend, "min_workers": config.min_workers,
                             "max_workers": config.max_workers}
        self._thread = thread_factory(target=self._run, name="autoscaler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        super().stop()
        if self._thread.is_alive():
            self._thread.join(5)

    def step(self) -> Decision | None:
        """One look at the load, and the change it calls for (applied)."""
        load = self.read_load()
        self.workers = load.workers
        decision = self.scaler.decide(load, self.clock(), time.time())
        if decision is None:
            return None
        log.info("pipeline %s: %d -> %d workers (%s)", self.pipeline, decision.workers_from, decision.workers_to,
                 decision.reason)
        self.target = decision.workers_to
        self.decisions.append(decision)
        self.workers = self.scale_to(decision.workers_to)
        self.counters.events_out += 1
        return decision

    def _run(self) -> None:
        while not self._stopping.wait(self.config.period_s):
            try:
                self.step()
                self.counters.events_in += 1
            except Exception as exc:  # the master away, a launcher failing: say so, try again next period
                self.counters.error(f"autoscaling {self.pipeline}: {type(exc).__name__}: {exc}")

    def status(self) -> str:
        last = self.decisions[-1] if self.decisions else None
        return (f"{self.workers} worker(s), backend {self.config.backend}, {self.config.min_workers}.."
                f"{self.config.max_workers}; last decision: "
                + (f"{last.workers_from} -> {last.workers_to} ({last.reason})" if last else "none"))


def master_load(link: ManagerLink, pipeline: str) -> Load:
    """The pipeline's load as its master publishes it (one Tango read of five attributes)."""
    masters = link.lookup({"kind": protocol.Kind.MASTER, "pipeline": pipeline})
    if len(masters) != 1:
        raise RuntimeError(f"pipeline {pipeline} has {len(masters)} registered masters, not one")
    master = masters[0]
    proxy = tango.DeviceProxy(master["name"])
    proxy.set_timeout_millis(2000)
    values = {a.name.lower(): a.value for a in proxy.read_attributes(
        ["Workers", "QueueBytes", "SourcesHeld", "EventsPerSecond", "OpenScans"])}
    bound = float(master.get("capabilities", {}).get("max_queue_bytes") or 1)
    return Load(workers=int(values["workers"]), queue_fill=float(values["queuebytes"]) / bound,
                sources_held=bool(values["sourcesheld"]), events_per_s=float(values["eventspersecond"]),
                scan_open=bool(json.loads(values["openscans"] or "[]")))


def _prop(name: str, doc: str):
    return config_property(AutoscalerConfig, name, doc)


class Autoscaler(MeshDevice):
    """Keeps one pipeline's worker count fitted to its load (docs/operating.md, "Autoscaling")."""

    MinWorkers = _prop("min_workers", "Fewest workers (also while idle)")
    MaxWorkers = _prop("max_workers", "Most workers")
    StepUp = _prop("step_up", "Workers added per decision")
    QueueHigh = _prop("queue_high", "Burst queue fill (share of the master's MaxQueueBytes) that counts as overload")
    UpAfterSeconds = _prop("up_after_s", "Overloaded this long without a break: add workers")
    IdleDownSeconds = _prop("idle_down_s", "Idle (no open scan, nothing queued) this long: back to MinWorkers")
    CooldownSeconds = _prop("cooldown_s", "At most one change in this many seconds")
    PeriodSeconds = _prop("period_s", "How often the master's load is read")
    Backend = _prop("backend", "local (this host's servers, supervised) or slurm (batch jobs)")
    MeshFile = _prop("mesh_file", "The mesh file the workers belong to (empty: deploy/mesh.json)")
    SlurmPartition = _prop("slurm_partition", "slurm: partition")
    SlurmReservation = _prop("slurm_reservation", "slurm: reservation")
    SlurmAccount = _prop("slurm_account", "slurm: account")
    SlurmTimeLimit = _prop("slurm_time_limit", "slurm: time limit per worker job")
    SlurmCpus = _prop("slurm_cpus", "slurm: CPUs per worker job")
    SlurmMemMB = _prop("slurm_mem_mb", "slurm: MB per worker job (0: the partition's default)")

    component: AutoscalerComponent

    def create_component(self) -> AutoscalerComponent:
        from services.ops import mesh
        from services.ops.home import home
        from services.ops.slurm import SlurmLauncher, SlurmSettings

        config = self.config_from_properties(AutoscalerConfig)
        spec = mesh.MeshSpec.load(Path(config.mesh_file) if config.mesh_file else mesh.DEFAULT_MESH)
        root = home()
        launcher = mesh.LocalLauncher(root) if config.backend == "local" else SlurmLauncher(root, SlurmSettings(
            partition=config.slurm_partition, reservation=config.slurm_reservation, account=config.slurm_account,
            time_limit=config.slurm_time_limit, cpus_per_task=config.slurm_cpus, mem_mb=config.slurm_mem_mb))
        link = self.create_link()
        pipeline = self.Pipeline
        return AutoscalerComponent(
            self.get_name(), pipeline, config, lambda: master_load(link, pipeline),
            lambda n: len(mesh.scale_workers(spec, pipeline, n, launcher, root)), PyTangoThread)

    @attribute(dtype=int, doc="Workers the master had at the last look (-1: not read yet)")
    def Workers(self) -> int:
        return self.component.workers

    @attribute(dtype=int, doc="Workers the last decision asked for (-1: none yet)")
    def TargetWorkers(self) -> int:
        return self.component.target

    @attribute(dtype=str, doc="The last decision (JSON; {} before the first)")
    def LastDecision(self) -> str:
        return json.dumps(self.component.decisions[-1].to_json() if self.component.decisions else {})

    @attribute(dtype=str, doc=f"The last {DECISIONS_KEPT} decisions, oldest first (JSON list)")
    def Decisions(self) -> str:
        return json.dumps([d.to_json() for d in self.component.decisions])

    def dev_status(self) -> str:
        return super().dev_status() + "\n" + (self.component.status() if self.get_state() != tango.DevState.FAULT
                                               else "")


main = console_script(Autoscaler)
