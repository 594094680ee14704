"""One pipeline's whole chain in this process: source -> master -> workers ->
sorter -> consumer, on the Tango-free components, with real ZeroMQ TCP sockets
on 127.0.0.1 and the topology manager's real registry behind a direct link.

This is the middle test layer (docs/testing.md): faster and more controllable
than starting device servers, yet every stage runs its own threads and talks
over the wire protocol exactly as in production. Only Tango is absent: a test
calls ``plan_scan``/``start_scan`` where the control system would call
``StartScan``, and registers each component the way ``MeshDevice`` does.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from pipelines.component import PipelineComponent
from pipelines.master import MasterComponent, MasterConfig
from pipelines.sorter import SorterComponent, SorterConfig
from pipelines.worker import WorkerComponent, WorkerConfig
from services.registration import RegistrationClient, wait_registered
from services.source import SourceClient, stream_descriptor
from support.waiting import wait_for
from topology_manager.component import TopologyComponent, TopologyConfig
from topology_manager.local import LocalManagerLink

# The simulated scans: profiles (values, expected results, documents) and the checking probe.
from services.ops.probe import Probe, Tally
from services.sim.profiles import PROFILES, Profile, ProfileScan, expected_counters

__all__ = ["Chain", "HOST", "PROFILES", "Tally", "build_chain", "expected_counters"]

HOST = "127.0.0.1"  # bind and advertise: nothing leaves the machine
#: Waits are long because a loaded 2-core machine is slow, never because the chain needs it.
SCAN_TIMEOUT = 60.0
JOIN_TIMEOUT = 30.0

_scan_numbers = itertools.count(1)


def registration_info(component: PipelineComponent) -> dict:
    """What ``MeshDevice.registration_info`` sends for a component, minus the Tango server name."""
    return {"name": component.name, "kind": component.kind, "pipeline": component.pipeline, "host": HOST,
            "pid": os.getpid(), "endpoints": dict(component.endpoints), "capabilities": dict(component.capabilities),
            **component.auth.registration_fields()}  # its CurveZMQ public key


@dataclass
class Stage:
    """A started component and the registration that announces it, as a device holds both."""

    component: PipelineComponent
    registration: RegistrationClient
    stopped: bool = False

    def stop(self, deregister: bool = True) -> None:
        """Stop like a device being deleted (``deregister``) or like a killed
        process (no goodbye: the lease runs out on its own)."""
        if not self.stopped:
            self.stopped = True
            self.registration.stop(deregister=deregister)
            self.component.stop()


def start_stage(component: PipelineComponent, link: LocalManagerLink) -> Stage:
    """Start a component and register it, as ``MeshDevice.init_device`` does."""
    component.start()
    registration = RegistrationClient(link, registration_info(component))
    registration.start()
    return Stage(component, registration)


@dataclass
class Chain:
    """Every stage of pipeline ``pipeline``, started and registered; see :func:`build_chain`."""

    pipeline: str
    profile: Profile
    topology: TopologyComponent
    link: LocalManagerLink
    consumer: Probe
    sorter: SorterComponent
    master: MasterComponent
    sources: dict[str, SourceClient]
    worker_config: WorkerConfig
    sorter_config: SorterConfig = field(default_factory=SorterConfig)
    stages: list[Stage] = field(default_factory=list)
    workers: list[WorkerComponent] = field(default_factory=list)
    closed: bool = False

    # ------------------------------------------------------------ stages
    def stage(self, component: PipelineComponent) -> Stage:
        return next(s for s in self.stages if s.component is component)

    def master_knows(self, worker: WorkerComponent) -> bool:
        """True once the master has had credit or a heartbeat from ``worker``."""
        return any(w.name == worker.name for w in list(self.master.dispatcher.workers.values()))

    def add_worker(self, config: WorkerConfig | None = None) -> WorkerComponent:
        """Start one more worker and wait until the master counts it (it finds
        the master through the topology, as a device would)."""
        worker = WorkerComponent(f"test/{self.pipeline}-worker/{len(self.workers) + 1}", self.pipeline,
                                 config or self.worker_config, self.link)
        stage = start_stage(worker, self.link)
        self.stages.append(stage)
        self.workers.append(worker)
        wait_registered(stage.registration, timeout=JOIN_TIMEOUT)
        wait_for(lambda: self.master_knows(worker), JOIN_TIMEOUT, f"the master to know {worker.name}")
        return worker

    def kill_worker(self, worker: WorkerComponent) -> None:
        """Drop a worker mid-scan as a crash would: its threads and sockets go,
        it says nothing to the master or the manager. Whatever it held
        unacknowledged is the master's to re-dispatch."""
        self.stage(worker).stop(deregister=False)

    def restart_sorter(self) -> SorterComponent:
        """Kill the sorter as a crash would (no goodbye, its queues and sockets
        gone), then start a new one under the same name, as a device server
        restarted by the pool: it binds a new endpoint and takes over the
        registration. Returns once it is registered; the master finds it on
        its own."""
        self.stage(self.sorter).stop(deregister=False)
        sorter = SorterComponent(self.sorter.name, self.pipeline, HOST, HOST, self.sorter_config, self.link)
        stage = start_stage(sorter, self.link)
        self.stages.append(stage)
        self.sorter = sorter
        wait_registered(stage.registration, timeout=JOIN_TIMEOUT)
        return sorter

    def restart_consumer(self) -> Probe:
        """Kill the consumer as a crash would, then start a new one under the
        same name (a new endpoint), as a restarted sink or writer; returns once
        it is registered. The sorter finds it on its own."""
        self.consumer.close(deregister=False)
        self.consumer = Probe(self.pipeline, self.link, HOST, keep=True, name=self.consumer.registration.name)
        wait_registered(self.consumer.registration, timeout=JOIN_TIMEOUT)
        return self.consumer

    def kill_sorter(self) -> None:
        """Drop the sorter as a crash would, and start none in its place."""
        self.stage(self.sorter).stop(deregister=False)

    def kill_master(self) -> None:
        """Drop the master as a crash would: it says nothing to anyone, its
        registration lapses when its lease runs out, and the events it held
        are gone for good."""
        self.stage(self.master).stop(deregister=False)

    # ------------------------------------------------------------ one scan, step by step
    def start_scan(self, points: int, scan_id: str | None = None) -> str:
        """What the master does on StartScan: validate, find sources and sorter, start."""
        number = next(_scan_numbers)
        scan_id = scan_id or f"chain-{self.pipeline}-{number}"
        document = ProfileScan(self.profile, self.pipeline, points, streams=list(self.sources)).document(scan_id, number)
        self.master.start_scan(self.master.plan_scan(json.dumps(document)))
        return scan_id

    def send_blocks(self, scan_id: str, points: int, block: int | dict[str, int] = 100) -> None:
        """Every stream's blocks, in the order a beamline produces them (by
        their last point), then each stream's scan_end. Blocks while the master
        holds the sources back."""
        sizes = block if isinstance(block, dict) else {stream: block for stream in self.sources}
        blocks = sorted(((start, min(points, start + sizes[stream]), stream)
                         for stream in self.sources for start in range(0, points, sizes[stream])),
                        key=lambda b: (b[1], b[0]))
        for start, stop, stream in blocks:
            self.sources[stream].block(scan_id, start, self.profile.values(stream, np.arange(start, stop)))
        for source in self.sources.values():
            source.end(scan_id, points)

    def send_part(self, scan_id: str, start: int, stop: int, block: int = 100) -> None:
        """Points [start, stop) of every stream, block by block; no scan_end."""
        for first in range(start, stop, block):
            for stream, source in self.sources.items():
                source.block(scan_id, first, self.profile.values(stream, np.arange(first, min(stop, first + block))))

    def deliver_first_part(self, scan_id: str, points: int, block: int = 100) -> None:
        """Send points [0, points) of every stream, no scan_end (the scan stays
        open), and wait until the consumer holds them all."""
        self.send_part(scan_id, 0, points, block)
        wait_for(lambda: self.consumer.points_seen(scan_id) == points, JOIN_TIMEOUT, "the first part delivered")

    def end_scan(self, scan_id: str) -> None:
        self.master.end_scan(scan_id)

    def wait_scan_end(self, scan_id: str, timeout: float = SCAN_TIMEOUT) -> Tally:
        """The consumer's tally once it has seen the scan's scan_end or scan_abort."""
        return wait_for(lambda: self.consumer.ended(scan_id), timeout,
                        f"scan {scan_id} to end at the consumer")

    def run_scan(self, points: int, block: int | dict[str, int] = 100,
                 during: Callable[[str], None] | None = None, timeout: float = SCAN_TIMEOUT) -> tuple[str, Tally]:
        """One whole scan: start, send every block, ``during(scan_id)`` while
        the chain works on them, end, and the consumer's tally at scan_end."""
        scan_id = self.start_scan(points)
        self.send_blocks(scan_id, points, block)
        if during is not None:
            during(scan_id)
        self.end_scan(scan_id)
        return scan_id, self.wait_scan_end(scan_id, timeout)

    # ------------------------------------------------------------ the end
    def close(self) -> None:
        """Stop everything, downstream last so nothing upstream blocks on it;
        every thread joined, every socket closed."""
        if self.closed:
            return
        self.closed = True
        for source in self.sources.values():
            source.close()
        stages = sorted(self.stages, key=lambda s: s.component is self.sorter)  # the sorter last
        for stage in stages:
            stage.stop()
        self.consumer.close()
        self.topology.stop()


def build_chain(pipeline: str = "p1", profile: str | Profile = "counters", workers: int | Sequence[WorkerConfig] = 2,
                master_config: MasterConfig | None = None, sorter_config: SorterConfig | None = None,
                worker_config: WorkerConfig | None = None,
                topology_config: TopologyConfig | None = None, max_block: int | None = None) -> Chain:
    """Start a registry, the consumer, the sorter, the master, the workers and
    the profile's sources, all registered for ``pipeline``; returns once the
    master counts every worker. Defaults are the devices' defaults, except
    small units (100 points, so a scan spreads over the workers) and faster
    worker liveness (so a killed worker's work moves on in about a second).
    With ``max_block`` the sources describe their streams (blocks up to that)."""
    master_config = master_config or MasterConfig(max_unit_points=100, worker_timeout=1.0)
    sorter_config = sorter_config or SorterConfig()
    worker_config = worker_config or WorkerConfig(heartbeat=0.1)
    topology_config = topology_config or TopologyConfig(lease_seconds=10.0, heartbeat_seconds=1.0)
    topology = TopologyComponent("test/topology/manager", topology_config)
    topology.start()
    link = LocalManagerLink(topology.registry)
    undo: list[Callable[[], None]] = [topology.stop]  # what a failed build must take down, newest first
    try:
        consumer = Probe(pipeline, link, HOST, keep=True, name=f"test/{pipeline}-consumer/1")
        undo.append(consumer.close)
        sorter = SorterComponent(f"test/{pipeline}/sorter", pipeline, HOST, HOST, sorter_config, link)
        undo.append(sorter.stop)
        master = MasterComponent(f"test/{pipeline}/master", pipeline, HOST, HOST, master_config, link)
        undo.append(master.stop)
        stages = [start_stage(sorter, link), start_stage(master, link)]
        undo += [s.registration.stop for s in stages]
        sources: dict[str, SourceClient] = {}
        profile = PROFILES[profile] if isinstance(profile, str) else profile
        for stream in profile.streams:
            descriptor = stream_descriptor(profile.values(stream, np.arange(1)), max_block) if max_block else None
            sources[stream] = SourceClient(stream, pipeline, link, HOST, descriptor=descriptor)
            undo.append(sources[stream].close)
        wait_registered(consumer.registration, *(s.registration for s in stages),
                        *(s.registration for s in sources.values()), timeout=JOIN_TIMEOUT)
        chain = Chain(pipeline, profile, topology, link, consumer, sorter, master, sources,
                      worker_config, sorter_config, stages)
        undo = [chain.close]
        for config in [worker_config] * workers if isinstance(workers, int) else workers:
            chain.add_worker(config)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    return chain


def threads_left(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` that are still alive, except pyzmq's
    own garbage collector (one per process, started by the first zero-copy
    send of a large frame and kept for the process's life: not ours to stop)."""
    from zmq.utils.garbage import GarbageCollectorThread

    return [t for t in threading.enumerate()
            if t not in before and t.is_alive() and not isinstance(t, GarbageCollectorThread)]
