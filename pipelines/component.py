"""What every stage of a pipeline (master, worker, sorter) sets up the same way."""

from __future__ import annotations

import logging
import threading

import zmq

from services import schema
from services.component import Component
from services.registration import ManagerLink


class PipelineComponent(Component):
    """A component bound to one pipeline, with the topology link, the process's
    ZeroMQ context, and threads started by :meth:`start` and joined by :meth:`stop`."""

    def __init__(self, name: str, pipeline: str, link: ManagerLink, log: logging.Logger) -> None:
        super().__init__(name, pipeline, log)
        if not pipeline:
            raise ValueError(f"the Pipeline property must name the pipeline this {self.kind} serves")
        schema.preload("scan")  # at start, not as a ~60 ms stall on the first scan
        self.link = link
        self.context = zmq.Context.instance()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads; subclasses close their sockets after this."""
        super().stop()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(5)
