"""A registered peer played by a test: for tests that talk to a stage by hand.

With data-plane authentication on (the default) a stage admits only the
registered services of the kinds that talk to it; a test that sends a stage
bad input on purpose registers as one of them first, so that what is refused
is the input itself, by its content (tests/unit/test_security.py and the
integration tests show the refusal of peers that are not registered).
"""

from __future__ import annotations

import logging
import os

import zmq

from services import security
from services.component import Counters
from services.registration import ManagerLink, RegistrationClient, wait_registered


class RegisteredPeer:
    """A keypair registered as service ``name`` of ``kind`` in ``pipeline``."""

    def __init__(self, link: ManagerLink, name: str, kind: str, pipeline: str) -> None:
        self.counters = Counters(logging.getLogger("test.peer"))
        self.auth = security.Auth(link, self.counters, name)
        self.registration = RegistrationClient(link, {
            "name": name, "kind": kind, "pipeline": pipeline, "host": "127.0.0.1", "pid": os.getpid(),
            "endpoints": {}, **self.auth.registration_fields()})
        self.registration.start()
        wait_registered(self.registration)

    def socket(self, socket_type: int, endpoint: str, linger: int = 2000) -> zmq.Socket:
        """A socket of ``socket_type`` connected to ``endpoint`` as this peer."""
        sock = zmq.Context.instance().socket(socket_type)
        sock.linger = linger
        self.auth.connect(sock, endpoint)
        return sock

    def close(self) -> None:
        self.registration.stop(deregister=True)
