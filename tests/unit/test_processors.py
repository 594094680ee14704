"""Processor plugins (pipelines/processors): discovery through entry points,
the Batch view of a unit, the result check, the ``counters`` and
``passthrough`` modalities, and the worker's per-point error isolation
(pipelines.worker.run_isolated)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from pipelines import processors
from pipelines.processors import Batch, Processor, check_results
from pipelines.processors.counters import Counters
from pipelines.processors.passthrough import Passthrough
from pipelines.processors.position import Position
from pipelines.worker import run_isolated
from services.sim import profiles
from services.scan import ScanMeta, parse_scan
from services.schema import SchemaError

PROFILE = profiles.PROFILES["counters"]
STREAMS = ("pandabox", "scaler", "diode")


def scan_meta() -> ScanMeta:
    return parse_scan(profiles.ProfileScan(PROFILE, "p1", 1000).document("s1", 1))


META = scan_meta()


def counter_batch(start: int, stop: int, streams: tuple[str, ...] = STREAMS, **extra: np.ndarray) -> Batch:
    """A unit of the counters profile for [start, stop), as the master forms it."""
    idx = np.arange(start, stop)
    arrays = {f"{s}/{n}": a for s in streams for n, a in profiles.counter_values(s, idx).items()}
    arrays.update(extra)
    return Batch(META, start, stop - start, arrays)


def counters(settings: dict[str, Any] | None = None) -> Counters:
    proc = Counters()
    proc.start_scan(META, PROFILE.settings if settings is None else settings)
    return proc


# --------------------------------------------------------------------------- discovery


def test_installed_processors_are_available() -> None:
    names = processors.available()
    assert {"counters", "passthrough"} <= set(names)
    assert names == sorted(names)
    assert processors.load("counters") is Counters
    assert processors.load("passthrough") is Passthrough


def test_preload_prepares_named_or_all_processors_and_reports_the_missing() -> None:
    import sys

    assert processors.preload(["xrd"]) == {}
    assert "pyFAI" in sys.modules  # prepared: the first XRD scan does not import it
    problems = processors.preload(["counters", "xrd-nope"])
    assert list(problems) == ["xrd-nope"] and "not installed" in problems["xrd-nope"]
    assert processors.preload(["*"]) == {}


def test_loading_an_unknown_processor_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match="'xrd-nope' is not installed") as info:
        processors.load("xrd-nope")
    for name in processors.available():
        assert name in str(info.value)


# --------------------------------------------------------------------------- Batch


def test_batch_streams_and_indices() -> None:
    batch = counter_batch(100, 110)
    assert batch.streams == set(STREAMS)
    np.testing.assert_array_equal(batch.indices, np.arange(100, 110))
    scaler = batch.stream("scaler")
    assert scaler.keys() == {"i0", "i1"}
    assert scaler["i0"] is batch.arrays["scaler/i0"]


def test_batch_stream_raises_for_a_missing_or_unknown_stream() -> None:
    batch = Batch(META, 0, 10, {k: v for k, v in counter_batch(0, 10).arrays.items() if not k.startswith("diode/")},
                  missing=frozenset({"diode"}))
    with pytest.raises(KeyError, match="'diode' is missing from events \\[0, 10\\)"):
        batch.stream("diode")
    with pytest.raises(KeyError, match="no stream 'eiger'"):
        batch.stream("eiger")
    with pytest.raises(KeyError, match="no stream 'scal'"):
        batch.stream("scal")


def test_batch_point_is_a_one_point_view() -> None:
    batch = counter_batch(100, 110)
    for j in (0, 4, 9):
        point = batch.point(j)
        assert (point.index, point.count, point.scan, point.missing) == (100 + j, 1, META, batch.missing)
        assert point.arrays.keys() == batch.arrays.keys()
        for name, arr in point.arrays.items():
            assert arr.shape == (1, *batch.arrays[name].shape[1:])
            assert np.shares_memory(arr, batch.arrays[name])
            np.testing.assert_array_equal(arr[0], batch.arrays[name][j])


# --------------------------------------------------------------------------- check_results


def test_check_results_accepts_numeric_arrays_with_the_point_axis() -> None:
    out = check_results({"a": [1.0, 2.0, 3.0], "b": np.zeros((3, 4), np.uint16), "c": np.array([True, False, True]),
                         "d": np.ones(3, np.complex64)}, 3)
    assert {k: (v.dtype.kind, v.shape) for k, v in out.items()} == {
        "a": ("f", (3,)), "b": ("u", (3, 4)), "c": ("b", (3,)), "d": ("c", (3,))}


@pytest.mark.parametrize("results, match", [
    ([np.zeros(3)], "not a dict"),
    (None, "not a dict"),
    (np.zeros(3), "not a dict"),
    ({"a": np.array(["x", "y", "z"])}, "non-numeric"),
    ({"a": np.array([None, 1, 2], dtype=object)}, "non-numeric"),
    ({"a": np.zeros(4)}, "leading axis"),
    ({"a": np.zeros((1, 3))}, "leading axis"),
    ({"a": np.float64(1.0)}, "leading axis"),
    ({"a": np.zeros(3), "b": np.zeros(2)}, "'b'"),
    ({"": np.zeros(3)}, "name"),
    ({1: np.zeros(3)}, "name"),
])
def test_check_results_refuses(results: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_results(results, 3)


# --------------------------------------------------------------------------- counters


def test_counters_match_the_profile_s_expected_values() -> None:
    batch = counter_batch(250, 750)
    out = check_results(counters().process(batch), batch.count)
    expected = profiles.expected_counters(np.arange(250, 750))
    assert out.keys() == expected.keys()
    for name, values in expected.items():
        assert out[name].dtype == np.float64
        np.testing.assert_allclose(out[name], values, rtol=1e-13, atol=0, err_msg=name)


def test_counters_are_nan_where_the_monitor_reads_zero() -> None:
    batch = counter_batch(0, 20)
    i0 = batch.arrays["scaler/i0"].copy()
    i0[[3, 11]] = 0.0
    batch = Batch(META, 0, 20, {**batch.arrays, "scaler/i0": i0})
    out = counters().process(batch)
    zero = i0 == 0
    expected = profiles.expected_counters(np.arange(20))
    for name in ("i1_norm", "diode_norm", "sum_norm"):
        assert np.isnan(out[name][zero]).all(), name
        np.testing.assert_allclose(out[name][~zero], expected[name][~zero], rtol=1e-13, err_msg=name)
    for name in ("i1", "diode", "sum"):
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-13, err_msg=name)
    np.testing.assert_array_equal(out["i0"], i0)


def test_counters_without_a_monitor() -> None:
    batch = counter_batch(0, 20)
    out = counters({"counters": ["i1", "diode"]}).process(batch)
    expected = profiles.expected_counters(np.arange(20))
    assert out.keys() == {"i1", "diode", "sum"}
    np.testing.assert_allclose(out["sum"], expected["sum"], rtol=1e-13)


def test_a_counter_in_two_streams_must_be_named_with_its_stream() -> None:
    idx = np.arange(0, 10)
    other_i1 = 3.0 * idx + 1
    batch = counter_batch(0, 10, **{"diode/i1": other_i1})
    with pytest.raises(KeyError, match="'i1' is in 2 streams"):
        counters().process(batch)
    out = counters({"counters": ["scaler/i1", "diode"], "normalise_by": "i0"}).process(batch)
    expected = profiles.expected_counters(idx)
    for name, values in expected.items():
        np.testing.assert_allclose(out[name], values, rtol=1e-13, err_msg=name)


def test_the_same_counter_from_two_streams_is_not_silently_merged() -> None:
    """``scaler/i1`` and ``diode/i1`` are two counters: the processor must
    either refuse the settings or sum both, never count one twice."""
    idx = np.arange(0, 10)
    other_i1 = 3.0 * idx + 1
    batch = counter_batch(0, 10, **{"diode/i1": other_i1})
    proc = Counters()
    try:
        proc.start_scan(META, {"counters": ["scaler/i1", "diode/i1"], "normalise_by": "scaler/i0"})
    except ValueError:
        return
    out = proc.process(batch)
    np.testing.assert_allclose(out["sum"], batch.arrays["scaler/i1"] + other_i1, rtol=1e-13)


def test_a_missing_counter_names_itself() -> None:
    batch = counter_batch(0, 10, streams=("pandabox", "scaler"))
    with pytest.raises(KeyError, match="'diode'"):
        counters().process(batch)
    with pytest.raises(KeyError, match="'scaler/i9'"):
        counters({"counters": ["scaler/i9"]}).process(batch)


def test_transmission_is_the_absorbance_and_raw_counters_stay_raw() -> None:
    batch = counter_batch(0, 20)
    i1 = batch.arrays["scaler/i1"].copy()
    i1[[2, 9]] = [0.0, -1.0]  # no photons, and a bad reading: no absorbance, not a failure
    batch = Batch(META, 0, 20, {**batch.arrays, "scaler/i1": i1})
    out = counters({"counters": ["i1", "diode"], "normalise_by": "i0", "transmission": "i1", "sum": False,
                    "not_normalised": ["diode"]}).process(batch)
    assert out.keys() == {"i0", "i1", "diode", "i1_norm", "transmission"}
    i0 = batch.arrays["scaler/i0"]
    good = i1 > 0
    np.testing.assert_allclose(out["transmission"][good], np.log(i0[good] / i1[good]), rtol=1e-12)
    assert np.isnan(out["transmission"][~good]).all()
    np.testing.assert_array_equal(out["diode"], batch.arrays["diode/diode"])


@pytest.mark.parametrize("settings, match", [
    ({"counters": ["i1"], "transmission": "i1"}, "needs normalise_by"),
    ({"counters": ["i1"], "normalise_by": "i0", "transmission": "diode"}, "not one of the counters"),
    ({"counters": ["i1"], "normalise_by": "i0", "not_normalised": ["xbiv"]}, "not among the counters"),
])
def test_inconsistent_counter_settings_refuse_the_scan(settings, match) -> None:
    with pytest.raises(ValueError, match=match):
        Counters().start_scan(META, settings)


# --------------------------------------------------------------------------- position


POSITION = {"axes": {"samx": {"encoder": "pandabox/samx_enc", "interferometer": "ifm/samx"}}}


def test_position_uses_the_interferometer_and_calibrates_the_encoder_for_lost_readings() -> None:
    idx = np.arange(40)
    true = 0.05 * idx
    encoder = 0.3 + 1.01 * true  # offset and scale error: what the fit must learn
    ifm = true.copy()
    ifm[[30, 35]] = np.nan
    proc = Position()
    proc.start_scan(META, POSITION)
    first = proc.process(Batch(META, 0, 20, {"pandabox/samx_enc": encoder[:20], "ifm/samx": ifm[:20]}))
    np.testing.assert_array_equal(first["samx"], true[:20])
    assert (first["samx_source"] == 0).all()
    second = proc.process(Batch(META, 20, 20, {"pandabox/samx_enc": encoder[20:], "ifm/samx": ifm[20:]}))
    np.testing.assert_allclose(second["samx"], true[20:], atol=1e-9)  # lost readings from the calibrated encoder
    assert list(np.flatnonzero(second["samx_source"] == 1)) == [10, 15]
    np.testing.assert_allclose(second["samx_encoder_error"], encoder[20:] - true[20:], atol=1e-9)


def test_position_before_any_calibration_falls_back_to_the_raw_encoder() -> None:
    proc = Position()
    proc.start_scan(META, POSITION)
    out = proc.process(Batch(META, 0, 2, {"pandabox/samx_enc": np.array([1.0, 2.0]), "ifm/samx": np.full(2, np.nan)}))
    np.testing.assert_array_equal(out["samx"], [1.0, 2.0])
    assert (out["samx_source"] == 2).all()


@pytest.mark.parametrize("settings", [{}, {"axes": {}}, {"axes": {"samx": {}}},
                                      {"axes": {"samx": {"encoder": "no-stream-part"}}},
                                      {"axes": {"samx": {"encoder": "a/b", "laser": "c/d"}}}])
def test_bad_position_settings_refuse_the_scan(settings) -> None:
    with pytest.raises(SchemaError):
        Position().start_scan(META, settings)


def test_position_names_a_missing_stream_and_refuses_non_scalars() -> None:
    proc = Position()
    proc.start_scan(META, POSITION)
    with pytest.raises(KeyError, match="ifm"):
        proc.process(Batch(META, 0, 3, {"pandabox/samx_enc": np.zeros(3)}))
    with pytest.raises(ValueError, match="positions are scalars"):
        proc.process(Batch(META, 0, 3, {"pandabox/samx_enc": np.zeros((3, 2)), "ifm/samx": np.zeros(3)}))


def test_a_non_scalar_counter_is_refused() -> None:
    batch = counter_batch(0, 10, streams=("pandabox", "scaler"), **{"diode/diode": np.ones((10, 2))})
    with pytest.raises(ValueError, match="'diode'.*scalars"):
        counters().process(batch)


@pytest.mark.parametrize("settings, where", [
    ({}, "counters"),
    ({"normalise_by": "i0"}, "counters"),
    ({"counters": []}, "counters"),
    ({"counters": ["i1", "i1"]}, "counters"),
    ({"counters": ["i1"], "normalize_by": "i0"}, "normalize_by"),
    ({"counters": ["i1"], "normalise_by": 0}, "normalise_by"),
    ({"counters": "i1"}, "counters"),
])
def test_bad_counters_settings_refuse_the_scan(settings: dict[str, Any], where: str) -> None:
    with pytest.raises(SchemaError, match=f"Counters settings.*{where}"):
        Counters().start_scan(META, settings)


# --------------------------------------------------------------------------- passthrough


def test_passthrough_hands_on_every_array_by_default() -> None:
    batch = counter_batch(0, 10)
    proc = Passthrough()
    proc.start_scan(META, {})
    out = proc.process(batch)
    assert out.keys() == batch.arrays.keys()
    assert all(out[k] is batch.arrays[k] for k in out)


def test_passthrough_hands_on_the_selected_arrays() -> None:
    batch = counter_batch(0, 10)
    proc = Passthrough()
    proc.start_scan(META, {"arrays": ["scaler/i0", "pandabox/t"]})
    out = proc.process(batch)
    assert list(out) == ["scaler/i0", "pandabox/t"]
    assert all(out[k] is batch.arrays[k] for k in out)
    proc.start_scan(META, {"arrays": ["scaler/i0", "eiger/image"]})
    with pytest.raises(KeyError, match="eiger/image"):
        proc.process(batch)


@pytest.mark.parametrize("settings", [{"arrays": ["i0"]}, {"arrays": "scaler/i0"}, {"arrays": ["a/b", "a/b"]},
                                      {"array": ["scaler/i0"]}])
def test_bad_passthrough_settings_refuse_the_scan(settings: dict[str, Any]) -> None:
    with pytest.raises(SchemaError, match="Passthrough settings"):
        Passthrough().start_scan(META, settings)


@pytest.mark.parametrize("settings", [{"arrays": []}])
def test_an_empty_passthrough_list_is_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(SchemaError, match="Passthrough settings.*arrays"):
        Passthrough.check_settings(META, settings)


# --------------------------------------------------------------------------- check_settings (what StartScan runs)

BAD_SETTINGS = [
    # (processor, settings, what the message must name)
    (Counters, {}, "counters"),
    (Counters, {"counters": ["i1"], "normalize_by": "i0"}, "normalize_by"),
    (Counters, {"counters": ["i1"], "transmission": "i1"}, "transmission needs normalise_by"),
    (Counters, {"counters": ["i1"], "normalise_by": "i0", "transmission": "diode"}, "not one of the counters"),
    (Counters, {"counters": ["i1"], "normalise_by": "i0", "not_normalised": ["xbiv"]}, "not among the counters"),
    (Counters, {"counters": ["scaler/i1", "diode/i1"]}, r"\['i1'\] named twice"),
    (Position, {"axes": {}}, "axes"),
    (Position, {"axes": {"samx": {"encoder": "pandabox/samx", "interferometer": "pandabox/samx"}}},
     "axis samx: encoder and interferometer are the same array"),
    (Position, {"axes": {"samx": {"encoder": "pandabox/enc"}, "samy": {"encoder": "pandabox/enc"}}},
     "'pandabox/enc' is a sensor of both axis samx and axis samy"),
    (Position, {"axes": {"samx": {"encoder": "a/x"}, "samx_source": {"encoder": "a/y"}}},
     r"same result name twice: \['samx_source'\]"),
    (Passthrough, {"arrays": ["i0"]}, "arrays/0"),
]


@pytest.mark.parametrize("processor, settings, match", BAD_SETTINGS)
def test_check_settings_refuses_bad_settings_naming_the_problem(processor, settings, match) -> None:
    with pytest.raises(ValueError, match=match):
        processor.check_settings(META, settings)
    with pytest.raises(ValueError, match=match):  # the worker's start_scan runs the same check
        processor().start_scan(META, settings)


@pytest.mark.parametrize("name", ["counters", "position", "passthrough"])
def test_check_settings_returns_good_settings_unchanged(name: str) -> None:
    good = {"counters": PROFILE.settings, "position": POSITION, "passthrough": {"arrays": ["scaler/i0"]}}[name]
    assert processors.load(name).check_settings(META, good) == good


def test_start_scan_checks_with_check_settings(monkeypatch) -> None:
    """One check, two callers: the master (classmethod, no instance) and the worker's start_scan."""
    calls = []

    def refuse(cls, scan, settings):
        calls.append((cls, settings))
        raise ValueError("refused by check_settings")

    monkeypatch.setattr(Counters, "check_settings", classmethod(refuse))
    with pytest.raises(ValueError, match="refused by check_settings"):
        Counters().start_scan(META, PROFILE.settings)
    assert calls == [(Counters, PROFILE.settings)]


class NoLink:
    """The master must refuse bad settings before asking the topology manager anything."""

    def __init__(self) -> None:
        self.lookups = 0

    def lookup(self, query: dict) -> list[dict]:
        self.lookups += 1
        return []


def test_the_master_refuses_a_scan_whose_processor_refuses_its_settings() -> None:
    from pipelines.master import MasterComponent, MasterConfig
    from services.scan import ScanError

    link = NoLink()
    master = MasterComponent("test/p1/master", "p1", "127.0.0.1", "127.0.0.1", MasterConfig(), link)
    try:
        bad = profiles.ProfileScan(PROFILE, "p1", 100, analysis={
            "settings": {"counters": ["i1"], "transmission": "i1"}}).document("bad-1", 1)
        with pytest.raises(ScanError, match="scan bad-1: counters settings refused: transmission needs normalise_by"):
            master.plan_scan(json.dumps(bad))
        schema_bad = profiles.ProfileScan(PROFILE, "p1", 100, analysis={"settings": {"sum": True}}).document("bad-2", 1)
        with pytest.raises(ValueError, match="Counters settings.*counters"):
            master.plan_scan(json.dumps(schema_bad))
        assert link.lookups == 0
        with pytest.raises(ScanError, match="no registered source"):  # good settings go on to the lookup
            master.plan_scan(json.dumps(profiles.ProfileScan(PROFILE, "p1", 100).document("good-1", 1)))
        assert link.lookups == 1
    finally:
        master.stop()


# --------------------------------------------------------------------------- run_isolated


class FailsAt(Processor):
    """Raises for a batch holding any of ``bad``; otherwise a float, an int
    and a per-point vector result derived from the indices."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad = bad
        self.calls = 0

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        self.calls += 1
        for i in batch.indices:
            if int(i) in self.bad:
                raise ZeroDivisionError(f"bad point {int(i)}")
        return expected_good(batch.indices)


def expected_good(idx: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": idx * 0.5, "n": (idx * 3).astype(np.int32), "v": np.stack([idx, -idx], axis=1).astype(np.float32)}


def index_batch(start: int, stop: int) -> Batch:
    return Batch(META, start, stop - start, {"scaler/i0": np.arange(start, stop, dtype=np.float64)})


def test_run_isolated_without_failure_processes_the_batch_once() -> None:
    proc = FailsAt(set())
    arrays, errors = run_isolated(proc, index_batch(10, 20))
    assert errors == {} and proc.calls == 1
    for name, values in expected_good(np.arange(10, 20)).items():
        np.testing.assert_array_equal(arrays[name], values)


@pytest.mark.parametrize("bad", [{10}, {13, 17}, {19}, set(range(10, 19))])
def test_run_isolated_fails_only_the_failing_points(bad: set[int]) -> None:
    arrays, errors = run_isolated(FailsAt(bad), index_batch(10, 20))
    assert errors == {str(i): f"ZeroDivisionError: bad point {i}" for i in bad}
    idx = np.arange(10, 20)
    failed = np.isin(idx, list(bad))
    expected = expected_good(idx)
    assert arrays.keys() == expected.keys()
    for name, values in expected.items():
        assert arrays[name].dtype == values.dtype and arrays[name].shape == values.shape
        np.testing.assert_array_equal(arrays[name][~failed], values[~failed])
    assert np.isnan(arrays["x"][failed]).all() and np.isnan(arrays["v"][failed]).all()
    assert (arrays["n"][failed] == 0).all()


def test_run_isolated_when_every_point_fails() -> None:
    arrays, errors = run_isolated(FailsAt(set(range(10, 20))), index_batch(10, 20))
    assert arrays == {}
    assert errors == {str(i): f"ZeroDivisionError: bad point {i}" for i in range(10, 20)}
    arrays, errors = run_isolated(FailsAt({42}), index_batch(42, 43))
    assert arrays == {} and errors == {"42": "ZeroDivisionError: bad point 42"}


def test_run_isolated_counts_an_invalid_result_as_a_failure() -> None:
    class Bad(Processor):
        def process(self, batch: Batch) -> dict[str, np.ndarray]:
            if 5 in batch.indices:
                return {"x": np.array(["nope"] * batch.count)}
            return {"x": batch.indices * 2.0}

    arrays, errors = run_isolated(Bad(), index_batch(0, 8))
    assert errors.keys() == {"5"} and errors["5"].startswith("ValueError: ") and "non-numeric" in errors["5"]
    expected = np.arange(8) * 2.0
    expected[5] = np.nan
    np.testing.assert_array_equal(arrays["x"], expected)


class Ragged(Processor):
    """Per-point spectra of length 3, except ``odd`` points of length 4: a
    whole batch cannot be stacked, so it fails and is retried point by point."""

    def __init__(self, odd: set[int]) -> None:
        super().__init__()
        self.odd = odd

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        rows = [np.full(4 if int(i) in self.odd else 3, float(i)) for i in batch.indices]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("ragged spectra")
        return {"spectrum": np.stack(rows)}


@pytest.mark.parametrize("odd", [{3}, {2, 6}, {0}])
def test_run_isolated_fails_points_whose_results_disagree(odd: set[int]) -> None:
    """The odd ones out (a minority of the batch's points) fail, wherever they are."""
    arrays, errors = run_isolated(Ragged(odd), index_batch(0, 8))
    assert errors.keys() == {str(i) for i in odd}
    spectrum = arrays["spectrum"]
    assert spectrum.shape == (8, 3)
    for i in range(8):
        if i in odd:
            assert np.isnan(spectrum[i]).all()
        else:
            np.testing.assert_array_equal(spectrum[i], np.full(3, float(i)))
