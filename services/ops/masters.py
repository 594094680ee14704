"""The control system's side of one scan: StartScan, EndScan, AbortScan on every pipeline's master.

Each pipeline of a scan has one master, and each gets the whole document (it
takes its own analysis entry). A scan that fails after some masters started
it must be aborted on each of those, or they would hold it open waiting for
data that never comes. The scan driver and the Bluesky adapter play the
control system through :class:`ScanMasters`; a Sardana recorder will too.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping

from services.registration import ManagerLink, master_proxy

log = logging.getLogger("tangomesh.masters")


class ScanMasters:
    """The masters of ``pipelines`` (found in the topology), for one scan."""

    def __init__(self, link: ManagerLink, pipelines: Iterable[str]) -> None:
        self.proxies: dict[str, Any] = {pipeline: master_proxy(link, pipeline) for pipeline in pipelines}
        self.started: list[str] = []

    def start(self, document: Mapping[str, Any]) -> None:
        """StartScan on every master, or on none: if one refuses, those already started are aborted."""
        scan_id = document["scan"]["id"]
        text = json.dumps(document)
        try:
            for pipeline, proxy in self.proxies.items():
                proxy.StartScan(text)
                self.started.append(pipeline)
        except BaseException:
            self.abort(scan_id)
            raise

    def end(self, scan_id: str) -> None:
        """EndScan on every master (they stay in :attr:`started`: a scan whose
        end never arrives downstream can still be aborted)."""
        for proxy in self.proxies.values():
            proxy.EndScan(scan_id)

    def abort(self, scan_id: str) -> None:
        """AbortScan on every master that started the scan; their errors are
        logged, not raised (the scan is failing already: the first error is the one to report)."""
        for pipeline in self.started:
            try:
                self.proxies[pipeline].AbortScan(scan_id)
            except Exception as exc:  # noqa: BLE001 - e.g. the master has ended or lost the scan already
                log.warning("AbortScan %s on pipeline %s: %s", scan_id, pipeline, exc)
        self.started.clear()
