"""Scan metadata (services/scan.py, services/schemas/scan.json): valid documents
of every geometry, refused documents naming their path. Where indices land in
the map is tested in test_placement.py."""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any, Callable

import numpy as np
import pytest

from services.scan import ScanError, axis_values, parse_scan, safe_relative
from support.documents import axis, minimal, raster


def example() -> dict[str, Any]:
    """The realistic P06-like XRF+XRD raster shipped beside the schema."""
    text = resources.files("services").joinpath("schemas", "scan.example.json").read_text()
    return json.loads(text)


# --------------------------------------------------------------------------- valid documents


def test_realistic_example_validates_and_reads() -> None:
    meta = parse_scan(json.dumps(example()))
    assert meta.scan_id == "p06-11012345-00042" and meta.number == 42
    assert meta.geometry_type == "raster" and meta.snake
    assert meta.map_shape == (51, 101) and meta.points == 51 * 101
    assert meta.axis_names == ("samx", "samy") and meta.axis_units == ("um", "um")
    assert meta.pipelines == ("xrf", "xrd", "counters")
    processor, settings_ = meta.analysis_for("xrd")
    assert processor == "xrd" and settings_["poni"]["wavelength_m"] == pytest.approx(12.398419843 / 17.5 * 1e-10, rel=1e-4)
    assert meta.analysis_for("xrf")[1]["elements"][-1] == "Se"
    fast, slow = axis_values(meta)
    assert fast.shape == (101,) and slow.shape == (51,)
    assert fast[0] == -10 and fast[-1] == 10 and fast[1] == pytest.approx(-9.8)
    assert json.loads(meta.to_json()) == example()


@pytest.mark.parametrize(
    "geometry, shape, names",
    [
        ({"type": "raster", "axes": [axis("samx", 4, -1, 1), axis("samy", 3, 5, 2)]}, (3, 4), ("samx", "samy")),
        ({"type": "line", "axes": [axis("energy", 7, 17.0, 17.6, "keV")]}, (7,), ("energy",)),
        ({"type": "points", "points": 1000}, (1000,), ()),
        ({"type": "points", "points": 3, "axes": [{"name": "samx", "units": "um", "positions": [0, 1.5, -2]},
                                                   {"name": "samy", "units": "um"}]}, (3,), ("samx", "samy")),
    ],
)
def test_every_geometry_round_trips(geometry: dict, shape: tuple, names: tuple) -> None:
    doc = minimal(geometry)
    meta = parse_scan(json.dumps(doc))
    assert meta.raw == doc
    assert parse_scan(meta.to_json()).raw == doc
    assert parse_scan(doc).raw == doc
    assert meta.map_shape == shape and meta.points == int(np.prod(shape)) and meta.axis_names == names
    assert meta.snake is False


def test_axis_values_per_geometry() -> None:
    line = parse_scan(minimal({"type": "line", "axes": [axis("energy", 7, 17.0, 17.6, "keV")]}))
    (energy,) = axis_values(line)
    np.testing.assert_allclose(energy, np.linspace(17.0, 17.6, 7))
    pts = parse_scan(minimal({"type": "points", "points": 3, "axes": [
        {"name": "samx", "units": "um", "positions": [0, 1.5, -2]}, {"name": "samy", "units": "um"}]}))
    samx, samy = axis_values(pts)
    np.testing.assert_array_equal(samx, [0, 1.5, -2])
    assert samy is None
    assert axis_values(parse_scan(minimal({"type": "points", "points": 5}))) == ()
    down = raster(3, 2)
    np.testing.assert_array_equal(axis_values(down)[0], [0, 0.5, 1])


def test_parse_copies_the_callers_dict() -> None:
    doc = minimal({"type": "points", "points": 5})
    meta = parse_scan(doc)
    doc["scan"]["id"] = "changed"
    assert meta.scan_id == "scan-1"


def test_analysis_for_unknown_pipeline() -> None:
    meta = parse_scan(example())
    with pytest.raises(ScanError, match="scan p06-11012345-00042 has no analysis settings for pipeline dpc"):
        meta.analysis_for("dpc")
    assert parse_scan(minimal({"type": "points", "points": 1})).analysis_for("counters") == ("counters", {})


def test_absolute_processed_path_needs_permission() -> None:
    doc = example()
    doc["beamtime"]["paths"]["processed"] = "/asap3/petra3/gpfs/p06/2025/data/11012345/processed"
    with pytest.raises(ScanError, match="at beamtime/paths/processed: .*absolute"):
        parse_scan(doc)
    assert parse_scan(doc, allow_absolute=True).raw["beamtime"]["paths"]["processed"].startswith("/asap3")
    doc["beamtime"]["paths"]["processed"] = "/asap3/../etc"
    with pytest.raises(ScanError, match=r"at beamtime/paths/processed: .*'\.\.'"):
        parse_scan(doc, allow_absolute=True)


def test_safe_relative() -> None:
    assert safe_relative("processed//scan_1/./xrf") == "processed/scan_1/xrf"
    assert safe_relative("a..b/c") == "a..b/c"
    for bad in ["", ".", "/abs", "../up", "a/../../b", "a/..", "a\0b"]:
        with pytest.raises(ScanError):
            safe_relative(bad)


# --------------------------------------------------------------------------- refused documents


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, last = path.split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


_DELETE = object()
_G = "scan/geometry"

INVALID = [
    # (mutation, text expected in the message: the path)
    (_set("schema_version", 2), "at schema_version:"),
    (_set("beamtime", _DELETE), "at (top level): 'beamtime' is a required"),
    (_set("beamtime/id", 11012345), "at beamtime/id:"),
    (_set("beamtime/beamline", "P 06"), "at beamtime/beamline:"),
    (_set("beamtime/paths/processed", _DELETE), "at beamtime/paths:"),
    (_set("beamtime/paths/processed", "../other_beamtime"), "at beamtime/paths/processed:"),
    (_set("beamtime/paths/processed", "processed/../../x"), "at beamtime/paths/processed:"),
    (_set("beamtime/extra", 1), "at beamtime:"),
    (_set("scan/id", "../etc/passwd"), "at scan/id:"),
    (_set("scan/id", "a" * 129), "at scan/id:"),
    (_set("scan/number", -1), "at scan/number:"),
    (_set("scan/number", 1.5), "at scan/number:"),
    (_set("scan/command", ""), "at scan/command:"),
    (_set("scan/start_time", "2025-03-14T09:26:53"), "at scan/start_time:"),
    (_set("scan/start_time", "2025-13-14T09:26:53Z"), "at scan/start_time:"),
    (_set("scan/unknown", True), "at scan:"),
    (_set(f"{_G}/type", "spiral"), f"at {_G}/type:"),
    (_set(f"{_G}/type", _DELETE), f"at {_G}:"),
    (_set(f"{_G}/axes/1", _DELETE), f"at {_G}/axes:"),
    (_set(f"{_G}/axes", [axis("a", 2), axis("b", 2), axis("c", 2)]), f"at {_G}/axes:"),
    (_set(f"{_G}/axes/0/points", 0), f"at {_G}/axes/0/points:"),
    (_set(f"{_G}/axes/1/units", _DELETE), f"at {_G}/axes/1:"),
    (_set(f"{_G}/axes/0/start", float("nan")), f"at {_G}/axes/0/start:"),
    (_set(f"{_G}/axes/1/name", "samx"), f"at {_G}/axes:"),
    (_set(f"{_G}/snake", "yes"), f"at {_G}/snake:"),
    (_set(f"{_G}/shape", [51, 101]), f"at {_G}:"),
    (_set(_G, {"type": "line", "axes": [axis("a", 2), axis("b", 2)]}), f"at {_G}/axes:"),
    (_set(_G, {"type": "line", "axes": []}), f"at {_G}/axes:"),
    (_set(_G, {"type": "points", "points": 0}), f"at {_G}/points:"),
    (_set(_G, {"type": "points"}), f"at {_G}:"),
    (_set(_G, {"type": "points", "points": 2, "axes": [{"name": "x", "units": "", "positions": [1]}]}),
     f"at {_G}/axes/0/positions:"),
    (_set(_G, {"type": "raster", "axes": [axis("a", 2**27), axis("b", 2**27)]}), f"at {_G}:"),
    (_set("sample/name", _DELETE), "at sample:"),
    (_set("acquisition/energy_keV", 0), "at acquisition/energy_keV:"),
    (_set("acquisition/detectors", _DELETE), "at acquisition:"),
    (_set("acquisition/detectors/eiger", 5), "at acquisition/detectors/eiger:"),
    (_set("devices", []), "at devices:"),
    (_set("analysis", {}), "at analysis:"),
    (_set("analysis/XRF", {"processor": "xrf"}), "at analysis:"),
    (_set("analysis/xrf/processor", _DELETE), "at analysis/xrf:"),
    (_set("analysis/xrf/settings", [1]), "at analysis/xrf/settings:"),
    (_set("analysis/xrf/extra", {}), "at analysis/xrf:"),
    (_set("streams/eiger/arrays/image/dtype", "object"), "at streams/eiger/arrays/image/dtype:"),
    (_set("streams/eiger/arrays/image/dtype", "notatype"), "at streams/eiger/arrays/image/dtype:"),
    (_set("streams/eiger/arrays/image/shape", [-1]), "at streams/eiger/arrays/image/shape/0:"),
    (_set("user", "me"), "at user:"),
    (_set("extra", 1), "at (top level):"),
]


@pytest.mark.parametrize("mutate, where", INVALID)
def test_invalid_documents_are_refused_naming_the_path(mutate: Callable[[dict], None], where: str) -> None:
    doc = example()
    mutate(doc)
    with pytest.raises(ScanError) as info:
        parse_scan(copy.deepcopy(doc))
    assert str(info.value).startswith("invalid scan: ")
    assert where in str(info.value)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", b"\xff"])
def test_not_json_or_not_an_object(text: Any) -> None:
    with pytest.raises(ScanError, match="invalid scan"):
        parse_scan(text)
