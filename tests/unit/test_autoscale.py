"""The autoscaler's policy: up after sustained overload, down only when idle, bounded, one change per cool-down."""

from __future__ import annotations

import pytest

from services.ops.autoscale import Load, ScalePolicy, Scaler

POLICY = ScalePolicy(min_workers=1, max_workers=3, up_after_s=2.0, idle_down_s=10.0, cooldown_s=5.0)


def load(workers: int, held: bool = False, fill: float = 0.0, scan: bool = True) -> Load:
    return Load(workers=workers, queue_fill=fill, sources_held=held, events_per_s=100.0, scan_open=scan)


def run(scaler: Scaler, loads: list[tuple[float, Load]]) -> list[tuple[float, int, str]]:
    out = []
    for t, current in loads:
        d = scaler.decide(current, t, 1000.0 + t)
        if d:
            out.append((t, d.workers_to, d.reason))
    return out


def test_sustained_overload_adds_a_worker_per_cool_down_up_to_the_maximum() -> None:
    scaler = Scaler(POLICY)
    workers, decisions = 1, []
    for k in range(60):  # sources held back for 30 s, looked at twice a second
        d = scaler.decide(load(workers, held=True), k * 0.5, 1000.0 + k * 0.5)
        if d:
            decisions.append((k * 0.5, d.workers_to, d.reason))
            workers = d.workers_to
    assert [(t, n) for t, n, _ in decisions] == [(2.0, 2), (7.0, 3)]  # after 2 s, then a cool-down later; capped
    assert all("sources held back" in why for *_, why in decisions)


def test_an_overload_that_breaks_off_does_not_count_and_a_full_queue_does() -> None:
    scaler = Scaler(POLICY)
    flicker = [(t * 0.5, load(1, held=t % 3 != 2)) for t in range(12)]  # never 2 s in a row
    assert run(scaler, flicker) == []
    assert run(scaler, [(10.0 + t * 0.5, load(1, fill=0.8)) for t in range(6)])[0][:2] == (12.0, 2)


def test_a_pipeline_goes_back_to_the_minimum_only_once_idle_long_enough() -> None:
    scaler = Scaler(POLICY)
    busy_but_keeping_up = [(float(t), load(3)) for t in range(30)]  # a scan open, nothing queued
    assert run(scaler, busy_but_keeping_up) == []
    queued_after_the_end = [(30.0 + t, load(3, fill=0.1, scan=False)) for t in range(5)]  # units still in flight
    assert run(scaler, queued_after_the_end) == []
    idle = [(35.0 + t, load(3, scan=False)) for t in range(12)]
    assert [(t, n) for t, n, _ in run(scaler, idle)] == [(45.0, 1)]


def test_counts_outside_the_bounds_are_corrected_at_once() -> None:
    assert run(Scaler(POLICY), [(0.0, load(0))]) == [(0.0, 1, "below the minimum of 1")]
    assert run(Scaler(POLICY), [(0.0, load(7))]) == [(0.0, 3, "above the maximum of 3")]


@pytest.mark.parametrize("fields, why", [({"min_workers": 3, "max_workers": 2}, "MinWorkers <= MaxWorkers"),
                                         ({"queue_high": 0}, "QueueHigh"), ({"cooldown_s": -1}, "times")])
def test_a_policy_that_cannot_work_is_refused(fields, why) -> None:
    with pytest.raises(ValueError, match=why):
        ScalePolicy(**fields)


def test_the_component_applies_a_decision_records_it_and_reports_the_workers_running() -> None:
    from services.ops.autoscaler import AutoscalerComponent, AutoscalerConfig

    clock = iter([0.0, 0.5, 1.0, 1.5])
    loads = iter([load(1, held=True)] * 4)
    applied: list[int] = []

    def scale_to(n: int) -> int:
        applied.append(n)
        return n

    component = AutoscalerComponent("test/autoscaler/1", "xrd", AutoscalerConfig(up_after_s=1.0, cooldown_s=0.0),
                                    lambda: next(loads), scale_to, clock=lambda: next(clock))
    assert [component.step() for _ in range(2)] == [None, None]
    decision = component.step()
    assert decision is not None and decision.workers_to == 2 and applied == [2]
    assert component.target == component.workers == 2 and list(component.decisions) == [decision]
    assert decision.to_json()["load"]["sources_held"] is True
    assert "1 -> 2" in component.status()


def test_a_config_that_cannot_work_refuses_the_device_at_start() -> None:
    from services.ops.autoscaler import AutoscalerConfig

    with pytest.raises(ValueError, match="Backend"):
        AutoscalerConfig(backend="kubernetes")
    with pytest.raises(ValueError, match="MinWorkers <= MaxWorkers"):
        AutoscalerConfig(min_workers=5, max_workers=2)
