"""Console scripts a branch adds before the shared venv's entry points know them.

A fresh clone's ``make test`` installs every console script of setup.cfg
(``pip install -e .``); a development venv installed from an older
setup.cfg lacks the new ones. :func:`on_path` writes the missing script
into a temporary directory put first on PATH (where
``services.ops.home.executable`` looks after the venv's bin/), so the
server runs under its own name as Starter would run it.
"""

from __future__ import annotations

import os
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def on_path(directory: Path, scripts: dict[str, str]) -> Iterator[None]:
    """``scripts``: name -> ``module:function`` (as in setup.cfg)."""
    from services.ops.home import bin_dir

    missing = {n: target for n, target in scripts.items() if not (bin_dir() / n).exists()}
    for name, target in missing.items():
        module, function = target.split(":")
        script = directory / name
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    old = os.environ["PATH"]
    if missing:
        os.environ["PATH"] = f"{directory}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old
