"""The argument of ``PipelineMaster.AbortScan``: a scan id, or a scan id with the reason.

A control system that aborts a scan knows why (the operator stopped the macro,
a motor faulted); the reason travels with ``scan_abort`` to every consumer, so
that the sink and the files say it, not only the control system's log. The
bare scan id stays valid so that existing callers (the CLI, scripts typed at
a Tango shell) keep working; a JSON object (``schemas/abort.json``) carries
the reason. Both sides use this module: the masters' device parses, the
control-system adapters build.
"""

from __future__ import annotations

import json

from services import schema

#: How much of a reason travels: enough for a sentence and an error message, never a traceback dump.
MAX_REASON = 2000


def abort_argument(scan_id: str, reason: str = "") -> str:
    """What to pass to ``AbortScan``: the bare id without a reason, else the JSON object."""
    if not reason:
        return scan_id
    return json.dumps({"scan": scan_id, "reason": " ".join(reason.split())[:MAX_REASON]})


def parse_abort(text: str) -> tuple[str, str]:
    """``(scan_id, reason)`` of an AbortScan argument; SchemaError (a ValueError) if it is malformed.

    A scan id never starts with ``{`` (``services/schemas/scan.json``), so the
    two forms cannot be confused."""
    if not isinstance(text, str) or not text.strip():
        raise schema.SchemaError("invalid abort: an empty argument (give the scan id)")
    if not text.lstrip().startswith("{"):
        return text, ""
    document = schema.parse("abort", text)
    return document["scan"], document.get("reason", "")
