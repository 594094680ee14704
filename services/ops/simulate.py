"""One pipeline fed by a plumbing profile: what the pipeline tests and benchmarks drive.

:class:`SimBeamline` binds a profile (``services/sim/profiles.py``) to one
pipeline: the scan driver's sources and probe for it, registered once, and
scans of any number of points through that pipeline's master. The driving
itself is :class:`~services.ops.driver.ScanDriver`'s.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from services.ops.driver import ScanDriver
from services.ops.probe import Tally
from services.registration import ManagerLink, master_proxy
from services.sim.profiles import PROFILES, Profile, ProfileScan
from services.source import SourceClient


class SimBeamline:
    """A profile's sources and a probe, registered for one pipeline, able to
    run scans through that pipeline's master (found in the topology)."""

    def __init__(self, pipeline: str, profile: str | Profile, link: ManagerLink, host: str = "127.0.0.1",
                 keep: bool = False, streams: list[str] | None = None) -> None:
        self.pipeline = pipeline
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.link = link
        self.streams = tuple(streams or self.profile.streams)
        self.driver = ScanDriver(link, {pipeline: self.streams}, host, keep)

    @property
    def sources(self) -> dict[str, SourceClient]:
        """stream -> its source (tests send bad blocks through their sockets)."""
        return {stream: source for (_, stream), source in self.driver.sources.items()}

    def master(self) -> Any:
        return master_proxy(self.link, self.pipeline)

    def scan(self, points: int, rate: float = 0.0, block: int | dict[str, int] = 100, scan_id: str | None = None,
             skip: dict[str, set[int]] | None = None, analysis: dict[str, Any] | None = None,
             timeout: float = 120.0, during: Callable[[], None] | None = None,
             before: Callable[[str], None] | None = None,
             geometry: dict[str, Any] | None = None) -> tuple[dict[str, Any], Tally]:
        """One scan of ``points``; the JSON-able summary and the probe's tally.
        ``analysis`` overrides entries of the pipeline's analysis section,
        ``geometry`` replaces the default one; the rest is
        :meth:`ScanDriver.run`'s."""
        scan_id = scan_id or f"sim-{self.pipeline}-{time.time_ns() // 1000}"
        data = ProfileScan(self.profile, self.pipeline, points, geometry, analysis, self.streams)
        outcome = self.driver.run(data, scan_id, int(time.time()) % 1_000_000, rate=rate, block=block, skip=skip,
                                  timeout=timeout, before=before, during=during)
        summary = {"scan": scan_id, "pipeline": self.pipeline, **outcome.per_pipeline[self.pipeline]}
        return summary, outcome.tallies[self.pipeline]

    def close(self) -> None:
        self.driver.close()
