"""pyFAI, loaded in one place: imported on first use (it takes seconds; the
CLI must not pay that) and without silx's OpenCL probe (no accelerator is
assumed; the probe only warns). Used by the ``xrd`` processor and the
simulated Eiger, so both integrate with the same geometry code."""

from __future__ import annotations

import os
from typing import Any


def integrator_module() -> Any:
    """pyFAI, imported on first use (it takes seconds; the CLI must not pay
    that). No accelerator here: silx's OpenCL probe is switched off (it only warns)."""
    os.environ.setdefault("SILX_OPENCL", "0")
    import pyFAI
    import pyFAI.integrator.azimuthal  # noqa: F401 - what load() builds

    return pyFAI


def integrator(config: dict[str, Any]) -> Any:
    """A pyFAI AzimuthalIntegrator from its ``get_config()`` dictionary."""
    return integrator_module().load(config)
