"""The science processors against the phantom's truth and their references:
``xrf`` (fit and ROI), ``xrd`` (pyFAI integration, phase maps), ``dpc``
(centre of mass, gradients, the sink's Fourier integration), and bad events
failing with a message instead of a wrong number."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.processors import Batch
from pipelines.processors.counters import Counters
from pipelines.processors.dpc import Dpc
from pipelines.processors.xrd import Xrd
from pipelines.processors.xrf import Xrf
from services.sim.agreement import pearson
from services.sim.phantom import ELEMENTS, PHASES
from services.sim.sims import make_simulation
from services.scan import parse_scan
from services.physics.xraylines import Calibration, Resolution, gaussian_counts, series_lines
from sink.phase import integrate_gradients
from support.documents import run_pipeline


@pytest.fixture(scope="module")
def sim():
    return make_simulation("full", (30, 24), snake=True, seed=3)


def started(processor, sim, pipeline):
    processor.start_scan(parse_scan(sim.document("m1", 1)), sim.pipelines[pipeline].settings)
    return processor


def batch_of(sim, pipeline, start, stop, **replace) -> Batch:
    arrays = {f"{s}/{n}": a for s in sim.streams_of(pipeline) for n, a in sim.arrays(s, start, stop).items()}
    arrays.update(replace)
    return Batch(parse_scan(sim.document("m1", 1)), start, stop - start, arrays)


# --------------------------------------------------------------------------- XRF


def test_xrf_fitted_maps_follow_the_phantom(sim) -> None:
    truth = sim.truth()
    maps = run_pipeline(sim, "xrf", Xrf())
    for element in ELEMENTS:
        assert pearson(maps[f"{element}_norm"], truth[f"{element}_ug_cm2"]) >= 0.98, element
        assert pearson(maps[f"{element}_roi"], truth[f"{element}_ug_cm2"]) >= 0.95, element


def spectrum(amounts: dict[str, float], series: dict[str, str], counts_scale: float = 1.0, channels: int = 4096,
             incident: float = 15.0) -> np.ndarray:
    """Expected counts of pure lines (no scatter, no continuum): every xraylib line of the series,
    built independently of the fit's code (a line the fit models but the spectrum lacks, with no
    continuum under it, would weigh as a channel of zero counts)."""
    calibration, resolution = Calibration(-0.012, 0.01), Resolution()
    edges = calibration.edges(channels)
    out = np.zeros(channels)
    for element, amount in amounts.items():
        lines = series_lines(element, series[element], incident)
        total = sum(line.cross_section_cm2_g for line in lines)
        for line in lines:
            out += counts_scale * amount * line.cross_section_cm2_g / total * gaussian_counts(
                edges, line.energy_keV, float(resolution.sigma_keV(line.energy_keV)))
    return out


def xrf_settings(series: dict[str, str]) -> dict:
    return {"detector": "xspress3", "elements": series, "incident_energy_keV": 15.0,
            "energy_calibration": {"offset_keV": -0.012, "gain_keV_per_channel": 0.01},
            "resolution": {"noise_fwhm_keV": 0.06, "fano": 0.114}}


def fit_spectra(series: dict[str, str], spectra: np.ndarray) -> dict[str, np.ndarray]:
    meta = parse_scan(make_simulation("xrf", (4, 3)).document("fit", 1))
    proc = Xrf()
    proc.start_scan(meta, xrf_settings(series))
    return proc.process(Batch(meta, 0, len(spectra), {"xspress3/mca": spectra}))


def test_xrf_fit_recovers_relative_concentrations_within_five_percent() -> None:
    series = {"Ca": "K", "Fe": "K", "Cu": "K", "Zn": "K", "Pb": "L"}
    amounts = {"Ca": 1.0, "Fe": 0.5, "Cu": 0.2, "Zn": 0.35, "Pb": 0.15}
    rng = np.random.default_rng(0)
    expected = spectrum(amounts, series, counts_scale=2e6)
    out = fit_spectra(series, rng.poisson(expected)[None].astype(np.uint32))
    for element, amount in amounts.items():
        assert out[element][0] / out["Ca"][0] == pytest.approx(amount / amounts["Ca"], rel=0.05), element


def test_the_fit_separates_a_k_beta_from_its_neighbours_k_alpha_where_the_roi_cannot() -> None:
    """Mn K-beta (6.49 keV) lies on Fe K-alpha (6.40 keV). A sample with Mn
    and no Fe: the Fe ROI fills with Mn counts, the fit gives Fe about zero."""
    series = {"Mn": "K", "Fe": "K"}
    rng = np.random.default_rng(1)
    spectra = rng.poisson(np.tile(spectrum({"Mn": 1.0}, series, counts_scale=1e6), (8, 1))).astype(np.uint32)
    out = fit_spectra(series, spectra)
    assert np.all(out["Fe_roi"] > 0.05 * out["Mn"])  # the ROI sees "iron"
    assert np.all(out["Fe"] < 0.005 * out["Mn"])  # the fit does not
    with_fe = rng.poisson(np.tile(spectrum({"Mn": 1.0, "Fe": 0.3}, series, counts_scale=1e6), (8, 1)))
    both = fit_spectra(series, with_fe.astype(np.uint32))
    np.testing.assert_allclose(both["Fe"] / both["Mn"], 0.3, rtol=0.03)


@pytest.mark.parametrize("bad, match", [("channels", "2048"), ("nan", "non-finite")])
def test_xrf_bad_spectra_fail_with_a_message(sim, bad, match) -> None:
    proc = started(Xrf(), sim, "xrf")
    proc.process(batch_of(sim, "xrf", 0, 4))
    mca = sim.arrays("xspress3", 4, 8)["mca"]
    wrong = mca[:, :2048] if bad == "channels" else np.where(np.arange(4096) == 7, np.nan, mca.astype(np.float32))
    with pytest.raises(ValueError, match=match):
        proc.process(batch_of(sim, "xrf", 4, 8, **{"xspress3/mca": wrong}))


# --------------------------------------------------------------------------- XRD


def test_xrd_patterns_equal_pyfai_on_the_same_frame_and_phase_maps_follow_the_phantom(sim) -> None:
    proc = started(Xrd(), sim, "xrd")
    batch = batch_of(sim, "xrd", 10, 14)
    out = proc.process(batch)
    for j in range(4):
        direct = proc.ai.integrate1d(batch.arrays["eiger/image"][j], 1000, unit="2th_deg",
                                     method=("bbox", "csr", "cython"))
        np.testing.assert_allclose(out["pattern"][j], direct.intensity, rtol=1e-6)
    truth = sim.truth()
    maps = run_pipeline(sim, "xrd", Xrd())
    for phase in PHASES:
        assert pearson(maps[f"{phase.name}_norm"], truth[f"phase_{phase.name}"]) >= 0.98, phase.name
    assert all(len(v) >= 2 for v in proc.windows.values()), proc.windows  # each phase keeps clean rings


@pytest.mark.parametrize("bad, match", [("shape", "per point"), ("nan", "non-finite")])
def test_xrd_bad_frames_fail_with_a_message(sim, bad, match) -> None:
    proc = started(Xrd(), sim, "xrd")
    frames = sim.arrays("eiger", 0, 2)["image"]
    wrong = frames[:, :128, :] if bad == "shape" else np.where(frames == frames.max(), np.nan, frames.astype(np.float32))
    with pytest.raises(ValueError, match=match):
        proc.process(batch_of(sim, "xrd", 0, 2, **{"eiger/image": wrong}))


# --------------------------------------------------------------------------- DPC


def test_dpc_gradients_and_the_integrated_phase_follow_the_phantom(sim) -> None:
    truth = sim.truth()
    maps = run_pipeline(sim, "dpc", Dpc())
    assert pearson(maps["gradient_x"], truth["dphase_dx"]) >= 0.95
    assert pearson(maps["gradient_y"], truth["dphase_dy"]) >= 0.95
    steps = [(a.stop - a.start) / (a.points - 1) for a in (sim.pattern.fast, sim.pattern.slow)]
    phase = integrate_gradients(maps["gradient_x"], maps["gradient_y"], *steps)
    assert pearson(phase, truth["phase_rad"]) >= 0.9
    assert pearson(maps["bright_field_norm"], np.exp(-0.06 * truth["thickness_um"])) >= 0.99


@pytest.mark.parametrize("bad, match", [("shape", "per point"), ("dark", "no counts"), ("nan", "non-finite")])
def test_dpc_bad_frames_fail_with_a_message(sim, bad, match) -> None:
    proc = started(Dpc(), sim, "dpc")
    frames = sim.arrays("dpc", 0, 2)["image"]
    wrong = {"shape": frames[:, :, :32], "dark": np.zeros_like(frames),
             "nan": np.where(frames == frames.max(), np.nan, frames.astype(np.float32))}[bad]
    with pytest.raises(ValueError, match=match):
        proc.process(batch_of(sim, "dpc", 0, 2, **{"dpc/image": wrong}))


def test_xrd_mask_dark_and_flat_go_to_pyfai_as_given(sim, tmp_path) -> None:
    frames = sim.arrays("eiger", 0, 3)["image"]
    rng = np.random.default_rng(4)
    mask = np.zeros(frames.shape[1:], np.int8)
    mask[100:140, :] = 1  # a dead module
    dark = rng.integers(0, 3, frames.shape[1:]).astype(np.float32)
    flat = rng.uniform(0.9, 1.1, frames.shape[1:]).astype(np.float32)
    for name, value in (("mask", mask), ("dark", dark), ("flat", flat)):
        np.save(tmp_path / f"{name}.npy", value)
    settings = {**sim.pipelines["xrd"].settings, **{k: str(tmp_path / f"{k}.npy") for k in ("mask", "dark", "flat")}}
    proc = Xrd()
    proc.start_scan(parse_scan(sim.document("m1", 1)), settings)
    out = proc.process(batch_of(sim, "xrd", 0, 3))
    plain = started(Xrd(), sim, "xrd").process(batch_of(sim, "xrd", 0, 3))
    for j in range(3):
        direct = proc.ai.integrate1d(frames[j], 1000, unit="2th_deg", method=("bbox", "csr", "cython"),
                                     mask=mask, dark=dark, flat=flat)
        np.testing.assert_allclose(out["pattern"][j], direct.intensity, rtol=1e-6)
    assert not np.allclose(out["pattern"], plain["pattern"])  # the corrections changed something


def test_a_line_scan_simulation_is_a_valid_line_along_the_fast_axis() -> None:
    line = make_simulation("counters", (50,), seed=1)
    meta = parse_scan(line.document("l1", 1))
    assert meta.geometry_type == "line" and meta.map_shape == (50,)
    tr = line.trajectory
    assert np.all(np.diff(tr.x_nominal) > 0) and np.all(tr.y_nominal == line.pattern.line_y)
    maps = run_pipeline(line, "counters", Counters())
    assert maps["transmission"].shape == (50,) and np.isfinite(maps["transmission"]).all()


@pytest.mark.parametrize("pipeline, processor, array", [("xrf", Xrf, "xspress3/mca"), ("xrd", Xrd, "eiger/image"),
                                                         ("dpc", Dpc, "dpc/image")])
def test_in_a_worker_one_bad_event_fails_alone_with_its_message(sim, pipeline, processor, array) -> None:
    """What a worker does with a batch holding one NaN-poisoned event: that
    point fails with the processor's message, its neighbours keep their values."""
    from pipelines.worker import run_isolated

    proc = started(processor(), sim, pipeline)
    good = batch_of(sim, pipeline, 20, 26)
    poisoned = good.arrays[array].astype(np.float32)
    poisoned[3].flat[5] = np.nan
    results, errors = run_isolated(proc, batch_of(sim, pipeline, 20, 26, **{array: poisoned}))
    assert list(errors) == ["23"] and "non-finite" in errors["23"]
    clean = started(processor(), sim, pipeline).process(good)
    for name, values in clean.items():
        rows = [0, 1, 2, 4, 5]
        # alone or in a batch, float32 sums round differently: 1e-4 is far below counting noise
        np.testing.assert_allclose(results[name][rows], values[rows], rtol=1e-4, err_msg=name)
        assert np.isnan(results[name][3]).all() or (results[name][3] == 0).all(), name


# --------------------------------------------------------------------------- check_settings (what StartScan runs)


def declaring(sim, stream: str, array: str, shape: list[int]):
    """The simulation's scan document with one array declared with another per-point shape."""
    doc = sim.document("m1", 1)
    doc["streams"][stream]["arrays"][array]["shape"] = shape
    return parse_scan(doc)


def refused(processor, scan, settings, match: str) -> None:
    """Refused by check_settings (the master, at StartScan) and by start_scan (the worker), alike."""
    with pytest.raises(ValueError, match=match):
        processor.check_settings(scan, settings)
    with pytest.raises(ValueError, match=match):
        processor().start_scan(scan, settings)


@pytest.mark.parametrize("change, match", [
    ({"elements": {"Pb": "K"}}, "Pb K lines are not excited at 15 keV"),
    ({"elements": {"Fe": "K", "Xx": "K"}}, "element Xx: Invalid chemical symbol"),
    ({"elements": {"Fe": "N"}}, "elements/Fe"),
    ({"elements": {"Fe": "M"}}, "Fe M lines are not excited at 15 keV"),
    ({"incident_energy_keV": 5.0}, "Fe K lines are not excited at 5 keV"),
    ({"fit_range_keV": [12.0, 2.0]}, r"fit_range_keV \[12.0, 2.0\] is empty"),
    ({"energy_calibration": {"offset_keV": 0.0, "gain_keV_per_channel": 0}}, "gain_keV_per_channel"),
])
def test_xrf_check_settings_refuses_with_the_problem(sim, change, match) -> None:
    refused(Xrf, parse_scan(sim.document("m1", 1)), {**sim.pipelines["xrf"].settings, **change}, match)


def test_xrf_check_settings_refuses_an_mca_declared_as_images(sim) -> None:
    refused(Xrf, declaring(sim, "xspress3", "mca", [4, 16, 256]), sim.pipelines["xrf"].settings,
            r"xspress3/mca is declared with shape \[4, 16, 256\] per point; XRF needs spectra")


def test_xrd_check_settings_refuses_what_pyfai_or_the_files_would(sim, tmp_path) -> None:
    scan, good = parse_scan(sim.document("m1", 1)), sim.pipelines["xrd"].settings
    np.save(tmp_path / "small.npy", np.zeros((10, 10), np.int8))
    np.save(tmp_path / "stack.npy", np.zeros((2, 256, 256), np.float32))
    (tmp_path / "text.npy").write_text("not a numpy file")
    cases = [
        ({"geometry": {**good["geometry"], "detector": "NoSuchDetector"}}, "the pyFAI geometry cannot be loaded"),
        ({"geometry": {"dist": 0.05}}, "geometry"),
        ({"mask": str(tmp_path / "missing.npy")}, "mask .*missing.npy' cannot be read"),
        ({"dark": str(tmp_path / "text.npy")}, "dark .*text.npy' cannot be read"),
        ({"flat": str(tmp_path / "stack.npy")}, r"flat .* shape \[2, 256, 256\], not one 2-D frame"),
        ({"mask": str(tmp_path / "small.npy")}, r"mask .* has shape \[10, 10\], the frames of eiger/image \[256, 256\]"),
        ({"phases": [{"name": "Ti", "lattice_A": 2.95, "structure": "hcp"}]}, "phase Ti: structure 'hcp'"),
        ({"phases": [good["phases"][0], good["phases"][0]]}, "phase names must be unique"),
        ({"unit": "r_mm"}, "unit"),
    ]
    for change, match in cases:
        refused(Xrd, scan, {**good, **change}, match)
    refused(Xrd, declaring(sim, "eiger", "image", [65536]), good, "XRD needs 2-D frames")


def test_xrd_check_settings_is_cheap_once_the_geometry_was_seen(sim) -> None:
    """The master checks on every StartScan: pyFAI loads a geometry once, then the check is a cache hit."""
    import time

    scan, good = parse_scan(sim.document("m1", 1)), sim.pipelines["xrd"].settings
    assert Xrd.check_settings(scan, good) == good  # may import pyFAI and load the geometry
    t0 = time.perf_counter()
    for _ in range(20):
        Xrd.check_settings(scan, good)
    assert (time.perf_counter() - t0) / 20 < 0.02


@pytest.mark.parametrize("change, match", [
    ({"reference_px": [80.0, 10.0]}, r"reference_px \[80.0, 10.0\] is outside the 64 x 64 frames of dpc/image"),
    ({"method": "ptychography"}, "method"),
    ({"shift_px_per_rad_per_um": -1.0}, "shift_px_per_rad_per_um"),
])
def test_dpc_check_settings_refuses_with_the_problem(sim, change, match) -> None:
    refused(Dpc, parse_scan(sim.document("m1", 1)), {**sim.pipelines["dpc"].settings, **change}, match)


def test_dpc_check_settings_needs_the_geometry_or_the_scale_and_2d_frames(sim) -> None:
    scan = parse_scan(sim.document("m1", 1))
    refused(Dpc, scan, {"detector": "dpc", "distance_m": 3.0}, "Dpc settings.*not valid under any")
    refused(Dpc, declaring(sim, "dpc", "image", [4096]), sim.pipelines["dpc"].settings, "DPC needs 2-D frames")
