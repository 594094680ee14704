"""Helpers shared by the test layers, in one importable place.

Tests import helpers from here (``from support import wait_for``), never from
``conftest`` or from another test module: conftest.py holds fixtures only, and
pytest finds this package through ``pythonpath = tests`` in setup.cfg.
The component chain (every pipeline stage in one process) is
:mod:`support.chain`.
"""

from support.geometry import map_by_hand, scan_geometry
from support.servers import ServerHandle, ServerPool, topology_props
from support.waiting import wait_for

__all__ = ["ServerHandle", "ServerPool", "map_by_hand", "scan_geometry", "topology_props", "wait_for"]
