"""XspressIngester's component: an Xspress3 stream (MAX IV ``xspress3-streamer``, ZeroMQ PUB) as one named stream.

The EIGER ingester's plumbing (:class:`ingesters.eiger.EigerComponent`: the
loop thread, the scan finder, one source socket per pipeline, backpressure
from the masters) with two differences:

* the detector socket is a **SUB** connected to the streamer's PUB and
  subscribed to everything at start-up, and it stays subscribed: PUB has
  no handshake and drops what it sends before a subscriber has joined (the
  slow joiner), so an ingester that subscribed only at a scan's start would
  lose its first messages. PUB also drops what a subscriber cannot take:
  the SUB's queue is large (:data:`SUB_HWM` messages) so that the pause at
  a series start (one ``OpenScans`` read per pipeline) and a master's
  backpressure are absorbed; frames lost beyond that come out as gaps at
  their own indices (the frame numbers say which), never as a shift;
* messages are decoded by :class:`ingesters.xspress.XspressDecoder` (both
  message forms, dead time from the raw counters, the restricted
  unpickler), which keeps the state of the old three-message form.

Series, frame numbers, gaps and restarts follow :mod:`ingesters.series`,
as for the EIGER (docs/ingesters.md).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from ingesters.eiger import EigerComponent, OpenScans, check_series_stream
from ingesters.series import ScanChoice
from ingesters.xspress import MAX_BINS, MAX_CHANNELS, XspressDecoder
from services.dataplane import limit_frames
from services.registration import ManagerLink

log = logging.getLogger("tangomesh.ingester.xspress")

#: messages queued in the SUB socket: the old form sends 3 per frame, so ~1300 frames
#: (about 85 MiB of 4-channel spectra) absorb a pause before PUB drops (then: gaps)
SUB_HWM = 4000
MAX_PART_BYTES = MAX_CHANNELS * MAX_BINS * 4  # the largest spectra part the decoder takes; ZeroMQ drops a larger one


@dataclass(frozen=True)
class XspressConfig:
    endpoint: str = ""  # the streamer's PUB, tcp://host:port (the port its device publishes on)
    stream: str = "xspress3"
    pipelines: tuple[str, ...] = ()  # default: the device's Pipeline
    block_frames: int = 16  # most frames in one block; fewer when the streamer has sent nothing more
    scan_wait: float = 10.0  # a series waits this long for a scan that takes its stream, then is refused
    channels: tuple[int, ...] = ()  # detector channels kept, in this order; () keeps all

    def __post_init__(self) -> None:
        check_series_stream(self, "StreamerEndpoint", "tcp://host:port")
        if len(set(self.channels)) != len(self.channels) or any(not 0 <= c < MAX_CHANNELS for c in self.channels):
            raise ValueError(f"ChannelsKept must be distinct channel numbers 0..{MAX_CHANNELS - 1}, "
                             f"not {list(self.channels)}")


class XspressComponent(EigerComponent):
    thread_prefix = "xspress"
    logger = log

    def __init__(self, name: str, config: XspressConfig, link: ManagerLink, host: str, open_scans: OpenScans,
                 thread_factory: Callable[..., threading.Thread] = threading.Thread) -> None:
        super().__init__(name, config, link, host, open_scans, thread_factory)  # type: ignore[arg-type]
        self.decoder = XspressDecoder(config.channels or None)
        self.capabilities = {"stream": config.stream, "detector": config.endpoint, "protocol": "xspress3-zmq"}

    def _open_detector(self) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.rcvhwm = SUB_HWM
        sock.linger = 0
        limit_frames(sock, MAX_PART_BYTES)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.config.endpoint)
        return sock

    def _found(self, choice: ScanChoice | None) -> None:
        """The streamer never says how many frames a series has: a series is taken to cover the
        scan it joins. A scan is joined by one series only, so whatever frames have not come when
        the series ends (or the streamer restarts) never come: they are declared missing then,
        and the scan completes without waiting for the master's incomplete timeout."""
        header = self._finding_header
        if choice is not None and header is not None and header.expected is None:
            self._finding_header = dataclasses.replace(header, expected=max(0, choice.points - choice.first_index))
        super()._found(choice)

    def _decode(self, parts: list[Any]) -> list[Any]:
        try:
            return self.decoder.feed(parts)
        finally:
            for problem in self.decoder.pop_problems():  # an old-form frame cut short by the next message
                self.counters.error(f"{self.config.stream}: {problem}")
