"""Fixtures of the component layer: a pipeline's whole chain in this process."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

import pytest

from support.chain import Chain, build_chain, threads_left


@pytest.fixture
def make_chain() -> Iterator[Callable[..., Chain]]:
    """``make_chain(**build_chain_options)`` starts a chain; at teardown every
    chain is closed and no thread it started may be left running."""
    before = set(threading.enumerate())
    chains: list[Chain] = []

    def make(**options) -> Chain:
        chain = build_chain(**options)
        chains.append(chain)
        return chain

    yield make
    for chain in chains:
        chain.close()
    deadline = time.monotonic() + 10  # joins are bounded (5 s per component thread), so this is a generous wait
    while threads_left(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not threads_left(before), f"threads left running: {[t.name for t in threads_left(before)]}"
