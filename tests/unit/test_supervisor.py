"""The embedded mesh's restart policy, without processes: a fake clock, spawn and exit."""

from __future__ import annotations

import logging

import pytest

from services.ops.supervisor import Exit, Policy, Supervisor


class FakeProcesses:
    """Pids handed out by ``spawn``; a test ends one with ``kill``."""

    def __init__(self) -> None:
        self.next_pid = 100
        self.spawned: list[tuple[str, int]] = []
        self.ended: dict[int, Exit] = {}
        self.fail_spawn = False

    def spawn(self, name: str) -> int:
        if self.fail_spawn:
            raise FileNotFoundError(f"{name} is not installed")
        self.next_pid += 1
        self.spawned.append((name, self.next_pid))
        return self.next_pid

    def exited(self, name: str, pid: int) -> Exit | None:
        return self.ended.get(pid)

    def kill(self, pid: int, how: Exit = Exit(signal=9)) -> None:
        self.ended[pid] = how


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> tuple[Supervisor, FakeProcesses, Clock]:
    procs, clock = FakeProcesses(), Clock()
    return Supervisor(procs.spawn, procs.exited, clock, lambda: 1.7e9 + clock.now), procs, clock


def advance(supervisor: Supervisor, clock: Clock, seconds: float, step: float = 0.25) -> None:
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        supervisor.tick()


def test_an_exited_server_is_restarted_after_a_second_and_counted(setup) -> None:
    supervisor, procs, clock = setup
    pid = supervisor.start("Sink/beamline")
    advance(supervisor, clock, 60)  # a long, healthy run
    procs.kill(pid)
    clock.now += 0.25
    assert supervisor.tick()
    state = supervisor.state()["Sink/beamline"]
    assert state["state"] == "restarting" and state["pid"] is None
    assert state["last_exit"]["signal"] == 9 and state["last_exit"]["how"] == "killed by SIGKILL"
    assert state["last_exit"]["ran_s"] == pytest.approx(60.25)
    advance(supervisor, clock, 0.5)
    assert len(procs.spawned) == 1  # not before the first delay
    advance(supervisor, clock, 0.5)
    assert procs.spawned[-1][0] == "Sink/beamline" and len(procs.spawned) == 2
    state = supervisor.state()["Sink/beamline"]
    assert state == {"pid": procs.spawned[-1][1], "state": "running", "restarts": 1,
                     "last_exit": state["last_exit"], "last_restart": pytest.approx(1.7e9 + clock.now),
                     "quick_failures": 0}


def test_quick_failures_back_off_doubling_to_the_cap_then_give_up_with_one_log_line(setup, caplog) -> None:
    supervisor, procs, clock = setup
    supervisor.policy = Policy(first_delay=1, max_delay=4, quick_run_s=10, give_up_after=5)
    supervisor.start("PipelineWorker/counters-01")
    delays = []
    with caplog.at_level(logging.WARNING, "tangomesh.supervisor"):
        for _ in range(5):
            procs.kill(procs.spawned[-1][1], Exit(code=1))
            died = clock.now
            before = len(procs.spawned)
            while len(procs.spawned) == before and clock.now - died < 60:
                advance(supervisor, clock, 0.25)
            delays.append(round(clock.now - died))
    assert delays[:4] == [1, 2, 4, 4]  # doubling, capped
    assert delays[4] == 60  # the fifth quick failure in a row: no restart
    state = supervisor.state()["PipelineWorker/counters-01"]
    assert state["state"] == "gave up" and state["restarts"] == 4 and state["last_exit"]["code"] == 1
    gave_up = [r for r in caplog.records if "giving up" in r.getMessage()]
    assert len(gave_up) == 1 and r"tangomesh up" in gave_up[0].getMessage()

    supervisor.start("PipelineWorker/counters-01")  # `tangomesh up` starts it again: a fresh count of failures
    assert supervisor.state()["PipelineWorker/counters-01"]["state"] == "running"
    procs.kill(procs.spawned[-1][1])
    advance(supervisor, clock, 1.25)
    assert supervisor.state()["PipelineWorker/counters-01"]["restarts"] == 5


def test_a_long_run_resets_the_back_off(setup) -> None:
    supervisor, procs, clock = setup
    supervisor.start("Sorter/counters")
    for _ in range(3):  # quick failures: 1, 2, 4 s
        procs.kill(procs.spawned[-1][1])
        advance(supervisor, clock, 8)
    assert supervisor.records["Sorter/counters"].quick_failures == 3
    advance(supervisor, clock, 11)  # then it runs well
    procs.kill(procs.spawned[-1][1])
    before = len(procs.spawned)
    advance(supervisor, clock, 1.25)
    assert len(procs.spawned) == before + 1


def test_a_forgotten_server_is_never_restarted(setup) -> None:
    supervisor, procs, clock = setup
    pid = supervisor.start("PipelineWorker/counters-03")
    supervisor.forget("PipelineWorker/counters-03")  # `tangomesh scale counters 2`, `tangomesh down`
    procs.kill(pid, Exit(signal=15))
    advance(supervisor, clock, 60)
    assert len(procs.spawned) == 1 and supervisor.state() == {}


def test_an_adopted_server_is_restarted_though_its_exit_status_is_lost(setup) -> None:
    supervisor, procs, clock = setup
    supervisor.watch("Recorder/tap", 42)  # started while no supervisor ran
    advance(supervisor, clock, 30)
    procs.kill(42, Exit())
    advance(supervisor, clock, 1.5)
    state = supervisor.state()["Recorder/tap"]
    assert state["restarts"] == 1 and state["pid"] == procs.spawned[-1][1]
    assert state["last_exit"]["code"] is None and "unknown" in state["last_exit"]["how"]
    supervisor.watch("Recorder/tap", state["pid"])  # the same pid file again: nothing changes
    assert supervisor.state()["Recorder/tap"]["restarts"] == 1


def test_a_restart_that_cannot_spawn_counts_as_a_quick_failure(setup, caplog) -> None:
    supervisor, procs, clock = setup
    supervisor.start("FioWriter/beamline")
    procs.kill(procs.spawned[-1][1])
    procs.fail_spawn = True
    with caplog.at_level(logging.ERROR, "tangomesh.supervisor"):
        advance(supervisor, clock, 200)
    state = supervisor.state()["FioWriter/beamline"]
    assert state["state"] == "gave up" and state["restarts"] == 0
    assert any("restart failed" in r.getMessage() for r in caplog.records)


def test_exit_descriptions() -> None:
    assert Exit(code=0).describe() == "exit status 0"
    assert Exit(signal=15).describe() == "killed by SIGTERM"
    assert Exit.from_wait_status(9) == Exit(signal=9)  # a raw wait status: signal in the low bits
    assert Exit.from_wait_status(3 << 8) == Exit(code=3)


def test_a_new_supervisor_carries_on_from_the_previous_ones_state(setup) -> None:
    """What a killed supervisor left in supervisor.json: the counts go on, a
    running server is adopted (never spawned), a pending restart happens, a
    server given up on stays stopped."""
    old, procs, clock = setup
    running = old.start("Sink/beamline")
    advance(old, clock, 60)
    procs.kill(running)
    advance(old, clock, 2)  # restarted once
    waiting = old.start("Sorter/xrf")
    advance(old, clock, 60)
    procs.kill(waiting)
    advance(old, clock, 0.25)  # exited, its restart not yet due
    saved = old.state()
    assert saved["Sorter/xrf"]["state"] == "restarting" and saved["Sink/beamline"]["restarts"] == 1
    saved["PipelineWorker/xrf-01"] = {"pid": None, "state": "gave up", "restarts": 4, "quick_failures": 5,
                                      "last_exit": {"how": "exit status 1"}, "last_restart": 1.7e9}

    new = Supervisor(procs.spawn, procs.exited, clock, lambda: 1.7e9 + clock.now)
    sink_pid = saved["Sink/beamline"]["pid"]
    new.restore("Sink/beamline", sink_pid, saved["Sink/beamline"], running=True)
    new.restore("Sorter/xrf", waiting, saved["Sorter/xrf"], running=False)
    new.restore("PipelineWorker/xrf-01", 555, saved["PipelineWorker/xrf-01"], running=False)
    spawned = len(procs.spawned)
    assert new.state()["Sink/beamline"] == {**saved["Sink/beamline"]}
    advance(new, clock, 0.25)
    assert [name for name, _ in procs.spawned[spawned:]] == ["Sorter/xrf"]  # only the one waiting to restart
    state = new.state()
    assert state["Sorter/xrf"]["restarts"] == 1 and state["Sorter/xrf"]["last_exit"]["how"] == "killed by SIGKILL"
    assert state["Sink/beamline"]["pid"] == sink_pid and state["Sink/beamline"]["restarts"] == 1
    assert state["PipelineWorker/xrf-01"]["state"] == "gave up" and state["PipelineWorker/xrf-01"]["restarts"] == 4
    procs.kill(sink_pid)  # the adopted server dies: restarted, the count goes on from 1
    advance(new, clock, 2)
    assert new.state()["Sink/beamline"]["restarts"] == 2
    new.restore("Recorder/tap", 7, {"restarts": "many", "last_exit": 3}, running=True)  # damaged: read what can be
    assert new.state()["Recorder/tap"]["restarts"] == 0 and new.state()["Recorder/tap"]["pid"] == 7


def test_stopping_on_purpose_removes_what_a_killed_supervisor_left(tmp_path) -> None:
    from services.ops import supervise

    (tmp_path / "run").mkdir()
    supervise.state_path(tmp_path).write_text('{"servers": {"Sink/beamline": {"restarts": 3}}}')
    supervise.pid_path(tmp_path).write_text("999999999")  # no such process
    assert supervise.left_behind(tmp_path)  # `tangomesh status` says so
    assert supervise.stop(tmp_path) is False  # none ran
    assert not supervise.state_path(tmp_path).exists() and not supervise.left_behind(tmp_path)
