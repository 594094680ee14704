"""The scan driver without Tango: blocks in acquisition order, and a failing
scan aborted on every master that started it. Sources and probes bind real
sockets and register with an in-process link; the masters are stand-ins."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from services.ops import masters as masters_module
from services.ops.driver import ScanDriver, acquisition_order
from services.sim.profiles import PROFILES, ProfileScan
from support.peers import RegisteredPeer
from topology_manager.local import LocalManagerLink
from topology_manager.registry import Registry


class Link:
    """A topology manager that grants every lease."""

    def register(self, info):
        return {"name": info["name"], "lease_s": 30.0, "heartbeat_s": 10.0}

    def heartbeat(self, name):
        return {"name": name, "lease_s": 30.0, "heartbeat_s": 10.0}

    def deregister(self, name):
        pass

    def lookup(self, query):
        return []


class Master:
    def __init__(self, pipeline: str, calls: list, refuse: str = "") -> None:
        self.pipeline, self.calls, self.refuse = pipeline, calls, refuse
        self.CurrentScan = ""

    def set_timeout_millis(self, ms: int) -> None:
        pass

    def read_attribute(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(value=getattr(self, name))

    def _call(self, command: str, argument: str) -> None:
        self.calls.append((self.pipeline, command))
        if command == self.refuse:
            raise RuntimeError(f"{self.pipeline} refuses {command}")

    def StartScan(self, document: str) -> None:
        self._call("StartScan", document)
        self.CurrentScan = json.loads(document)["scan"]["id"]

    def EndScan(self, scan: str) -> None:
        self._call("EndScan", scan)

    def AbortScan(self, scan: str) -> None:
        self._call("AbortScan", scan)


@dataclass
class SamePointsForEveryPipeline:
    """A profile's scan fanned out to several pipelines, as the simulated beamline's counters are."""

    scan: ProfileScan
    pipelines: tuple[str, ...]

    @property
    def points(self) -> int:
        return self.scan.points

    def streams_of(self, pipeline: str) -> tuple[str, ...]:
        return self.scan.streams_of(self.scan.pipeline)

    def document(self, scan_id, number, command=None, pipelines=None) -> dict:
        return self.scan.document(scan_id, number, command)

    def arrays(self, stream, start, stop) -> dict:
        return self.scan.arrays(stream, start, stop)


@pytest.fixture
def calls(monkeypatch) -> list:
    made: list = []
    refusals = {"p2": "StartScan"}
    proxies: dict = {}

    def proxy(link, pipeline, timeout_ms=0):  # one per master, also for the watch (which only reads)
        return proxies.setdefault(pipeline, Master(pipeline, made, refusals.get(pipeline, "")))

    monkeypatch.setattr(masters_module, "master_proxy", proxy)
    return made


def test_blocks_leave_by_their_end_per_stream_sizes_and_skips() -> None:
    blocks = list(acquisition_order(10, {"a": 4, "b": 3}, {"b": {3}}))
    assert blocks == [(0, 3, "b"), (0, 4, "a"), (4, 8, "a"), (6, 9, "b"), (8, 10, "a"), (9, 10, "b")]
    stops = [stop for _, stop, _ in blocks]
    assert stops == sorted(stops)


def test_a_refused_start_aborts_the_masters_that_started(calls) -> None:
    data = SamePointsForEveryPipeline(ProfileScan(PROFILES["counters"], "p1", 20), ("p1", "p3", "p2"))
    driver = ScanDriver.for_data(data, Link())
    try:
        with pytest.raises(RuntimeError, match="p2 refuses StartScan"):
            driver.run(data, "s1", 1)
    finally:
        driver.close()
    assert sorted(calls[:3]) == [("p1", "StartScan"), ("p2", "StartScan"), ("p3", "StartScan")]  # all at once
    assert sorted(calls[3:]) == [("p1", "AbortScan"), ("p3", "AbortScan")]  # not the one that refused


def test_a_scan_whose_end_never_arrives_times_out_and_is_aborted(calls) -> None:
    data = ProfileScan(PROFILES["counters"], "p1", 20)
    link = LocalManagerLink(Registry(30.0, 10.0))  # a real registry: sources admit only a registered master
    driver = ScanDriver.for_data(data, link)
    # a master that connects and never reads: the queues take the 20 points, the probe sees nothing
    master = RegisteredPeer(link, "test/p1/master", "master", "p1")
    readers = []
    try:
        for source in driver.sources.values():
            readers.append(master.socket(zmq.PULL, source.endpoint, linger=0))
        with pytest.raises(TimeoutError, match=r"pipelines \['p1'\] did not end"):
            driver.run(data, "s1", 1, block=5, timeout=0.2)
    finally:
        for reader in readers:
            reader.close(0)
        master.close()
        driver.close()
    assert calls == [("p1", "StartScan"), ("p1", "EndScan"), ("p1", "AbortScan")]


def test_the_data_must_match_the_sources() -> None:
    data = ProfileScan(PROFILES["counters"], "p1", 20)
    driver = ScanDriver(Link(), {"p1": ["scaler"]})
    try:
        with pytest.raises(ValueError, match="driver has sources for"):
            driver.run(data, "s1", 1)
        with pytest.raises(ValueError, match="block size"):
            driver.run(ProfileScan(PROFILES["counters"], "p1", 20, streams=["scaler"]), "s1", 1,
                       block={"diode": 5})
    finally:
        driver.close()
    with pytest.raises(ValueError, match="no pipelines"):
        ScanDriver.for_data(data, Link(), ["p9"])
    assert np.array_equal(data.arrays("scaler", 3, 6)["i0"], 1.0e5 + np.arange(3, 6))


def test_the_consumers_verdict_needs_the_sink_complete_and_every_writer_file_complete() -> None:
    from services.ops.verdicts import ConsumerVerdict

    complete = {"status": "complete", "expected": 10, "received": 10, "missing": 0}
    good_file = {"writer": "w/nexus", "pipeline": "p1", "status": "complete"}
    assert ConsumerVerdict(complete, [good_file]).ok
    assert ConsumerVerdict(None, [good_file]).ok  # a mesh without a sink has nothing to say there
    assert not ConsumerVerdict({**complete, "missing": 1}, [good_file]).ok
    assert not ConsumerVerdict({**complete, "status": "running"}, [good_file]).ok
    assert not ConsumerVerdict(complete, [{**good_file, "status": "aborted"}]).ok
    assert not ConsumerVerdict(complete, [good_file], missing_files=["w/fio:p1"]).ok
    assert ConsumerVerdict(complete, [good_file], ["w/fio:p1"]).to_json()["missing_files"] == ["w/fio:p1"]


def test_the_watch_loses_a_master_that_stops_answering_or_forgets_the_scan_and_only_those() -> None:
    from services.ops.masters import MasterWatch

    hung = threading.Event()

    def stopped() -> str:  # a SIGSTOPped server: the call hangs until the client timeout
        if hung.is_set():
            time.sleep(0.3)
            raise RuntimeError("TRANSIENT_CallTimedout")
        return "s1"

    current = {"restarted": "s1"}
    watch = MasterWatch("s1", {"healthy": lambda: "s1", "stopped": stopped, "restarted": lambda: current["restarted"]},
                        lost_after=0.5, period=0.05)
    try:
        time.sleep(0.3)
        assert watch.lost == {}
        hung.set()
        current["restarted"] = ""
        t0 = time.monotonic()
        while len(watch.lost) < 2 and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert set(watch.lost) == {"stopped", "restarted"}
        assert time.monotonic() - t0 < 2  # lost_after plus one hung call, not the caller's whole timeout
        assert "does not answer (TRANSIENT_CallTimedout)" in watch.lost["stopped"]
        assert "no longer holds the scan (current: none" in watch.lost["restarted"]
        time.sleep(0.3)
        assert "healthy" not in watch.lost
    finally:
        watch.stop()


def test_calls_to_all_masters_go_at_once_and_a_hung_one_is_waited_for_only_so_long() -> None:
    from services.ops.masters import _all_at_once

    release = threading.Event()
    ended: list[str] = []
    t0 = time.monotonic()
    errors = _all_at_once({"hung": release.wait, "fine": lambda: ended.append("fine"),
                           "refusing": lambda: 1 / 0}, wait_s=0.5)
    took = time.monotonic() - t0
    release.set()
    assert ended == ["fine"] and set(errors) == {"hung", "refusing"}
    assert errors["hung"] == "no answer within 0.5 s" and "division by zero" in errors["refusing"]
    assert 0.45 < took < 1.5
    t0 = time.monotonic()
    errors = _all_at_once({"hung": threading.Event().wait}, wait_s=10, given_up=lambda pipeline: True)
    assert errors == {"hung": "given up waiting"} and time.monotonic() - t0 < 1


def test_sources_describe_their_streams_from_the_data_and_a_recording_from_its_blocks() -> None:
    data = ProfileScan(PROFILES["counters"], "p1", 20)
    driver = ScanDriver.for_data(data, Link(), max_block=5)
    try:
        for (_, stream), source in driver.sources.items():
            one = data.arrays(stream, 0, 1)
            assert source.descriptor == {"max_block": 5, "arrays": {
                n: {"dtype": a.dtype.str, "shape": list(a.shape[1:])} for n, a in one.items()}}
            assert source.registration.info["capabilities"]["max_block"] == 5
        with pytest.raises(ValueError, match="more than the 5 its sources registered"):
            driver.run(data, "s1", 1, block=6)
    finally:
        driver.close()

    @dataclass
    class Recorded(SamePointsForEveryPipeline):  # data that knows its blocks, as a Replay does
        def blocks(self):
            return iter([(0, 3, "scaler"), (3, 10, "scaler"), (10, 20, "scaler")])

    recorded = Recorded(ProfileScan(PROFILES["counters"], "p1", 20, streams=["scaler"]), ("p1",))
    driver = ScanDriver.for_data(recorded, Link(), max_block=1)
    try:
        assert driver.sources["p1", "scaler"].descriptor["max_block"] == 10  # its largest block, not max_block
    finally:
        driver.close()
