"""The scan driver without Tango: blocks in acquisition order, and a failing
scan aborted on every master that started it. Sources and probes bind real
sockets and register with an in-process link; the masters are stand-ins."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import zmq

from services.ops import masters as masters_module
from services.ops.driver import ScanDriver, acquisition_order
from services.sim.profiles import PROFILES, ProfileScan


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

    def _call(self, command: str, argument: str) -> None:
        self.calls.append((self.pipeline, command))
        if command == self.refuse:
            raise RuntimeError(f"{self.pipeline} refuses {command}")

    def StartScan(self, document: str) -> None:
        self._call("StartScan", document)

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
    monkeypatch.setattr(masters_module, "master_proxy",
                        lambda link, pipeline: Master(pipeline, made, refusals.get(pipeline, "")))
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
    assert calls == [("p1", "StartScan"), ("p3", "StartScan"), ("p2", "StartScan"),
                     ("p1", "AbortScan"), ("p3", "AbortScan")]


def test_a_scan_whose_end_never_arrives_times_out_and_is_aborted(calls) -> None:
    data = ProfileScan(PROFILES["counters"], "p1", 20)
    driver = ScanDriver.for_data(data, Link())
    # a master that connects and never reads: the queues take the 20 points, the probe sees nothing
    readers = [zmq.Context.instance().socket(zmq.PULL) for _ in driver.sources]
    try:
        for reader, source in zip(readers, driver.sources.values()):
            reader.connect(source.endpoint)
        with pytest.raises(TimeoutError, match=r"pipelines \['p1'\] did not end"):
            driver.run(data, "s1", 1, block=5, timeout=0.2)
    finally:
        for reader in readers:
            reader.close(0)
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
