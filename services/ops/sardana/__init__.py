"""Sardana drives the mesh: a scan recorder and macros for a MacroServer (docs/sardana.md).

Sardana finds recorders and macros by directory, not by import: put
:data:`RECORDER_PATH` on the MacroServer's ``RecorderPath`` property and
:data:`MACRO_PATH` on its ``MacroPath`` (``python -m services.ops.sardana``
prints both). The files there are thin: they hold the classes Sardana must
find in them and hand everything else to :mod:`services.ops.sardana.mapping`
(Sardana's scan description -> the mesh's scan document, Tango-free) and
:mod:`services.ops.sardana.feed` (StartScan, the ``sardana`` stream, EndScan
or AbortScan).
"""

from __future__ import annotations

from pathlib import Path

RECORDER_PATH = str(Path(__file__).parent / "recorders")
MACRO_PATH = str(Path(__file__).parent / "macros")
