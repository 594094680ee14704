"""Macros for a spock session at a mesh-driven beamline (``MacroPath``: docs/sardana.md).

``tangomesh_status`` prints the mesh: each pipeline (up or DOWN), its master,
sorter, workers and sources, and each master's open scans. The logic is in
``services.ops.sardana.feed.status_lines``; this file holds what Sardana must
find in it.
"""

from __future__ import annotations

from sardana.macroserver.macro import macro

from services.ops.sardana.feed import status_lines
from services.ops.sardana.mapping import ENV_MANAGER
from services.registration import DEFAULT_TOPOLOGY_DEVICE, TangoManagerLink


@macro()
def tangomesh_status(self):
    """Print the state of the tangomesh data-analysis mesh: pipelines, masters, workers, open scans."""
    try:
        manager = self.getEnv(ENV_MANAGER)
    except Exception:  # noqa: BLE001 - UnknownEnv: the default manager
        manager = DEFAULT_TOPOLOGY_DEVICE
    try:
        lines = status_lines(TangoManagerLink(manager))
    except Exception as exc:  # noqa: BLE001 - the operator asked: say why there is no answer
        self.error("tangomesh: the topology manager %s does not answer: %s", manager, exc)
        return
    self.output("tangomesh mesh (topology manager %s):", manager)
    for line in lines:
        self.output(line)
