"""XspressIngester end to end on real recordings of MAX IV's Xspress3 stream (dranspose 0.2.0, MIT, from PyPI).

Real processes throughout: the embedded Tango DB, TopologyManager, Sink,
Sorter, one PipelineWorker running the ``xrf`` processor, PipelineMaster and
the XspressIngester server; the recorded messages are published by a
stand-in for the streamer's PUB (:mod:`support.xspress_replay`) over a real
TCP socket. The ingester subscribes at its start and stays subscribed (the
streamer's PUB has no handshake); the replay waits for that subscription.

What is checked, from the recordings by an independent route (plain JSON,
the full pickle, the dead-time formula written out here):
* the sink's per-point ``counts`` (xrf's total in its fit range, here every
  bin of every channel) equal the recording's spectra sums: nothing lost;
* the sink's element maps equal the xrf processor run here on the recorded
  spectra with ICR/OCR recomputed from the raw counters: the dead time
  travelled right;
* a frame removed from the replay is a gap at its own index;
* further series in the same run are ingested into their own scans, a
  repeated frame is refused, a lost series end is ended at the next header;
* and, without the mesh, our decoder agrees with MAX IV's own (dranspose's
  ``middlewares.xspress.parse``, run in its own venv) on every packet.
"""

from __future__ import annotations

import json
import pickle
import sys
import time

import numpy as np
import pytest
import tango

from pipelines.processors import Batch
from pipelines.processors.xrf import Xrf
from services.ops.masters import ScanMasters
from services.registration import TangoManagerLink
from services.scan import parse_scan
from sink.queries import QUERY, SinkClient
from support import ServerPool, topology_props, wait_for
from support.documents import minimal
from support.recordings import XSPRESS_FILES, messages, recording_bytes
from support.simulators import sim_venv
from support.xspress_replay import XspressReplay

pytestmark = pytest.mark.slow
DRANSPOSE_VENV = ("dranspose", ["dranspose==0.2.0"])  # its own venv: its decoder as a second oracle

MANAGER = "tangomesh/topology/manager"
PIPE = "xsp"
STREAM = "xspress3"
INGESTER = "test/xspress/ingester"
SINK = "test/xspress/sink"
LOOP = "127.0.0.1"
CLOCK = 80e6
SETTINGS = {"detector": STREAM, "elements": {"Fe": "K", "Cu": "K", "Au": "L"},
            "energy_calibration": {"offset_keV": 0.0, "gain_keV_per_channel": 0.01},
            "incident_energy_keV": 15.0, "fit_range_keV": [0.0, 41.0]}  # the whole 4096-bin spectrum


def recorded_frames(name: str) -> list[dict]:
    """Each image of a recording by the plain route (json, numpy, the full pickle of trusted data)."""
    parts = [p for m in messages(name) for p in m]
    out = []
    for k, part in enumerate(parts):
        if part[:1] == b"{" and json.loads(part).get("htype") == "image":
            head = json.loads(part)
            s = pickle.loads(parts[k + 2])
            events, good, clock, reset, width = (np.asarray(s[i], np.float64) for i in (1, 2, 3, 5, 6))
            live = clock - reset - events * (width + 1)
            out.append({"frame": head["frame"], "mca": np.frombuffer(parts[k + 1], np.uint32).reshape(head["shape"]),
                        "icr": events / (live / CLOCK), "ocr": good / (clock / CLOCK), "dtc": s[7]})
    return out


def document(scan_id: str, points: int) -> dict:
    doc = minimal({"type": "points", "points": points})
    doc["scan"]["id"] = scan_id
    doc["analysis"] = {PIPE: {"processor": "xrf", "settings": SETTINGS, "streams": [STREAM]}}
    return doc


def reference_xrf(doc: dict, frames: list[dict]) -> dict[str, np.ndarray]:
    """The xrf processor run here, in-process, on the recorded spectra and the recomputed rates."""
    meta = parse_scan(doc)
    xrf = Xrf()
    xrf.start_scan(meta, SETTINGS)
    arrays = {f"{STREAM}/{k}": np.stack([f[k] for f in frames]) for k in ("mca", "icr", "ocr")}
    return xrf.process(Batch(meta, 0, len(frames), arrays))


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory):
    logs = tmp_path_factory.mktemp("xspress-logs")
    for name in ("xspress3-dump.cbors", "xspress3-multipart.cbors", "xspress3mini-dump20.cbors"):
        messages(name)  # first run on a machine: the dranspose sdist from PyPI (8 MB)
    replay = XspressReplay(LOOP)
    pool = ServerPool(logs)
    try:
        pool.start("TopologyManager/xspress", {"TopologyManager": {MANAGER: topology_props()}})
        pool.start("Sink/xspress", {"Sink": {SINK: {"DataHost": LOOP, "MemoryBudgetBytes": 128 * 2**20}}})
        pool.start("Sorter/xspress", {"Sorter": {"test/xspress/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/xspress", {"PipelineWorker": {"test/xspress-worker/1": {
            "Pipeline": PIPE, "HeartbeatSeconds": 0.2}}})
        pool.start("PipelineMaster/xspress", {"PipelineMaster": {"test/xspress/master": {
            "DataHost": LOOP, "Pipeline": PIPE, "IncompleteTimeoutSeconds": 60.0}}})
        ingester = pool.start("XspressIngester/test", {"XspressIngester": {INGESTER: {
            "DataHost": LOOP, "Pipeline": PIPE, "StreamerEndpoint": replay.endpoint, "Stream": STREAM,
            "BlockFrames": 4, "ScanWaitSeconds": 5.0}}},
            argv=[sys.executable, "-m", "ingesters.xspress_device", "test"])
        link = TangoManagerLink(MANAGER)
        wait_for(lambda: {"source", "sorter", "sink", "master"} <= {
            s["kind"] for s in link.lookup({"pipeline": PIPE})} | {s["kind"] for s in link.lookup({"kind": "sink"})},
            30, "the pipeline, the sink and the ingester's source")
        wait_for(lambda: len(json.loads(tango.DeviceProxy("test/xspress/master").WorkerTable)) == 1, 30, "the worker")
        replay.wait_subscribed(30)  # the ingester subscribed at its start: nothing published from now on is lost
        sink = tango.DeviceProxy(SINK)
        client = SinkClient(json.loads(sink.Endpoints)[QUERY])
        yield {"replay": replay, "link": link, "ingester": ingester, "device": tango.DeviceProxy(INGESTER),
               "client": client}
        client.close()
    finally:
        pool.stop_all()
        replay.close()


def run(mesh, scan: str, recording: list[list[bytes]], points: int, drop=lambda k, m: False,
        end: bool = True, timeout: float = 30) -> dict:
    """StartScan, then the streamer's messages; the sink's view of the scan once it is complete."""
    masters = ScanMasters(mesh["link"], [PIPE])
    masters.start(document(scan, points))
    try:
        mesh["replay"].play(recording, pace=0.002, drop=drop)
        if end:
            wait_for(lambda: mesh["client"].info(scan)["status"] == "complete", timeout,
                     f"scan {scan} complete in the sink\n{mesh['ingester'].log_text()[-3000:]}")
    except BaseException:
        masters.abort(scan)
        raise
    return mesh["client"].info(scan) if end else {}


def product(mesh, scan: str, name: str) -> np.ndarray:
    return np.asarray(mesh["client"].get(scan, f"{PIPE}/{name}"), np.float64).reshape(-1)


def frame_of(k_message: int, parts: list[bytes]) -> int | None:
    try:
        return json.loads(parts[0]).get("frame") if parts[0][:1] == b"{" else None
    except ValueError:
        return None


def test_the_old_form_recording_arrives_whole(mesh) -> None:
    """NanoMAX 2023, three single-part messages per frame: 20 points, each point's counts the
    recording's spectra sum over 4 channels x 4096 bins."""
    dev = mesh["device"]
    errors0, frames0 = dev.Errors, dev.Frames
    recording, frames = messages("xspress3-dump.cbors"), recorded_frames("xspress3-dump.cbors")
    scan = f"xspress-old-{time.time_ns()}"
    info = run(mesh, scan, recording, len(frames))
    assert (info["expected"], info["received"], info["missing"], info["failed"]) == (20, 20, 0, 0)
    np.testing.assert_array_equal(product(mesh, scan, "counts"), [f["mca"].sum() for f in frames])
    assert dev.Errors == errors0 and dev.Frames == frames0 + 20 and dev.CurrentScan == ""


def test_the_multipart_recording_gives_the_xrf_maps_with_the_detectors_dead_time(mesh) -> None:
    """2024, 3-part messages: real counts, channel 3 with a dead-time factor of 1.8. The sink's
    element maps equal xrf run here on the recorded spectra with ICR/OCR from the raw counters."""
    recording, frames = messages("xspress3-multipart.cbors"), recorded_frames("xspress3-multipart.cbors")
    assert max(f["dtc"].max() for f in frames) > 1.5  # the correction matters in this capture
    scan = f"xspress-multi-{time.time_ns()}"
    doc = document(scan, len(frames))
    info = run(mesh, scan, recording, len(frames))
    assert (info["expected"], info["received"], info["missing"], info["failed"]) == (5, 5, 0, 0)
    totals = np.array([f["mca"].sum() for f in frames], np.float64)
    np.testing.assert_array_equal(product(mesh, scan, "counts"), totals)
    want = reference_xrf(doc, frames)
    for name in ("Fe", "Cu", "Au", "Au_roi", "elastic", "compton"):
        # xrf projects in float32: batches cut differently round differently, ~1e-5 relative (xrf.py)
        np.testing.assert_allclose(product(mesh, scan, name), want[name], rtol=3e-5, atol=1e-6, err_msg=name)
    no_dead_time = reference_xrf(doc, [{**f, "icr": f["ocr"]} for f in frames])
    assert not np.allclose(want["Au_roi"], no_dead_time["Au_roi"])  # the check can fail: dead time changes it


def test_a_frame_removed_from_the_replay_is_a_gap_at_its_index(mesh) -> None:
    dev = mesh["device"]
    gaps0 = dev.GapPoints
    recording, frames = messages("xspress3-multipart.cbors"), recorded_frames("xspress3-multipart.cbors")
    scan = f"xspress-gap-{time.time_ns()}"
    t0 = time.monotonic()
    info = run(mesh, scan, recording, len(frames), drop=lambda k, m: frame_of(k, m) == 2)
    assert time.monotonic() - t0 < 30  # declared by the ingester, not the master's 60 s timeout
    assert dev.GapPoints == gaps0 + 1
    run_ = info["runs"][PIPE]  # the event without the stream goes on marked incomplete; xrf has nothing to fit
    assert (run_["incomplete"], run_["failed"]) == (1, 1) and "missing" in run_["errors"]["2"]
    got = product(mesh, scan, "counts")
    totals = np.array([f["mca"].sum() for f in frames], np.float64)
    kept = [0, 1, 3, 4]
    np.testing.assert_array_equal(got[kept], totals[kept])
    assert np.isnan(got[2])


def test_further_series_in_the_same_run_each_feed_their_own_scan(mesh) -> None:
    """The X3 Mini capture (its 11 frames twice in one series: the repeats refused, never
    renumbered), then the old-form capture, back to back into two scans."""
    dev = mesh["device"]
    errors0 = dev.Errors
    mini = recorded_frames("xspress3mini-dump20.cbors")[:11]
    first, second = f"xspress-mini-{time.time_ns()}", f"xspress-next-{time.time_ns()}"
    info = run(mesh, first, messages("xspress3mini-dump20.cbors"), 11)
    assert (info["received"], info["missing"], info["failed"]) == (11, 0, 0)
    np.testing.assert_array_equal(product(mesh, first, "counts"), [f["mca"].sum() for f in mini])
    wait_for(lambda: dev.Errors >= errors0 + 11, 10, "the 11 repeated frames to be refused")
    old = recorded_frames("xspress3-dump.cbors")
    info = run(mesh, second, messages("xspress3-dump.cbors"), 20)
    assert (info["received"], info["missing"], info["failed"]) == (20, 0, 0)
    np.testing.assert_array_equal(product(mesh, second, "counts"), [f["mca"].sum() for f in old])
    assert dev.Errors == errors0 + 11 and dev.State() == tango.DevState.ON


def test_a_lost_series_end_then_a_new_header_ends_the_old_scan_there(mesh) -> None:
    """Frames 3, 4 and the end of the multipart series never come, then the streamer starts
    again: the first scan ends at the new header with indices 3 and 4 declared missing; the new
    series feeds the next scan from its frame 0."""
    dev = mesh["device"]
    restarts0 = dev.Restarts
    recording, frames = messages("xspress3-multipart.cbors"), recorded_frames("xspress3-multipart.cbors")
    cut = f"xspress-cut-{time.time_ns()}"
    run(mesh, cut, recording, 5, drop=lambda k, m: (frame_of(k, m) or 0) >= 3 or b"series_end" in m[0],
        end=False)
    wait_for(lambda: dev.Frames and dev.CurrentScan == cut, 20, "the cut series to flow")
    time.sleep(0.5)
    after = f"xspress-after-{time.time_ns()}"
    info = run(mesh, after, recording, 5)
    assert (info["received"], info["missing"], info["failed"]) == (5, 0, 0)
    wait_for(lambda: mesh["client"].info(cut)["status"] == "complete", 20, "the cut scan to end")
    cut_info = mesh["client"].info(cut)
    assert dev.Restarts == restarts0 + 1
    assert (cut_info["runs"][PIPE]["incomplete"], cut_info["runs"][PIPE]["failed"]) == (2, 2)
    assert sorted(cut_info["runs"][PIPE]["errors"]) == ["3", "4"]
    totals = np.array([f["mca"].sum() for f in frames], np.float64)
    np.testing.assert_array_equal(product(mesh, cut, "counts")[:3], totals[:3])
    np.testing.assert_array_equal(product(mesh, after, "counts"), totals)


def test_bad_messages_on_the_stream_are_counted_and_the_ingester_goes_on(mesh) -> None:
    """Garbage, a hostile pickle and a stray binary part between scans: each refused and counted,
    logged with its reason; the next scan is whole."""
    import os

    class Shell:
        def __reduce__(self):
            return (os.system, ("touch /tmp/tangomesh-xspress-integration-pwned",))

    dev = mesh["device"]
    errors0 = dev.Errors
    image = json.dumps({"htype": "image", "frame": 0, "shape": [1, 4], "type": "uint32"}).encode()
    bad = [[b"not json"], [b"\x00" * 64], [image, b"\x00" * 16, pickle.dumps([Shell()])], [b"{}", b"x"]]
    mesh["replay"].play(bad)
    wait_for(lambda: dev.Errors >= errors0 + 4, 10, "the four refusals")
    assert not os.path.exists("/tmp/tangomesh-xspress-integration-pwned")
    assert "asks for posix.system: refused" in mesh["ingester"].log_text()
    assert dev.State() == tango.DevState.ON
    scan = f"xspress-after-bad-{time.time_ns()}"
    info = run(mesh, scan, messages("xspress3-multipart.cbors"), 5)
    assert (info["received"], info["missing"], info["failed"]) == (5, 0, 0)


def test_a_restarted_streamer_is_subscribed_again_without_the_ingester_doing_anything(mesh) -> None:
    """The streamer's process restarts (its PUB closed, bound again on the same address): the
    ingester's SUB reconnects and subscribes again by itself, and the next scan is whole."""
    replay = mesh["replay"]
    replay.restart()
    replay.wait_subscribed(30)
    scan = f"xspress-restarted-{time.time_ns()}"
    info = run(mesh, scan, messages("xspress3-multipart.cbors"), 5)
    assert (info["received"], info["missing"], info["failed"]) == (5, 0, 0)
    assert mesh["device"].State() == tango.DevState.ON


def test_a_bad_property_leaves_the_device_in_fault_saying_why(mesh, tmp_path) -> None:
    pool = ServerPool(tmp_path)
    try:
        pool.start("XspressIngester/bad", {"XspressIngester": {"test/xspress/bad": {
            "Pipeline": PIPE, "StreamerEndpoint": mesh["replay"].endpoint, "ChannelsKept": [1, 1]}}},
            argv=[sys.executable, "-m", "ingesters.xspress_device", "bad"])
        bad = tango.DeviceProxy("test/xspress/bad")
        assert bad.State() == tango.DevState.FAULT
        assert "ChannelsKept must be distinct channel numbers" in bad.Status()
        with pytest.raises(tango.DevFailed, match="TANGOMESH_Fault"):
            bad.Frames
    finally:
        pool.stop_all()


@pytest.mark.parametrize("name", XSPRESS_FILES)
def test_our_decoder_agrees_with_dransposes_own_on_every_packet(name) -> None:
    """MAX IV's decoder (dranspose 0.2.0's ``middlewares.xspress.parse``, in its own venv from PyPI)
    on the same recording: the same packets in the same order, per-channel spectra sums and every
    scaler equal; its ``dtc`` (the device's) equals the one we recompute."""
    import subprocess
    from pathlib import Path

    from ingesters.xspress import XspressDecoder, XspressEnd, XspressFrame, XspressStart

    bin_dir = sim_venv(*DRANSPOSE_VENV)
    script = Path(__file__).resolve().parents[1] / "support" / "dranspose_oracle.py"
    theirs = json.loads(subprocess.run([str(bin_dir / "python"), str(script)], input=recording_bytes(name),
                                       capture_output=True, check=True, timeout=120).stdout)
    decoder = XspressDecoder()
    ours = [e for m in messages(name) for e in decoder.feed(m)]
    assert len(ours) == len(theirs) > 2
    names = {"AllEvents": "all_events", "AllGood": "all_good", "ClockTicks": "clock_ticks",
             "TotalTicks": "total_ticks", "ResetTicks": "reset_ticks", "event_widths": "event_width"}
    for mine, other in zip(ours, theirs):
        if isinstance(mine, XspressFrame):
            assert mine.frame == other["frame"]
            np.testing.assert_array_equal(mine.channels["mca"].sum(axis=1), other["sums"])
            for their_name, our_name in names.items():
                np.testing.assert_array_equal(mine.channels[our_name], other["meta"][their_name])
            np.testing.assert_allclose(mine.channels["dtc"], other["meta"]["dtc"], rtol=1e-12)
            np.testing.assert_allclose(mine.channels["ocr"], np.asarray(other["meta"]["ocr"]) * CLOCK ** 2,
                                       rtol=1e-9)
        else:
            assert other["htype"] == ("header" if isinstance(mine, XspressStart) else "series_end")
            assert isinstance(mine, (XspressStart, XspressEnd))
