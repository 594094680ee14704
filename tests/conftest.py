"""Fixtures for tests against real parts: the embedded Tango database and real
device-server processes started from the installed console scripts.

Fixtures only: the helpers behind them live in the ``support`` package, which
tests import directly."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

from services.ops.home import EmbeddedDatabase
from support import ServerHandle, ServerPool


@pytest.fixture(scope="session")
def tango_db(tmp_path_factory) -> Iterator[str]:
    """The embedded sqlite Tango database, started by tangomesh's own code."""
    root = tmp_path_factory.mktemp("tangomesh-home")
    for sub in ("logs", "run"):
        (root / sub).mkdir()
    db = EmbeddedDatabase(root)
    tango_host = db.start()
    os.environ["TANGO_HOST"] = tango_host
    os.environ["TANGOMESH_HOME"] = str(root)
    yield tango_host
    db.stop()


@pytest.fixture
def tango_server(tango_db, tmp_path) -> Iterator[Callable[..., ServerHandle]]:
    """start(server, {class: {device: {property: value}}}) declares a server in
    the database and runs its console script; every server is stopped at teardown."""
    pool = ServerPool(tmp_path)
    yield pool.start
    pool.stop_all()
