"""The control system's side of one scan: StartScan, EndScan, AbortScan on every pipeline's master.

Each pipeline of a scan has one master, and each gets the whole document (it
takes its own analysis entry). A scan that fails after some masters started
it must be aborted on each of those, or they would hold it open waiting for
data that never comes. The scan driver and the Bluesky adapter play the
control system through :class:`ScanMasters`; a Sardana recorder will too.

One dead master must not stall the others: a killed master refuses calls at
once, but a hung one (stopped, swapping) holds every Tango call until the
client timeout. So EndScan and AbortScan go to all masters at once, each
bounded, and a :class:`MasterWatch` tells the driver, while the scan runs,
which masters no longer hold it, so that it stops feeding those pipelines
and carries on with the others.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from services.component import brief
from services.registration import ManagerLink, master_proxy
from services.scan_control import abort_argument

log = logging.getLogger("tangomesh.masters")

#: Client timeout of EndScan and AbortScan.
CALL_TIMEOUT_MS = 5000
#: StartScan's client timeout (it may load a processor), and the least a deadline leaves it.
START_TIMEOUT_MS = 15000
START_MIN_TIMEOUT_MS = 500
#: How often the watch asks each master for its current scan, and its client timeout doing so
#: (a call to a hung server fails after twice that: Tango tries to reconnect once).
WATCH_PERIOD_S = 0.5
WATCH_TIMEOUT_MS = 1000
#: A master that has not answered with the scan for this long has lost it: longer than a
#: restart's blip of refused calls, short against any --timeout a user gives.
LOST_AFTER_S = 3.0


def describe(exc: BaseException) -> str:
    """A Tango error's description, else the exception's text: one short line."""
    args = getattr(exc, "args", ())
    text = getattr(args[0], "desc", None) if args else None
    return brief(" ".join(str(text or exc or type(exc).__name__).split()), 200)


class MasterWatch:
    """Which pipelines' masters have lost the scan, and why.

    One thread per master reads its ``CurrentScan`` every
    :data:`WATCH_PERIOD_S`; a master that for :data:`LOST_AFTER_S` has not
    answered, or answered with another scan (it was restarted and the scan
    died with it), is put in :attr:`lost` for good. The threads are daemons
    and never joined: one stuck in a call to a stopped master ends with its
    client timeout.
    """

    def __init__(self, scan_id: str, readers: Mapping[str, Callable[[], str]], lost_after: float = LOST_AFTER_S,
                 period: float = WATCH_PERIOD_S) -> None:
        self.scan_id = scan_id
        self.lost: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost_after, self._period = lost_after, period
        for pipeline, read in readers.items():
            threading.Thread(target=self._watch, args=(pipeline, read), name=f"watch-{pipeline}-master",
                             daemon=True).start()

    def lose(self, pipeline: str, reason: str) -> None:
        with self._lock:
            if pipeline not in self.lost:
                self.lost[pipeline] = reason
                log.warning("scan %s: pipeline %s lost: %s", self.scan_id, pipeline, reason)

    def is_lost(self, pipeline: str) -> bool:
        return pipeline in self.lost

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, pipeline: str, read: Callable[[], str]) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self._period):
            try:
                current = read()
            except Exception as exc:  # noqa: BLE001 - not answering is what is watched for
                problem = f"its master does not answer ({describe(exc)})"
            else:
                if current == self.scan_id:
                    last_ok = time.monotonic()
                    continue
                problem = f"its master no longer holds the scan (current: {current or 'none'}; restarted?)"
            if self._stop.is_set():
                return
            if time.monotonic() - last_ok >= self._lost_after:
                self.lose(pipeline, problem)
                return


def _all_at_once(calls: Mapping[str, Callable[[], Any]], wait_s: float,
                 given_up: Callable[[str], bool] = lambda pipeline: False) -> dict[str, str]:
    """Run each call on its own thread; the pipelines whose call failed, did
    not return within ``wait_s`` or was ``given_up`` on meanwhile, with why.
    Threads still running are left to their client timeout."""
    errors: dict[str, str] = {}
    done: dict[str, threading.Event] = {}

    def run(pipeline: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - reported per pipeline
            errors[pipeline] = describe(exc)
        finally:
            done[pipeline].set()

    for pipeline, call in calls.items():
        done[pipeline] = threading.Event()
        threading.Thread(target=run, args=(pipeline, call), name=f"call-{pipeline}-master", daemon=True).start()
    deadline = time.monotonic() + wait_s
    pending = set(done)
    while pending and time.monotonic() < deadline:
        for pipeline in list(pending):
            if done[pipeline].is_set():
                pending.discard(pipeline)
            elif given_up(pipeline):
                errors.setdefault(pipeline, "given up waiting")
                pending.discard(pipeline)
        if pending:
            next(iter(done[p] for p in pending)).wait(0.05)
    for pipeline in pending:
        if not done[pipeline].is_set():
            errors.setdefault(pipeline, f"no answer within {wait_s:.1f} s")
    return dict(errors)


class ScanMasters:
    """The masters of ``pipelines`` (found in the topology), for one scan.

    A hung master holds any Tango call, even making its proxy (which asks the
    device), for multiples of 3 s whatever the client timeout: so every call
    runs on a thread of its own and is waited for only as long as the
    deadline allows (``deadline``, ``time.monotonic()``; None: the calls'
    own timeouts)."""

    def __init__(self, link: ManagerLink, pipelines: Iterable[str], deadline: float | None = None) -> None:
        self.link = link
        self.deadline = deadline
        chosen = list(pipelines)
        made: dict[str, Any] = {}
        errors = _all_at_once({p: (lambda p=p: made.__setitem__(p, master_proxy(link, p))) for p in chosen},
                              self._wait_s(START_TIMEOUT_MS / 1000))
        if errors:
            raise RuntimeError("; ".join(why if p in why else f"pipeline {p}: {why}" for p, why in errors.items()))
        self.proxies: dict[str, Any] = {p: made[p] for p in chosen}
        self.started: list[str] = []

    def _wait_s(self, longest: float) -> float:
        """How long to wait for a call: ``longest``, less if the deadline is nearer (never below 0.5 s)."""
        if self.deadline is None:
            return longest
        return max(START_MIN_TIMEOUT_MS / 1000, min(longest, self.deadline - time.monotonic()))

    def start(self, document: Mapping[str, Any]) -> None:
        """StartScan on every master (all at once), or on none: if one refuses
        or does not answer in time (RuntimeError naming its pipeline), the
        others are aborted (also the silent one: it may take the call late)."""
        scan_id = document["scan"]["id"]
        text = json.dumps(document)
        refused: list[str] = []

        def start(pipeline: str) -> None:
            try:
                self.proxies[pipeline].StartScan(text)
            except BaseException:
                refused.append(pipeline)
                raise

        errors = _all_at_once({p: (lambda p=p: start(p)) for p in self.proxies}, self._wait_s(START_TIMEOUT_MS / 1000))
        self.started = [p for p in self.proxies if p not in refused]  # started, or maybe later (not answered yet)
        if errors:
            self.abort(scan_id, wait_s=self._wait_s(CALL_TIMEOUT_MS / 1000))
            raise RuntimeError("; ".join(f"StartScan on pipeline {p}: {why}" for p, why in errors.items()))
        for proxy in self.proxies.values():  # from now on a dead master holds nobody up for long
            proxy.set_timeout_millis(CALL_TIMEOUT_MS)

    def watch(self, scan_id: str) -> MasterWatch:
        """A watch on every started master, each read through a proxy of its
        own with a short timeout, made on the watch's thread (never here)."""
        readers = {}
        for pipeline in self.started:
            proxies: list[Any] = []

            def read(pipeline: str = pipeline, proxies: list[Any] = proxies) -> str:
                if not proxies:
                    proxies.append(master_proxy(self.link, pipeline, WATCH_TIMEOUT_MS))
                return str(proxies[0].read_attribute("CurrentScan").value)

            readers[pipeline] = read
        return MasterWatch(scan_id, readers)

    def end(self, scan_id: str, watch: MasterWatch | None = None) -> dict[str, str]:
        """EndScan on every master (but those ``watch`` has lost: not waited
        for either), all at once; the pipelines whose master refused or did
        not answer, with why (they stay in :attr:`started`: a scan whose end
        never arrives downstream can still be aborted)."""
        lost: Callable[[str], bool] = watch.is_lost if watch else (lambda pipeline: False)
        return _all_at_once({p: (lambda proxy=proxy: proxy.EndScan(scan_id))
                             for p, proxy in self.proxies.items() if not lost(p)}, CALL_TIMEOUT_MS / 1000, lost)

    def abort(self, scan_id: str, only: Iterable[str] | None = None, wait_s: float = CALL_TIMEOUT_MS / 1000,
              reason: str = "") -> None:
        """AbortScan on every master that started the scan (or those of them in
        ``only``), all at once, waiting up to ``wait_s`` (a call still running
        is left to its client timeout); their errors are logged, not raised
        (the scan is failing already: the first error is the one to report).
        ``reason`` travels to every consumer with the scan's abort."""
        chosen = [p for p in self.started if only is None or p in set(only)]
        argument = abort_argument(scan_id, reason)
        errors = _all_at_once({p: (lambda proxy=self.proxies[p]: proxy.AbortScan(argument)) for p in chosen}, wait_s)
        for pipeline, error in errors.items():
            log.warning("AbortScan %s on pipeline %s: %s", scan_id, pipeline, error)
        self.started = [p for p in self.started if p not in chosen]
