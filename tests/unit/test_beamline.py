"""The simulated beamline (services/sim/): deterministic by seed, each
detector's physics where the ground truth says it must be, and the cheap
processors (``counters``, ``position``) recovering that truth from the
simulated streams. Everything runs without Tango: processors get the
batches a master would form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xraylib

from pipelines.processors.counters import Counters
from pipelines.processors.position import FROM_CALIBRATED_ENCODER, FROM_INTERFEROMETER, Position
from services.sim import agreement
from services.sim.dpc import shift_px_per_rad_per_um
from services.sim.phantom import PHASES
from services.sim.sims import SIM_NAMES, make_simulation, parse_shape
from services.physics.powder import reflections, wavelength_A
from services.scan import parse_scan
from support.documents import run_pipeline
from services.physics.xraylines import compton_keV


@pytest.fixture(scope="module")
def full():
    return make_simulation("full", (24, 16), snake=True, seed=5)


def test_same_seed_same_bytes_however_the_points_are_cut(full) -> None:
    twin = make_simulation("full", (24, 16), snake=True, seed=5)
    other = make_simulation("full", (24, 16), snake=True, seed=6)
    for stream in full.detectors:
        whole = full.arrays(stream, 0, 40)
        pieces = [twin.arrays(stream, a, b) for a, b in ((0, 7), (7, 33), (33, 40))]
        for name, arr in whole.items():
            assert arr.tobytes() == np.concatenate([p[name] for p in pieces]).tobytes(), (stream, name)
        assert any(not np.array_equal(arr, other.arrays(stream, 0, 40)[name]) for name, arr in whole.items()), stream


def test_the_scan_document_is_valid_and_complete(full) -> None:
    doc = full.document("sim-1", 7)
    meta = parse_scan(doc)
    assert meta.map_shape == (16, 24) and meta.snake
    assert set(meta.pipelines) == {"counters", "position", "xrf", "xrd", "dpc"}
    assert set(doc["streams"]) == set(full.detectors) == set(doc["acquisition"]["detectors"])
    for stream, spec in doc["streams"].items():
        arrays = full.arrays(stream, 0, 2)
        assert {n: (a.dtype.str, list(a.shape[1:])) for n, a in arrays.items()} == \
            {n: (s["dtype"], s["shape"]) for n, s in spec["arrays"].items()}
    assert doc["acquisition"]["detectors"]["xspress3"]["energy_calibration"]["gain_keV_per_channel"] == 0.01
    assert doc["acquisition"]["detectors"]["eiger"]["geometry"]["detector_config"]["max_shape"] == [256, 256]


def test_shapes_parse_and_bad_ones_are_refused() -> None:
    assert parse_shape("60x40") == (60, 40) and parse_shape("500") == (500,)
    for bad in ("60x", "0x5", "1x9", "axb", "2x2x2"):
        with pytest.raises(ValueError):
            parse_shape(bad)
    with pytest.raises(ValueError, match="unknown simulation"):
        make_simulation("ptycho")
    assert SIM_NAMES == ("counters", "xrf", "xrd", "dpc", "full")


def test_stage_lags_and_drifts_and_snake_rows_run_backwards(full) -> None:
    tr, cols = full.trajectory, 24
    row1 = slice(cols, 2 * cols)  # an odd row: backwards
    assert np.all(np.diff(tr.x_nominal[row1]) < 0) and np.all(tr.direction[row1] == -1)
    lag = tr.x - tr.x_nominal - full.stage.drift_um_per_s[0] * tr.t
    assert np.mean(lag[:cols]) == pytest.approx(-full.stage.lag_um, abs=0.005)  # behind, moving +x
    assert np.mean(lag[row1]) == pytest.approx(+full.stage.lag_um, abs=0.005)  # behind, moving -x


def test_xrf_lines_sit_at_xraylib_energies_and_dead_time_is_paralysable(full) -> None:
    xrf = full.detectors["xspress3"]
    acq = full.acquisition(0, 16)
    expected = xrf.expected(acq).sum(axis=0)
    energy = xrf.model.calibration.energy(np.arange(xrf.model.channels))
    for element, line in (("Fe", xraylib.KA1_LINE), ("Zn", xraylib.KA1_LINE), ("Pb", xraylib.LA1_LINE)):
        e = xraylib.LineEnergy(xraylib.SymbolToAtomicNumber(element), line)
        window = np.abs(energy - e) < 0.08
        assert energy[window][np.argmax(expected[window])] == pytest.approx(e, abs=0.011), element
    for scatter in (15.0, compton_keV(15.0, 90.0)):  # elastic, and Compton at 90°
        window = np.abs(energy - scatter) < 0.2
        assert energy[window][np.argmax(expected[window])] == pytest.approx(scatter, abs=0.02)
    assert expected[np.argmin(np.abs(energy - 15.0))] > 10 * expected[np.argmin(np.abs(energy - 13.8))]
    counts = full.arrays("xspress3", 0, 16)
    np.testing.assert_allclose(counts["ocr"], counts["icr"] * np.exp(-counts["icr"] * xrf.model.dead_time_s))
    live = counts["ocr"] / counts["icr"]
    assert 0.8 < live.min() and live.max() < 1.0  # a few per cent dead time, as at a real beamline
    np.testing.assert_allclose(counts["mca"].sum(axis=1), xrf.expected(acq).sum(axis=1) * live, rtol=0.06)


def test_xrd_rings_are_where_braggs_law_puts_them(full) -> None:
    eiger = full.detectors["eiger"]
    from services.physics.pyfai import integrator

    ai = integrator(eiger.geometry)
    templates = eiger.templates.reshape(-1, 256, 256)
    wavelength = wavelength_A(eiger.model.energy_keV)
    for k, phase in enumerate(PHASES):
        two_theta, profile = ai.integrate1d(templates[k], 2000, unit="2th_deg", method=("bbox", "csr", "cython"))
        strongest = max((r for r in reflections(phase, wavelength, math.radians(two_theta.max() - 1))),
                        key=lambda r: r.intensity * math.sin(r.two_theta_rad))
        window = np.abs(two_theta - math.degrees(strongest.two_theta_rad)) < 0.5
        assert two_theta[window][np.argmax(profile[window])] == \
            pytest.approx(math.degrees(strongest.two_theta_rad), abs=0.05), phase.name
    frame = full.arrays("eiger", 0, 1)["image"][0]
    assert frame.dtype == np.uint32 and frame.sum() == pytest.approx(eiger.expected(full.acquisition(0, 1)).sum(),
                                                                       rel=0.01)


def test_dpc_spot_moves_in_proportion_to_the_phase_gradient(full) -> None:
    dpc = full.detectors["dpc"]
    acq = full.acquisition(0, full.pattern.points)
    frames = dpc.expected(acq)
    centre = (dpc.model.pixels - 1) / 2
    col, row = np.meshgrid(np.arange(dpc.model.pixels), np.arange(dpc.model.pixels))
    total = frames.sum(axis=(1, 2))
    shift_x = (frames * col).sum(axis=(1, 2)) / total - centre
    shift_y = (frames * row).sum(axis=(1, 2)) / total - centre
    gx, gy = full.phantom.phase_gradient(acq.x, acq.y)
    scale = shift_px_per_rad_per_um(dpc.model)
    np.testing.assert_allclose(shift_x, scale * gx, atol=0.01 * np.abs(scale * gx).max())
    np.testing.assert_allclose(shift_y, scale * gy, atol=0.01 * np.abs(scale * gy).max())


# --------------------------------------------------------------------------- the cheap processors on simulated data


def test_counters_and_position_recover_the_phantom() -> None:
    sim = make_simulation("counters", (40, 30), snake=True, seed=2)
    products = {f"counters/{k}": v for k, v in run_pipeline(sim, "counters", Counters()).items()}
    products |= {f"position/{k}": v for k, v in run_pipeline(sim, "position", Position()).items()}
    assert not {"counters/sum", "counters/sum_norm"} & set(products)  # "sum": false

    from sink.regrid import regrid
    from services.scan import axis_values

    meta = parse_scan(sim.document("sim-unit", 1))

    def fetch(product: str, by: str | None) -> np.ndarray:
        if by is None:
            return products[product]
        return regrid(products[product], products[f"{by}/samx"], products[f"{by}/samy"], *axis_values(meta))

    results = agreement.evaluate(sim, fetch)
    assert {r.check.product for r in results} >= {"counters/transmission", "counters/xbic_norm", "position/samx"}
    for r in results:
        assert r.passed, f"{r.check.product} vs {r.check.truth}: {r.value:.4f} < {r.check.threshold}"
    # the raw counters carry the beam's decay, top-up jumps and jitter; the normalised ones do not
    i0 = products["counters/i0"]
    assert i0.std() / i0.mean() > 0.005
    sources = products["position/samx_source"]
    assert (sources == FROM_INTERFEROMETER).mean() > 0.99 and (sources == FROM_CALIBRATED_ENCODER).any()


def test_position_falls_back_to_a_calibrated_encoder_where_the_interferometer_is_blind() -> None:
    sim = make_simulation("counters", (40, 30), snake=True, seed=2)
    truth = sim.truth()
    products = run_pipeline(sim, "position", Position())
    fallback = products["samx_source"] == FROM_CALIBRATED_ENCODER
    encoder = products["samx"] + products["samx_encoder_error"]
    raw = np.abs(encoder - truth["x_um"])[fallback]
    fixed = np.abs(products["samx"] - truth["x_um"])[fallback]
    assert fallback.sum() >= 1 and np.all(fixed < raw / 5), (fixed, raw)
