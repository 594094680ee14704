"""From a detector's series to a scan's stream: frame numbers to acquisition indices, gaps, ends.

(:class:`CaptureMapper`, at the end, does the same for block sources that
number nothing themselves, a PandABox capture: sample ``n`` of a capture is
index ``first_index + n``, and the scan's points are the plan.)

Sans-IO: :class:`SeriesMapper` takes the decoded SIMPLON events of one
detector stream and returns the tangomesh messages to send (``data``
blocks, ``gap`` declarations, the stream's ``scan_end``); the ingester's
component does the sockets and the scan lookup. The rules (docs/ingesters.md):

* a series joins one scan, chosen at its start (:func:`choose_scan`): the
  newest scan open on the ingester's pipelines that joins its stream, that
  no earlier series of this ingester joined, and that has not had EndScan;
* frame ``f`` is acquisition index ``first_index + f`` (``first_index``
  from the scan document's stream entry, default 0), so a frame that never
  arrives is a gap at its own index, never a shift of the later ones;
* a skipped frame number is declared at once with a ``gap``; the series'
  end declares the frames the detector planned but never sent, then
  ``scan_end`` with the stream's count;
* a new series start while a series is open (the detector restarted) ends
  the open one there, its missing rest declared; the new series looks for a
  scan of its own and is never numbered on from the old one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping

import numpy as np

from ingesters.simplon import Frame, SeriesEnd, SeriesStart
from services import codec, compression, protocol
from services.compression import CompressedFrames


@dataclass(frozen=True)
class ScanChoice:
    """The scan a series joins, and the pipelines it is open on with this stream."""

    scan: str
    points: int
    pipelines: tuple[str, ...]
    first_index: int = 0


def choose_scan(stream: str, open_scans: Mapping[str, list[dict[str, Any]]],
                used: Collection[str]) -> ScanChoice | None:
    """The scan a new series of ``stream`` belongs to, from each pipeline's
    master's ``OpenScans`` (pipeline -> list), or None if there is none yet.
    The newest started wins; scans already ``used`` by an earlier series
    and scans whose EndScan came are passed over."""
    found: dict[str, tuple[float, int, int, list[str]]] = {}
    for pipeline, scans in open_scans.items():
        for s in scans:
            if stream not in s.get("streams", ()) or s.get("ending") or s.get("scan") in used:
                continue
            first = s.get("first_index", {}).get(stream, 0)
            started, points, _, pipes = found.setdefault(s["scan"], (float(s.get("started", 0)), int(s["points"]),
                                                                      int(first), []))
            pipes.append(pipeline)
    if not found:
        return None
    scan, (_, points, first, pipes) = max(found.items(), key=lambda kv: kv[1][0])
    return ScanChoice(scan, points, tuple(sorted(pipes)), first)


@dataclass
class _Open:
    header: SeriesStart
    series: int | None  # None until the first frame says (a v2 start may lack series_id)
    choice: ScanChoice
    next_frame: int = 0
    layout: tuple | None = None


class SeriesMapper:
    """One stream's series state. Every method returns the messages to send,
    in order; a ``ValueError`` refuses one event (the caller counts it) and
    leaves the state as it was."""

    def __init__(self, stream: str, block_frames: int) -> None:
        self.stream = stream
        self.block_frames = block_frames
        self.open: _Open | None = None
        self.draining: int | None = None  # series whose frames are discarded (refused, no scan)
        self.pending: list[Frame] = []
        self.pending_index = 0
        self.frames = 0  # frames sent on
        self.gap_points = 0  # indices declared missing
        self.drained = 0  # frames discarded with a refused series
        self.closed: int | None = None  # the series that ended last (tickit repeats its end on disarm)

    # ------------------------------------------------------------ series
    def restart(self, header: SeriesStart) -> list[codec.Message]:
        """A series start while one is open: end the open one here (its
        missing rest declared). The new one still needs :meth:`bind`."""
        if self.open is None:
            return []
        return self._close(f"the detector started series {header.series} before series "
                           f"{self.open.series} ended")

    def bind(self, header: SeriesStart, choice: ScanChoice) -> list[codec.Message]:
        """The series ``header`` starts joins ``choice``. Indices before the
        stream's ``first_index`` are declared missing: no frame maps there."""
        self.open, self.draining = _Open(header, header.series, choice), None
        out = []
        if choice.first_index > 0:
            stop = min(choice.first_index, choice.points)
            out.append(protocol.source_gap(choice.scan, self.stream, 0, stop, "before the detector's frame 0"))
            self.gap_points += stop
        return out

    def refuse(self, series: int | None) -> None:
        """No scan for this series: its frames are discarded until it ends."""
        self.open, self.draining = None, series if series is not None else -1

    def frame(self, f: Frame) -> list[codec.Message]:
        run = self.open
        if run is None:
            if self.draining is not None and self.draining in (f.series, -1):
                self.drained += 1
                return []
            self.refuse(f.series)
            self.drained += 1
            raise ValueError(f"frame {f.frame} of series {f.series} without its series start (the ingester "
                             "came up mid-series?): the series is refused, its frames discarded")
        if run.series is None:
            run.series = f.series
        if f.series != run.series:
            raise ValueError(f"frame {f.frame} of series {f.series} while series {run.series} is open")
        if f.frame < run.next_frame:
            raise ValueError(f"frame {f.frame} of series {f.series} again or out of order (next expected "
                             f"{run.next_frame}): refused, never renumbered")
        index = run.choice.first_index + f.frame
        if index >= run.choice.points:
            raise ValueError(f"frame {f.frame} of series {f.series} is index {index}, beyond scan "
                             f"{run.choice.scan}'s {run.choice.points} points")
        layout = tuple(sorted((n, getattr(a, "codec", ""), np.dtype(a.dtype).str, tuple(a.shape[-2:]))
                              for n, a in f.channels.items()))
        if run.layout is not None and layout != run.layout:
            raise ValueError(f"frame {f.frame} of series {f.series} changes channels, dtype, shape or codec "
                             "within the series")
        run.layout = layout
        out = []
        if f.frame > run.next_frame:  # skipped frames: declared now, so the events go on without waiting
            out += self.flush()
            start = run.choice.first_index + run.next_frame
            out.append(protocol.source_gap(run.choice.scan, self.stream, start, index,
                                           f"detector frames {run.next_frame}..{f.frame - 1} of series "
                                           f"{f.series} never arrived"))
            self.gap_points += index - start
        if not self.pending:
            self.pending_index = index
        self.pending.append(f)
        run.next_frame = f.frame + 1
        if len(self.pending) >= self.block_frames:
            out += self.flush()
        return out

    def end(self, e: SeriesEnd) -> list[codec.Message]:
        if self.open is None:
            if self.draining is not None:
                self.draining = None
                return []
            if e.series == self.closed:
                return []  # the same end again: nothing more to say
            raise ValueError(f"end of series {e.series} without its start")
        if self.open.series is not None and e.series != self.open.series:
            raise ValueError(f"end of series {e.series} while series {self.open.series} is open")
        return self._close("frames the detector planned never arrived before its series end")

    def cut(self, why: str) -> list[codec.Message]:
        """The open series ends here, for ``why`` (its source failed): its
        planned rest declared missing, then ``scan_end``; nothing if none is open."""
        return self._close(why) if self.open is not None else []

    def _close(self, why: str) -> list[codec.Message]:
        run = self.open
        assert run is not None
        out = self.flush()
        received = run.choice.first_index + run.next_frame
        planned = run.choice.first_index + run.header.expected if run.header.expected is not None else received
        stop = min(run.choice.points, max(received, planned))
        if stop > received:
            out.append(protocol.source_gap(run.choice.scan, self.stream, received, stop, why))
            self.gap_points += stop - received
        out.append(codec.Message(codec.SCAN_END, scan=run.choice.scan, stream=self.stream, count=stop))
        self.open, self.closed = None, run.series
        return out

    # ------------------------------------------------------------ blocks
    def flush(self) -> list[codec.Message]:
        """The pending frames as one data block (none if nothing is pending)."""
        if not self.pending or self.open is None:
            self.pending = []
            return []
        frames, self.pending = self.pending, []
        arrays: dict[str, Any] = {}
        for name in frames[0].channels:
            pieces = [f.channels[name] for f in frames]
            if isinstance(pieces[0], CompressedFrames):
                arrays[name] = pieces[0] if len(pieces) == 1 else compression.join(pieces)
            else:
                arrays[name] = np.stack(pieces)
        self.frames += len(frames)
        return [codec.Message(codec.DATA, scan=self.open.choice.scan, stream=self.stream, index=self.pending_index,
                              count=len(frames), arrays=arrays)]

    @property
    def scan(self) -> str:
        return self.open.choice.scan if self.open else ""


@dataclass
class _Capture:
    choice: ScanChoice
    first_sample: int  # sample numbers count from the capture's first, missed ones included
    next_sample: int = 0
    layout: tuple | None = None


class CaptureMapper:
    """One stream's captures from a block source (a PandABox PCAP capture):
    sample ``n`` of a capture is acquisition index ``first_index + n``.

    Like :class:`SeriesMapper`, every method returns the messages to send in
    order, a ``ValueError`` refuses one call and leaves the state as it was.
    The rules differ only where the source does: samples come in runs of any
    length (no per-sample number on the wire: arrival order is the number),
    and a capture does not say how many samples it plans, so the scan's
    points are the plan; whatever the capture did not deliver by its end
    (or by the connection's loss) is declared missing there."""

    def __init__(self, stream: str, block_points: int) -> None:
        self.stream = stream
        self.block_points = block_points
        self.open: _Capture | None = None
        self.draining = False  # the open capture was refused: its samples are discarded
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_count = 0
        self.pending_index = 0
        self.points = 0  # samples sent on
        self.gap_points = 0
        self.drained = 0

    def bind(self, choice: ScanChoice, missed: int = 0) -> list[codec.Message]:
        """The capture starting now joins ``choice``; the server's ``missed``
        samples (captured before this connection listened) are missing, as
        are the indices below the stream's ``first_index``."""
        self.open, self.draining = _Capture(choice, missed), False
        stop = min(choice.first_index + missed, choice.points)
        if stop > 0:
            self.gap_points += stop
            return [protocol.source_gap(choice.scan, self.stream, 0, stop,
                                        "before the capture's first sample received")]
        return []

    def refuse(self) -> None:
        self.open, self.draining = None, True

    def room(self) -> int:
        """How many more samples the open capture's scan has indices for."""
        run = self.open
        if run is None:
            return 0
        return max(0, run.choice.points - (run.choice.first_index + run.first_sample + run.next_sample))

    def samples(self, arrays: dict[str, np.ndarray]) -> list[codec.Message]:
        """The next consecutive samples (one 1-D array per name, equal lengths)."""
        count = len(next(iter(arrays.values()))) if arrays else 0
        if self.open is None:
            if self.draining:
                self.drained += count
                return []
            raise ValueError(f"{count} samples without a capture header")
        if any(a.ndim != 1 or len(a) != count for a in arrays.values()):
            raise ValueError("a run of samples whose arrays differ in length")
        if count > self.room():
            raise ValueError(f"{count} samples, room for {self.room()} in scan {self.open.choice.scan}")
        layout = tuple((n, a.dtype.str) for n, a in arrays.items())
        if self.open.layout is not None and layout != self.open.layout:
            raise ValueError("the capture's fields changed within the capture")
        self.open.layout = layout
        if not count:
            return []
        if not self.pending:
            self.pending_index = self.open.choice.first_index + self.open.first_sample + self.open.next_sample
        self.pending.append(arrays)
        self.pending_count += count
        self.open.next_sample += count
        return self.flush() if self.pending_count >= self.block_points else []

    @property
    def next_sample(self) -> int:
        """The sample number the open capture expects next."""
        return self.open.first_sample + self.open.next_sample if self.open else 0

    def skip(self, sample: int, why: str) -> list[codec.Message]:
        """Samples up to ``sample`` never came (a source that numbers its rows
        said so): pending ones go, the skipped indices are declared missing."""
        run = self.open
        if run is None or sample <= self.next_sample:
            raise ValueError(f"cannot skip to sample {sample} (next is {self.next_sample})")
        start = run.choice.first_index + self.next_sample
        stop = min(run.choice.points, run.choice.first_index + sample)
        out = self.flush()
        if stop > start:
            out.append(protocol.source_gap(run.choice.scan, self.stream, start, stop, why))
            self.gap_points += stop - start
        run.next_sample = sample - run.first_sample
        return out

    def end(self, why: str) -> list[codec.Message]:
        """The capture ended (its ``END`` line, or the connection was lost):
        what it did not deliver up to the scan's points is declared missing,
        then ``scan_end``. Nothing to say for a refused capture."""
        if self.open is None:
            self.draining = False
            return []
        run = self.open
        out = self.flush()
        received = run.choice.first_index + run.first_sample + run.next_sample
        stop = run.choice.points
        if stop > received:
            out.append(protocol.source_gap(run.choice.scan, self.stream, received, stop, why))
            self.gap_points += stop - received
        out.append(codec.Message(codec.SCAN_END, scan=run.choice.scan, stream=self.stream, count=stop))
        self.open = None
        return out

    def flush(self) -> list[codec.Message]:
        """The pending samples as data blocks of at most ``block_points``."""
        if not self.pending or self.open is None:
            self.pending, self.pending_count = [], 0
            return []
        runs, self.pending, total = self.pending, [], self.pending_count
        self.pending_count = 0
        joined = {name: (runs[0][name] if len(runs) == 1 else np.concatenate([r[name] for r in runs]))
                  for name in runs[0]}
        out = []
        for start in range(0, total, self.block_points):
            stop = min(total, start + self.block_points)
            out.append(codec.Message(codec.DATA, scan=self.open.choice.scan, stream=self.stream,
                                     index=self.pending_index + start, count=stop - start,
                                     arrays={n: a[start:stop] for n, a in joined.items()}))
        self.points += total
        return out

    @property
    def scan(self) -> str:
        return self.open.choice.scan if self.open else ""
