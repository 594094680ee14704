"""EigerIngester against third-party EIGER simulators, installed at test time in their own venvs:
ALBA's ``eiger-simulator`` (stream v1, streams our own HDF5 frames: pixel equality) and
Diamond's ``tickit-devices`` EIGER (stream v2 CBOR with a real EIGER2 16M frame; ``ntrigger`` > 1).

Real processes throughout: the embedded Tango DB, TopologyManager, PipelineMaster,
one PipelineWorker (``passthrough``: the worker decompresses, the images come
back as they were), Sorter, the EigerIngester server, and ALBA's simulator
streaming the frames of an HDF5 file we write (powder rings). The same ingester
also feeds a second pipeline, ``eiger-xrd`` (pyFAI integration and phase maps),
for the scans started there. Between simulator and ingester
sits a forwarding proxy that passes the simulator's multipart messages on
unchanged and can drop chosen ones: that is how a lost frame and a lost series
end are made (the simulator itself never loses one).

The master's IncompleteTimeoutSeconds is long (60 s): a dropped frame's scan
ends within the test's 30 s only because the ingester declares the gap.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable

import h5py
import numpy as np
import pytest
import tango
import zmq

from services.ops.masters import ScanMasters
from services.ops.probe import Probe
from services.registration import TangoManagerLink
from support import ServerPool, topology_props, wait_for
from support.documents import minimal
from support.simulators import ALBA, TICKIT as TICKIT_SIM, free_port, install_all, start_alba, start_tickit, \
    tickit_site_packages

pytestmark = pytest.mark.slow

MANAGER = "tangomesh/topology/manager"
PIPE = "eiger"
XRD_PIPE = "eiger-xrd"  # the same ingester's stream, integrated by pyFAI (a scan is started on one or the other)
INGESTER = "test/eiger/ingester"
NEXUS = "test/eiger/nexus"
TICKIT = "test/eiger/tickit"  # a second device of the same server: tickit's stream v2 as stream "eiger2"
LOOP = "127.0.0.1"
Y, X, FRAMES = 64, 80, 12  # the dataset: 12 frames of 64 x 80 uint16 Poisson counts
SCAN_WAIT = 3.0


class DroppingProxy:
    """PULL from the simulator, PUSH to the ingester, the parts forwarded as
    received; a message whose first part's JSON matches ``drop`` is not forwarded."""

    def __init__(self, upstream: str) -> None:
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.connect(upstream)
        self.push = ctx.socket(zmq.PUSH)
        self.port = self.push.bind_to_random_port(f"tcp://{LOOP}")
        self.drop: Callable[[dict], bool] = lambda head: False
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.pull.poll(50):
                continue
            parts = self.pull.recv_multipart(copy=False)
            try:
                head = json.loads(bytes(parts[0].buffer))
            except ValueError:
                head = {}
            if self.drop(head):
                self.dropped += 1
                continue
            self.push.send_multipart(parts, copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.pull.close(0)
        self.push.close(0)


def xrd_geometry() -> dict:
    """pyFAI's configuration of a small EIGER: 150 µm pixels, 3 cm away, the beam at a corner, 15 keV."""
    from services.physics.powder import wavelength_A
    from services.physics.pyfai import integrator

    detector = {"pixel1": 150e-6, "pixel2": 150e-6, "orientation": 3, "max_shape": [Y, X]}
    ai = integrator({"poni_version": 2.1, "dist": 0.03, "poni1": 0.0, "poni2": 0.0, "rot1": 0.0, "rot2": 0.0,
                     "rot3": 0.0, "wavelength": wavelength_A(15.0) * 1e-10, "detector": "Detector",
                     "detector_config": detector})
    return json.loads(json.dumps(ai.get_config()))


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Powder frames: the rings of the simulator's three phases, mixed differently
    per frame, over a background, Poisson counts as uint16."""
    from services.physics.powder import reflections, ring_profile, wavelength_A
    from services.physics.pyfai import integrator
    from services.sim.phantom import PHASES

    two_theta = integrator(xrd_geometry()).center_array((Y, X), unit="2th_rad")
    rings = np.array([ring_profile(two_theta, reflections(p, wavelength_A(15.0), float(two_theta.max()) + 0.02),
                                   np.radians(0.3)) for p in PHASES])
    rings *= 40 / rings.max(axis=(1, 2), keepdims=True)
    rng = np.random.default_rng(20261203)
    mix = rng.dirichlet(np.ones(len(PHASES)), FRAMES)
    expected = np.einsum("fp,pyx->fyx", mix, rings) + rng.uniform(0.5, 3, size=(1, Y, X))
    return rng.poisson(expected).astype(np.uint16)


@pytest.fixture(scope="module")
def mesh(tango_db, tmp_path_factory, frames):
    logs = tmp_path_factory.mktemp("eiger-logs")
    data = tmp_path_factory.mktemp("eiger-data")
    with h5py.File(data / "frames.h5", "w") as f:
        f.create_dataset("entry/data/data_000001", data=frames)
    install_all(ALBA, TICKIT_SIM)  # first run on a machine: a few minutes, from PyPI
    zmq_port = free_port()
    t0 = time.monotonic()
    sim = start_alba(data / "frames.h5", zmq_port, "bslz4", logs / "alba.log")
    print(f"ALBA simulator up in {time.monotonic() - t0:.1f} s")
    proxy = DroppingProxy(f"tcp://{LOOP}:{zmq_port}")
    tickit_dir = tmp_path_factory.mktemp("tickit")
    v2_port = free_port()
    tickit = start_tickit(tickit_dir, free_port(), v2_port)
    pool = ServerPool(logs)
    try:
        pool.start("TopologyManager/eiger", {"TopologyManager": {MANAGER: topology_props()}})
        pool.start("Sorter/eiger", {"Sorter": {"test/eiger/sorter": {"DataHost": LOOP, "Pipeline": PIPE}}})
        pool.start("PipelineWorker/eiger", {"PipelineWorker": {"test/eiger-worker/1": {
            "Pipeline": PIPE, "HeartbeatSeconds": 0.2}}})
        pool.start("PipelineMaster/eiger", {"PipelineMaster": {"test/eiger/master": {
            "DataHost": LOOP, "Pipeline": PIPE, "IncompleteTimeoutSeconds": 60.0}}})
        pool.start("NexusWriter/eiger", {"NexusWriter": {NEXUS: {
            "DataHost": LOOP, "Pipeline": PIPE, "BeamtimeRoot": str(tmp_path_factory.mktemp("eiger-beamtime"))}}})
        pool.start("Sorter/eiger-xrd", {"Sorter": {"test/eiger-xrd/sorter": {"DataHost": LOOP, "Pipeline": XRD_PIPE}}})
        pool.start("PipelineWorker/eiger-xrd", {"PipelineWorker": {"test/eiger-xrd-worker/1": {
            "Pipeline": XRD_PIPE, "HeartbeatSeconds": 0.2, "Preload": ["xrd"]}}})
        pool.start("PipelineMaster/eiger-xrd", {"PipelineMaster": {"test/eiger-xrd/master": {
            "DataHost": LOOP, "Pipeline": XRD_PIPE, "IncompleteTimeoutSeconds": 60.0, "Preload": ["xrd"]}}})
        ingester = pool.start("EigerIngester/test", {"EigerIngester": {INGESTER: {
            "DataHost": LOOP, "Pipeline": PIPE, "Pipelines": [PIPE, XRD_PIPE],
            "DetectorEndpoint": f"tcp://{LOOP}:{proxy.port}",
            "Stream": "eiger", "BlockFrames": 4, "ScanWaitSeconds": SCAN_WAIT},
            TICKIT: {"DataHost": LOOP, "Pipeline": PIPE, "DetectorEndpoint": f"tcp://{LOOP}:{v2_port}",
                     "Stream": "eiger2", "BlockFrames": 1, "ScanWaitSeconds": 1.0}}})
        link = TangoManagerLink(MANAGER)
        probe = Probe(PIPE, link, LOOP, keep=True, name="test/eiger/probe")
        xrd_probe = Probe(XRD_PIPE, link, LOOP, keep=True, name="test/eiger-xrd/probe")
        for pipeline in (PIPE, XRD_PIPE):
            wait_for(lambda: {"source", "sorter", "recorder", "master"} | ({"writer"} if pipeline == PIPE else set()) <= {
                s["kind"] for s in link.lookup({"pipeline": pipeline})}, 30, "the pipeline and the ingester's source")
        wait_for(lambda: {"eiger", "eiger2"} <= {s.get("capabilities", {}).get("stream") for s in link.lookup(
            {"pipeline": PIPE, "kind": "source"})}, 30, "both ingesters' sources")
        for master in ("test/eiger/master", "test/eiger-xrd/master"):
            wait_for(lambda: len(json.loads(tango.DeviceProxy(master).WorkerTable)) == 1, 60, f"{master}'s worker")
        warm_up_tickit(tickit, tango.DeviceProxy(TICKIT))
        yield {"sim": sim, "proxy": proxy, "probe": probe, "xrd_probe": xrd_probe, "link": link, "ingester": ingester,
               "device": tango.DeviceProxy(INGESTER), "tickit": tickit, "tickit_device": tango.DeviceProxy(TICKIT)}
        probe.close()
        xrd_probe.close()
    finally:
        pool.stop_all()
        proxy.close()
        sim.stop()
        tickit.stop()


def configure(sim, nimages: int, compression: str) -> None:
    rest = sim.rest
    for key, value in (("nimages", nimages), ("count_time", 0.01), ("x_pixels_in_detector", X),
                       ("y_pixels_in_detector", Y), ("compression", compression)):
        rest.config(key, value)
    rest.config("header_detail", "basic", subsystem="stream")
    rest.command("initialize", timeout=60)


def document(scan_id: str, points: int, stream: str = "eiger") -> dict:
    doc = minimal({"type": "points", "points": points})
    doc["scan"]["id"] = scan_id
    doc["analysis"] = {PIPE: {"processor": "passthrough", "streams": [stream]}}
    if stream == "eiger":
        doc["streams"] = {"eiger": {"arrays": {"image": {"dtype": "<u2", "shape": [Y, X]}}}}
    return doc


def run_series(mesh, scan_id: str, points: int, nimages: int, compression: str = "bslz4", timeout: float = 30,
               doc: dict | None = None, pipeline: str = PIPE):
    """StartScan, then arm and trigger the simulator; the probe's tally once the scan ended."""
    configure(mesh["sim"], nimages, compression)
    masters = ScanMasters(mesh["link"], [pipeline])
    masters.start(doc or document(scan_id, points))
    probe = mesh["xrd_probe" if pipeline == XRD_PIPE else "probe"]
    try:
        mesh["sim"].rest.command("arm")
        mesh["sim"].rest.command("trigger")
        wait_for(lambda: probe.ended(scan_id) is not None, timeout,
                 f"scan {scan_id} to end\n{mesh['ingester'].log_text()[-3000:]}")
    except BaseException:
        masters.abort(scan_id)
        raise
    return probe.ended(scan_id)


def xrd_document(scan_id: str) -> dict:
    """A 4 x 3 raster whose frames the xrd pipeline integrates and maps by phase."""
    from services.scan_document import axis, raster_geometry
    from services.sim.phantom import PHASES

    doc = minimal(raster_geometry(axis("samx", 0, 3, 4, "um"), axis("samy", 0, 2, 3, "um")))
    doc["scan"]["id"] = scan_id
    doc["streams"] = {"eiger": {"arrays": {"image": {"dtype": "<u2", "shape": [Y, X]}}}}
    doc["analysis"] = {XRD_PIPE: {"processor": "xrd", "streams": ["eiger"], "settings": {
        "detector": "eiger", "geometry": xrd_geometry(), "npt_radial": 200, "unit": "2th_deg",
        "phases": [p.to_json() for p in PHASES]}}}
    return doc


def test_a_2d_scan_from_the_simulator_through_xrd_maps_as_the_same_frames_sent_uncompressed(mesh, frames) -> None:
    """ALBA's EIGER streams a 4 x 3 raster of powder frames, bitshuffle-LZ4, frame 7
    lost on the way: the xrd pipeline's patterns and phase maps equal those of the
    same frames sent uncompressed through the same pipeline, index 7 is the gap,
    nothing else is lost."""
    from services.protocol import SOURCE_OUT
    from services.source import SourceClient

    mesh["proxy"].drop = lambda head: head.get("htype") == "dimage-1.0" and head.get("frame") == 7
    try:
        scan = f"alba-xrd-{time.time_ns()}"
        compressed = run_series(mesh, scan, FRAMES, FRAMES, "bslz4", timeout=60, doc=xrd_document(scan),
                                pipeline=XRD_PIPE)
    finally:
        mesh["proxy"].drop = lambda head: False
    assert not compressed.aborted and compressed.incomplete_points == 1, compressed.end

    plain = f"plain-xrd-{time.time_ns()}"
    source = SourceClient("eiger", XRD_PIPE, mesh["link"], LOOP, prefix="test-plain")
    masters = ScanMasters(mesh["link"], [XRD_PIPE])
    try:
        wait_for(lambda: source.endpoint in {s["endpoints"].get(SOURCE_OUT) for s in mesh["link"].lookup(
            {"pipeline": XRD_PIPE, "kind": "source"})}, 10, "the uncompressed source's registration")
        masters.start(xrd_document(plain))
        for start in range(0, FRAMES, 3):
            source.block(plain, start, {"image": frames[start:start + 3]}, timeout=10)
        source.end(plain, FRAMES, timeout=10)
        masters.end(plain)
        uncompressed = wait_for(lambda: mesh["xrd_probe"].ended(plain), 60, "the uncompressed scan's end")
    finally:
        source.close()
    assert not uncompressed.aborted and uncompressed.incomplete_points == 0, uncompressed.end
    np.testing.assert_array_equal(uncompressed.delivered_indices(), np.arange(FRAMES))

    def by_index(tally) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for start, arrays in tally.chunks:
            for name, a in arrays.items():
                if a.dtype.kind in "fiu":
                    out.setdefault(name, np.full((FRAMES, *a.shape[1:]), np.nan))[start:start + len(a)] = a
        return out

    got, want = by_index(compressed), by_index(uncompressed)
    products = {"pattern", "Cu", "Si", "NaCl"}
    assert products <= set(want), sorted(want)
    kept = [i for i in range(FRAMES) if i != 7]
    for name in sorted(products):
        assert np.isfinite(want[name]).all(), name
        np.testing.assert_allclose(got[name][kept], want[name][kept], rtol=1e-6, err_msg=name)
        assert not np.isfinite(got[name][7]).any(), f"{name}: index 7 lost its frame, it must hold no value"
    assert want["pattern"].max() > 5 * np.median(want["pattern"])  # rings, not flat noise



@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
def test_every_frame_arrives_equal_to_the_dataset(mesh, frames, compression) -> None:
    """ALBA streams dataset[i] as frame i (bslz4 without the 12-byte header, or a bare LZ4
    block); through ingester, master, worker and sorter each comes back pixel for pixel."""
    errors0 = mesh["device"].Errors
    scan = f"alba-{compression}-{time.time_ns()}"
    tally = run_series(mesh, scan, FRAMES, FRAMES, compression)
    assert not tally.aborted and tally.gap_points == 0 and tally.incomplete_points == 0
    np.testing.assert_array_equal(tally.delivered_indices(), np.arange(FRAMES))
    got = tally.arrays()["eiger/image"]
    assert got.shape == (FRAMES, Y, X) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, frames)
    assert mesh["device"].Errors == errors0
    assert mesh["device"].CurrentScan == ""  # the series ended with the scan


def test_a_dropped_frame_is_a_gap_not_a_shift(mesh, frames) -> None:
    """Frame 5 never reaches the ingester: index 5 is declared missing at once (the master
    would wait 60 s otherwise), every other index holds its own frame."""
    mesh["proxy"].drop = lambda head: head.get("htype") == "dimage-1.0" and head.get("frame") == 5
    dropped0, gaps0 = mesh["proxy"].dropped, mesh["device"].GapPoints
    try:
        t0 = time.monotonic()
        tally = run_series(mesh, f"alba-drop-{time.time_ns()}", FRAMES, FRAMES)
        elapsed = time.monotonic() - t0
    finally:
        mesh["proxy"].drop = lambda head: False
    assert mesh["proxy"].dropped == dropped0 + 1
    assert elapsed < 30
    assert mesh["device"].GapPoints == gaps0 + 1
    assert tally.incomplete_points == 1 and tally.gap_points == 0
    delivered = {i: c for i, c in tally.chunks}
    got = np.full((FRAMES, Y, X), -1, np.int64)
    for start, arrays in tally.chunks:
        if "eiger/image" in arrays:
            got[start:start + len(arrays["eiger/image"])] = arrays["eiger/image"]
    kept = [i for i in range(FRAMES) if i != 5]
    np.testing.assert_array_equal(got[kept], frames[kept])
    assert (got[5] == -1).all(), "index 5 must hold no frame"
    assert delivered


def test_a_series_without_an_open_scan_is_refused_then_the_next_one_works(mesh, frames) -> None:
    """No StartScan: the series waits ScanWaitSeconds, is refused and counted, its frames
    discarded; the ingester keeps running and the next scan gets all its frames."""
    dev = mesh["device"]
    refused0, discarded0 = dev.RefusedSeries, dev.DiscardedFrames
    configure(mesh["sim"], 6, "bslz4")
    mesh["sim"].rest.command("arm")
    mesh["sim"].rest.command("trigger")
    wait_for(lambda: dev.RefusedSeries == refused0 + 1 and dev.DiscardedFrames == discarded0 + 6,
             SCAN_WAIT + 20, "the series to be refused and drained")
    assert dev.State() == tango.DevState.ON
    tally = run_series(mesh, f"alba-after-refusal-{time.time_ns()}", FRAMES, FRAMES)
    np.testing.assert_array_equal(tally.arrays()["eiger/image"], frames)


def test_a_lost_series_end_then_a_new_series_ends_the_old_one_there(mesh, frames) -> None:
    """The detector's series end is lost and it is armed again (as after a restart): the
    open series ends at the new header, its unreceived rest declared missing; the new
    series joins the next scan from index 0, never numbered on from the old one."""
    dev = mesh["device"]
    restarts0 = dev.Restarts
    mesh["proxy"].drop = lambda head: head.get("htype") == "dseries_end-1.0" or (
        head.get("htype") == "dimage-1.0" and head.get("frame", 0) >= 8)
    first = f"alba-cut-{time.time_ns()}"
    masters = ScanMasters(mesh["link"], [PIPE])
    try:
        configure(mesh["sim"], FRAMES, "bslz4")
        masters.start(document(first, FRAMES))
        mesh["sim"].rest.command("arm")
        mesh["sim"].rest.command("trigger")
        wait_for(lambda: dev.Frames >= 1 and dev.CurrentScan == first, 20, "the first series to flow")
        time.sleep(0.5)  # ALBA sends 12 frames in 0.12 s: all sent, the last 4 and the end dropped
    finally:
        mesh["proxy"].drop = lambda head: False
    second = f"alba-next-{time.time_ns()}"
    tally = run_series(mesh, second, FRAMES, FRAMES)
    cut = mesh["probe"].ended(first)
    assert cut is not None and dev.Restarts == restarts0 + 1
    assert cut.incomplete_points == 4  # indices 8..11 declared missing at the restart
    np.testing.assert_array_equal(cut.arrays()["eiger/image"], frames[:8])
    np.testing.assert_array_equal(tally.arrays()["eiger/image"], frames)


# ---------------------------------------------------------------- tickit: stream v2
def configure_tickit(tickit, nimages: int, ntrigger: int) -> None:
    rest = tickit.rest
    rest.config("format", "cbor", subsystem="stream")
    rest.config("header_detail", "basic", subsystem="stream")
    for key, value in (("trigger_mode", "ints"), ("nimages", nimages), ("ntrigger", ntrigger), ("frame_time", 0.1),
                       ("count_time", 0.1)):
        rest.config(key, value)
    rest.command("initialize")


def warm_up_tickit(tickit, device) -> None:
    """tickit binds its stream socket when it sends its first message, and that message can be
    gone before our PULL has connected (seen 1 run in 3): one series with no scan open first,
    which the ingester refuses (or finds headless), so that the socket is up for the tests."""
    configure_tickit(tickit, 1, 1)
    tickit.rest.command("arm")
    tickit.rest.command("trigger")
    tickit.rest.command("disarm")
    wait_for(lambda: device.RefusedSeries + device.DiscardedFrames >= 1, 20, "tickit's warm-up series")


def bundled_v2() -> dict[str, bytes]:
    """The stream-v2 messages tickit-devices ships and sends (a real DECTRIS EIGER2 Si 16M series)."""
    data = tickit_site_packages() / "tickit_devices" / "eiger" / "data" / "stream2"
    return {name: (data / f"{name}.cbor").read_bytes() for name in ("start", "image", "end")}


def oracle_pixels(message: bytes) -> dict[str, np.ndarray]:
    """The image's channels decoded without our decoder: cbor2 without a tag hook, then
    bitshuffle on the 56500 payload (the reference notes' first route)."""
    import bitshuffle
    import cbor2

    doc = cbor2.loads(message)
    out = {}
    for channel, tag40 in doc["data"].items():
        (y, x), typed = tag40.value
        assert typed.tag == 69 and typed.value.tag == 56500
        codec_name, elem, blob = typed.value.value
        assert codec_name == "bslz4" and elem == 2
        block = int.from_bytes(blob[8:12], "big")
        out[channel] = bitshuffle.decompress_lz4(np.frombuffer(blob[12:], np.uint8), (y, x), np.dtype("<u2"),
                                                 block // 2)
    return out


def test_tickits_bundled_dectris_messages_decode_like_the_oracle() -> None:
    from ingesters import simplon

    import cbor2

    messages = bundled_v2()
    start = simplon.decode([messages["start"]])[0]
    plain = cbor2.loads(messages["start"])
    assert isinstance(start, simplon.SeriesStart) and start.version == 2
    assert start.series == plain["series_id"] and start.channels == tuple(plain["channels"])
    assert start.config["image_size_x"] == plain["image_size_x"] == 4148
    image = simplon.decode([messages["image"]])[0]
    assert isinstance(image, simplon.Frame) and image.frame == plain.get("image_id", 0) == 0
    want = oracle_pixels(messages["image"])
    assert image.channels.keys() == want.keys()
    for channel, pixels in want.items():
        got = image.channels[channel]
        assert got.codec == "bslz4" and got.shape == (1, 4362, 4148)
        np.testing.assert_array_equal(got.decompress()[0], pixels)
    assert isinstance(simplon.decode([messages["end"]])[0], simplon.SeriesEnd)


def test_tickit_stream_v2_with_two_triggers_numbers_frames_across_triggers(mesh) -> None:
    """tickit armed once, triggered twice (ntrigger=2, nimages=1): image_id 0 and 1 of one
    series are indices 0 and 1 of one scan, each the real EIGER2 frame tickit sends;
    tickit's repeated series end (on disarm) is no error."""
    dev = mesh["tickit_device"]
    errors0 = dev.Errors
    rest = mesh["tickit"].rest
    configure_tickit(mesh["tickit"], 1, 2)
    scan = f"tickit-v2-{time.time_ns()}"
    masters = ScanMasters(mesh["link"], [PIPE])
    masters.start(document(scan, 2, stream="eiger2"))
    try:
        rest.command("arm")
        rest.command("trigger")
        rest.command("trigger")
        rest.command("disarm")
        wait_for(lambda: mesh["probe"].ended(scan) is not None, 60, f"scan {scan} to end")
    except BaseException:
        masters.abort(scan)
        raise
    tally = mesh["probe"].ended(scan)
    assert tally.incomplete_points == 0 and not tally.aborted
    np.testing.assert_array_equal(tally.delivered_indices(), [0, 1])
    want = oracle_pixels(bundled_v2()["image"])["threshold_1"]
    got = tally.arrays()["eiger2/threshold_1"]
    assert got.shape == (2, 4362, 4148)
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)
    time.sleep(0.5)  # the second end, sent on disarm, has arrived
    assert dev.Errors == errors0 and dev.Frames >= 2


def test_a_bad_property_leaves_the_device_in_fault_saying_why(mesh, tmp_path) -> None:
    pool = ServerPool(tmp_path)
    try:
        pool.start("EigerIngester/bad", {"EigerIngester": {"test/eiger/bad": {
            "Pipeline": PIPE, "DetectorEndpoint": "dcu:9999"}}})
        bad = tango.DeviceProxy("test/eiger/bad")
        assert bad.State() == tango.DevState.FAULT
        assert "DetectorEndpoint must be a ZeroMQ address" in bad.Status()
        with pytest.raises(tango.DevFailed, match="TANGOMESH_Fault"):
            bad.Frames
    finally:
        pool.stop_all()


def test_raw_frames_kept_compressed_are_stored_as_the_detector_sent_them(mesh, frames) -> None:
    """``passthrough`` with ``keep_compressed``: nothing between the simulator and
    the NeXus file decompresses; the writer stores each frame's bitshuffle-LZ4
    chunk directly, one chunk per frame, and h5py with hdf5plugin reads the
    HDF5 file's frames back equal to the dataset ALBA streamed."""
    import hdf5plugin  # noqa: F401  (the Bitshuffle filter, for reading)

    scan = f"alba-keep-{time.time_ns()}"
    doc = document(scan, FRAMES)
    doc["analysis"][PIPE]["settings"] = {"arrays": ["eiger/image"], "keep_compressed": True}
    tally = run_series(mesh, scan, FRAMES, FRAMES, "bslz4", doc=doc)
    assert not tally.aborted and tally.incomplete_points == 0
    writer = tango.DeviceProxy(NEXUS)
    done = wait_for(lambda: [f for f in json.loads(writer.ListFiles(0)) if f["scan"] == scan
                             and f["status"] == "complete"], 30, "the NeXus file")
    with h5py.File(done[0]["path"], "r") as f:
        ds = f["entry/eiger_image/eiger_image"]
        assert ds.chunks == (1, Y, X) and "32008" in ds._filters, (ds.chunks, ds._filters)
        stored = sum(len(ds.id.read_direct_chunk((i, 0, 0))[1]) for i in range(FRAMES))
        assert stored < frames.nbytes / 2  # the detector's compressed bytes, not raw frames
        np.testing.assert_array_equal(ds[()], frames)
