"""The tangomesh scan recorder, as Sardana finds it on a MacroServer's ``RecorderPath``.

Select it with ``senv DataRecorder TangoMeshRecorder`` (no file needed), or as
a file recorder next to others: ``senv ScanFile "['scan.h5', 'scan.tangomesh']"``
and ``senv ScanRecorder "['NXscanH5_FileRecorder', 'TangoMeshRecorder']"``
(it writes no file; the name only pairs it with the list). docs/sardana.md.

Sardana loads recorder classes from the files themselves, so the class is
defined here and stays thin: everything it does is in
``services.ops.sardana.feed`` (the mesh) and ``.mapping`` (the document).
"""

from __future__ import annotations

from typing import Any

from sardana.macroserver.scan.gscan import ScanEndStatus
from sardana.macroserver.scan.recorder.storage import BaseFileRecorder

from services.ops.sardana.feed import MeshScan, describe, settings_from
from services.ops.sardana.mapping import ENV_NAMES


class TangoMeshRecorder(BaseFileRecorder):
    """Runs each Sardana scan on the mesh: StartScan at the start (raising, so
    the macro stops, when a selected pipeline is down or refuses), one block
    of the ``sardana`` stream per record, EndScan or AbortScan at the end."""

    formats = {"tangomesh": ".tangomesh"}

    def __init__(self, filename: str | None = None, macro: Any = None, **pars: Any) -> None:
        BaseFileRecorder.__init__(self, **pars)
        self.filename = filename
        self.macro = macro
        self.scan: MeshScan | None = None

    def getFormat(self) -> str:
        return "tangomesh"

    def _startRecordList(self, recordlist: Any) -> None:
        macro = self.macro
        settings = settings_from(macro.getEnv, ENV_NAMES)
        scan = MeshScan(describe(macro, recordlist.getEnviron()), settings)
        scan.start()  # raises with the reason: the macro stops before its first point
        self.scan = scan
        macro.info("tangomesh: scan %s started on %s", scan.scan_id, ", ".join(settings.pipelines))

    def _writeRecord(self, record: Any) -> None:
        if self.scan is not None:
            self.scan.record(record.data)

    def _endRecordList(self, recordlist: Any) -> None:
        if self.scan is None:
            return
        scan, self.scan = self.scan, None
        status = ScanEndStatus.whatis(recordlist.getEnviron().get("endstatus", ScanEndStatus.Normal))
        outcome = scan.end(str(status))
        self.macro.info("tangomesh: scan %s %s", scan.scan_id, outcome)
