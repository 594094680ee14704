"""How many workers a pipeline should have: the autoscaler's policy, without Tango.

The load is what the pipeline's master publishes (``services/ops/autoscaler.py``
reads it once a second): how full its burst queue is, whether it holds the
sources back (the queue is full: the workers do not keep up), its events per
second, the workers it has, and whether a scan is open. The rules, in order:

* never below ``min_workers`` nor above ``max_workers``;
* **up** by ``step_up`` when the pipeline has been overloaded (sources held,
  or the queue fuller than ``queue_high``) for ``up_after_s`` without a break;
* **down** to ``min_workers`` once the pipeline has been idle (no open scan,
  nothing queued) for ``idle_down_s``: a worker only ever leaves an idle
  pipeline, so no unit is in flight on it (nothing to drain, nothing re-sent);
* at most one change every ``cooldown_s``: a new worker needs time to join
  and take work before its effect shows in the load.

Every change is a :class:`Decision` with the reason and the load it saw, kept
for the ``Decisions`` attribute and ``tangomesh status``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ScalePolicy:
    min_workers: int = 1
    max_workers: int = 4
    step_up: int = 1
    queue_high: float = 0.5  # share of MaxQueueBytes
    up_after_s: float = 2.0
    idle_down_s: float = 20.0
    cooldown_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ValueError(f"need 0 <= MinWorkers <= MaxWorkers, MaxWorkers >= 1 "
                             f"(got {self.min_workers}, {self.max_workers})")
        if self.step_up < 1 or not 0 < self.queue_high <= 1:
            raise ValueError("StepUp >= 1 and 0 < QueueHigh <= 1")
        if min(self.up_after_s, self.idle_down_s, self.cooldown_s) < 0:
            raise ValueError("the autoscaler's times must be >= 0")


@dataclass(frozen=True)
class Load:
    workers: int
    queue_fill: float  # queued bytes / MaxQueueBytes
    sources_held: bool
    events_per_s: float
    scan_open: bool

    def busy_or_queued(self, policy: ScalePolicy) -> bool:
        return self.sources_held or self.queue_fill >= policy.queue_high


@dataclass(frozen=True)
class Decision:
    at: float  # time.time()
    workers_from: int
    workers_to: int
    reason: str
    load: Load

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "load": asdict(self.load)}


class Scaler:
    """One pipeline's decisions over time (``now``: a monotonic clock, ``wall``: for the record)."""

    def __init__(self, policy: ScalePolicy) -> None:
        self.policy = policy
        self.loaded_since: float | None = None
        self.idle_since: float | None = None
        self.last_change = float("-inf")

    def decide(self, load: Load, now: float, wall: float) -> Decision | None:
        p = self.policy
        if load.workers < p.min_workers:
            return self._change(load, p.min_workers, f"below the minimum of {p.min_workers}", now, wall)
        if load.workers > p.max_workers:
            return self._change(load, p.max_workers, f"above the maximum of {p.max_workers}", now, wall)
        if load.busy_or_queued(p):
            self.loaded_since = now if self.loaded_since is None else self.loaded_since
        else:
            self.loaded_since = None
        idle = not load.scan_open and load.queue_fill == 0 and not load.sources_held
        if idle:
            self.idle_since = now if self.idle_since is None else self.idle_since
        else:
            self.idle_since = None
        if now - self.last_change < p.cooldown_s:
            return None
        if self.loaded_since is not None and now - self.loaded_since >= p.up_after_s and load.workers < p.max_workers:
            why = "sources held back" if load.sources_held else f"queue {load.queue_fill:.0%} full"
            return self._change(load, min(p.max_workers, load.workers + p.step_up),
                                f"{why} for {now - self.loaded_since:.1f} s", now, wall)
        if self.idle_since is not None and now - self.idle_since >= p.idle_down_s and load.workers > p.min_workers:
            return self._change(load, p.min_workers, f"idle for {now - self.idle_since:.0f} s", now, wall)
        return None

    def _change(self, load: Load, target: int, reason: str, now: float, wall: float) -> Decision:
        self.last_change = now
        self.loaded_since = None
        return Decision(wall, load.workers, target, reason, load)
