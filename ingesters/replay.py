"""FileIngester's component: an EIGER's HDF5 output replayed into the mesh as a live stream would come.

Each :meth:`FileComponent.replay` request (the device's ``Replay`` command)
plays the master file's frames as one series, on the loop thread: the
series' start asks the masters for the scan it joins (as a live detector's
arm does, :class:`ingesters.base.IngesterComponent`), then the frames are
read still compressed (:mod:`ingesters.eiger_files`), mapped by
:class:`ingesters.series.SeriesMapper` and sent at the chosen pace:
``recorded`` (the master file's ``frame_time`` apart), a rate in frames/s,
or ``max`` (as fast as the mesh takes them). A master that holds the stream
back holds the replay back; nothing is dropped. One replay at a time; a
request while one plays is refused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ingesters.base import IngesterComponent, OpenScans
from ingesters.eiger_files import EigerMaster, FileLayoutError
from ingesters.series import SeriesMapper
from ingesters.simplon import Frame
from services import schema
from services.registration import ManagerLink

log = logging.getLogger("tangomesh.ingester.file")


def parse_pace(pace: Any) -> float | None:
    """Seconds between frames: a number is frames/s, ``max`` is 0, ``recorded`` is None (the file says)."""
    if pace == "recorded":
        return None
    if pace == "max":
        return 0.0
    try:
        rate = float(pace)
    except (TypeError, ValueError):
        raise ValueError(f"pace must be 'recorded', 'max' or frames per second, not {pace!r}") from None
    if not 0 < rate <= 1e6:
        raise ValueError(f"pace must be a rate in (0, 1e6] frames/s, not {pace!r}")
    return 1.0 / rate


@dataclass(frozen=True)
class FileConfig:
    master: str = ""  # the DECTRIS master file, <name>_master.h5
    stream: str = "eiger"
    pipelines: tuple[str, ...] = ()
    pace: str = "recorded"
    block_frames: int = 16
    scan_wait: float = 10.0

    def __post_init__(self) -> None:
        if not self.master:
            raise ValueError("MasterFile must name an EIGER master file")
        if not self.stream or "/" in self.stream or len(self.stream) > 64:
            raise ValueError(f"Stream must be a name without '/', not {self.stream!r}")
        if not self.pipelines:
            raise ValueError("no pipeline to feed: set Pipelines (or Pipeline)")
        parse_pace(self.pace)
        if not 1 <= self.block_frames <= 10_000:
            raise ValueError(f"BlockFrames must be 1..10000 (got {self.block_frames})")
        if self.scan_wait <= 0:
            raise ValueError(f"ScanWaitSeconds must be positive (got {self.scan_wait})")


@dataclass(frozen=True)
class ReplayRequest:
    master: Path
    pace: float | None
    first: int
    count: int | None


class FileComponent(IngesterComponent):
    def __init__(self, name: str, config: FileConfig, link: ManagerLink, host: str, open_scans: OpenScans,
                 thread_factory: Callable[..., threading.Thread] = threading.Thread) -> None:
        super().__init__(name, config.stream, config.pipelines, config.scan_wait, link, host, open_scans,
                         thread_factory, log)
        self.config = config
        self.mapper = SeriesMapper(config.stream, config.block_frames)
        self.replays = 0
        self.playing = False
        self._queue: list[ReplayRequest] = []
        self._kick = threading.Event()
        self.capabilities = {"stream": config.stream, "detector": config.master, "protocol": "eiger-hdf5"}

    def start(self) -> None:
        with EigerMaster(self.config.master):  # a master file that cannot be read fails the start, saying why
            pass
        self.start_sources()
        self.start_threads(self._run, "file")
        log.info("replaying %s as stream %s for %s on request", self.config.master, self.config.stream,
                 ", ".join(self.config.pipelines))

    def stop(self) -> None:
        self._kick.set()
        self.stop_common()

    # ------------------------------------------------------------ requests (Tango thread)
    def replay(self, text: str) -> int:
        """Queue one replay from the ``Replay`` command's JSON (``services/schemas/file-replay.json``);
        returns its series number. ValueError refuses it, saying why."""
        doc = schema.validate("file-replay", schema.load_json("file-replay", text or "{}"))
        if self.playing or self._queue:
            raise ValueError("a replay is playing; wait for its end")
        master = Path(doc.get("file", self.config.master))
        with EigerMaster(master) as m:  # refused now, not later on the loop thread
            first, count = doc.get("first", 0), doc.get("count")
            if first + (count if count is not None else 1) > m.frames:
                raise ValueError(f"{master}: frames from {first}, {count or 'all'} of them: the file has {m.frames}")
        self.playing = True
        self._queue.append(ReplayRequest(master, parse_pace(doc.get("pace", self.config.pace)), first, count))
        self._kick.set()
        return self.replays + 1

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._kick.wait(0.5)
            self._kick.clear()
            while self._queue and not self._stopping.is_set():
                request = self._queue.pop(0)
                try:
                    self._play(request)
                except (FileLayoutError, ValueError) as exc:
                    self.counters.error(f"{self.stream}: replay of {request.master} stopped: {exc}")
                    self.send(self.mapper.cut(f"the replay stopped: {exc}"))
                except Exception as exc:  # a bug must not stop the ingester
                    log.exception("replay failed")
                    self.counters.error(f"internal error: {exc!r}")
                    self.send(self.mapper.cut(f"the replay failed: {exc!r}"))
                finally:
                    self.targets = ()
                    self.playing = False

    def _play(self, request: ReplayRequest) -> None:
        self.replays += 1
        series = self.replays
        with EigerMaster(request.master) as master:
            pace = master.frame_time if request.pace is None else request.pace
            events = master.events(series, request.first, request.count)
            start = next(events)
            future: concurrent.futures.Future = self.request_scan(f"replay {series} of {request.master.name}")
            choice = future.result()
            if choice is None:
                self.refused(f"replay {series}")
                return
            self.joined(choice)
            # the replay is the stream's whole part of the scan: what it does not cover is missing at its end
            start = dataclasses.replace(start, expected=max(start.expected or 0, choice.points - choice.first_index))
            log.info("replay %d of %s (%d frames, %s) joins scan %s", series, request.master,
                     request.count or master.frames - request.first,
                     "as fast as taken" if not pace else f"{pace:g} s apart", choice.scan)
            self.send(self.mapper.bind(start, choice))
            t0 = time.monotonic()
            for event in events:
                if self._stopping.is_set():
                    return
                if isinstance(event, Frame):
                    if pace:
                        wait = t0 + event.frame * pace - time.monotonic()
                        if wait > 0:
                            self.send(self.mapper.flush())  # what is pending goes before the pause
                            self._stopping.wait(wait)
                    self.send(self.mapper.frame(event))
                else:
                    self.send(self.mapper.end(event))
            self.send(self.mapper.flush())

    # ------------------------------------------------------------ views
    @property
    def current_scan(self) -> str:
        return self.mapper.scan

    def status(self) -> str:
        state = f"replay {self.replays} -> scan {self.mapper.scan}" if self.mapper.open else \
            "looking for a scan" if self.playing else "idle"
        return (f"{self.config.master} as stream {self.stream}: {state}; {self.replays} replays, "
                f"{self.mapper.frames} frames sent, {self.refused_series} refused.")
