"""The control-system adapters share one mapping onto the scan document: a
Bluesky ``grid_scan`` (real RunEngine documents) and the same grid as a
Sardana ``mesh`` give the same geometry, and both documents validate against
the one scan schema. Also the Sardana side's own rules (its settings from the
environment, records into blocks, the abort reason) and the AbortScan argument."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import grid_scan, scan
from ophyd.sim import det4, motor, motor1, motor2

from services import scan_document, schema
from services.ops import bluesky_feed
from services.ops.sardana import mapping
from services.ops.sardana.mapping import Column, MeshSettings, SardanaMappingError, SardanaScan
from services.scan import parse_scan
from services.scan_control import abort_argument, parse_abort
from services.scan_document import GRID, LINE, POINTS, Scanned, motion_geometry

ANALYSIS = {"p1": {"processor": "counters", "settings": {"counters": ["det4"]}}}
BEAMTIME = {"id": "11020001", "beamline": "P06", "paths": {"raw": "raw", "processed": "processed"}}


def run_documents(plan, **md) -> tuple[dict, dict]:
    """The start and primary descriptor documents of a real RunEngine run (no mesh)."""
    docs: dict[str, dict] = {}
    RE = RunEngine({})
    RE.subscribe(lambda name, doc: docs.setdefault(name, doc) if name in ("start", "descriptor") else None)
    RE(plan, **md)
    return docs["start"], docs["descriptor"]


def sardana_mesh(fast: Scanned, slow: Scanned, snake: bool) -> SardanaScan:
    """What the recorder's describe() reads from ``mesh fast ... slow ... 0.1 snake``."""
    return SardanaScan(
        serial=42, command=f"mesh {fast.name} {fast.start} {fast.stop} {fast.points - 1} {slow.name} {slow.start} "
                           f"{slow.stop} {slow.points - 1} 0.1 {snake}",
        macro="mesh", macro_id="a1b2c3d4", started=1764806400.0, pattern=GRID, points=fast.points * slow.points,
        scanned=[fast, slow], snake=snake, moving=[fast.name, slow.name],
        columns=[Column(fast.name, fast.name, "<f8"), Column(slow.name, slow.name, "<f8"),
                 Column("tango://h:1/expchan/ctctrl01/1/value", "det4", "<f8"),
                 Column("timestamp", "timestamp", "<f8")],
        measurement_group="mntgrp01", channels={"det4": {"name": "tango://h:1/expchan/ctctrl01/1/value"}},
        integration_time=0.1, snapshot={"mot03": 1.25}, sample={"name": "cell7"})


def test_a_bluesky_grid_scan_and_a_sardana_mesh_of_the_same_grid_map_alike_and_validate() -> None:
    start, descriptor = run_documents(grid_scan([det4], motor1, -1, 1, 5, motor2, -2, 2, 7, snake_axes=True),
                                      sample="cell7")
    bluesky = bluesky_feed.bluesky_document(start, descriptor, {"primary": {"det4": "<f8"}}, ANALYSIS, BEAMTIME)
    # Bluesky lists the slow motor (motor1) first, Sardana's mesh the fast one (motor2)
    sardana = mapping.document(sardana_mesh(Scanned("motor2", -2, 2, 7), Scanned("motor1", -1, 1, 5), True),
                               MeshSettings(ANALYSIS, BEAMTIME))
    for doc in (bluesky, sardana):
        schema.validate("scan", doc)  # the one schema, as the masters apply it
        assert parse_scan(json.dumps(doc)).map_shape == (5, 7)
    assert bluesky["scan"]["geometry"] == sardana["scan"]["geometry"]
    assert bluesky["sample"] == sardana["sample"] == {"name": "cell7"}
    assert bluesky["beamtime"] == sardana["beamtime"] == BEAMTIME
    assert sardana["scan"]["number"] == 42 and sardana["devices"] == {"mot03": 1.25}
    assert sardana["acquisition"]["dwell_s"] == 0.1 and sardana["acquisition"]["measurement_group"] == "mntgrp01"
    assert set(sardana["streams"]["sardana"]["arrays"]) == {"motor1", "motor2", "det4", "timestamp"}


def test_one_copy_of_the_mapping_serves_both_adapters() -> None:
    for name in ("motion_geometry", "sample_part", "beamtime_part", "json_safe", "wire_dtype", "scan_document"):
        shared = getattr(scan_document, name)
        assert getattr(bluesky_feed, name) is shared and getattr(mapping, name, shared) is shared, name
    assert "motion_geometry" in mapping.document.__code__.co_names
    assert "motion_geometry" in bluesky_feed.bluesky_geometry.__code__.co_names


def test_a_one_motor_scan_is_a_line_for_both() -> None:
    start, descriptor = run_documents(scan([det4], motor, 0, 2, 10))
    bluesky = bluesky_feed.bluesky_document(start, descriptor, {"primary": {"det4": "<f8"}}, ANALYSIS, BEAMTIME)
    ascan = SardanaScan(serial=1, command="ascan motor 0 2 9 0.1", macro="ascan", macro_id="x", started=0.0,
                        pattern=LINE, points=10, scanned=[Scanned("motor", 0, 2, 10)], moving=["motor"],
                        columns=[Column("motor", "motor", "<f8")])
    sardana = mapping.document(ascan, MeshSettings(ANALYSIS, BEAMTIME))
    assert bluesky["scan"]["geometry"] == sardana["scan"]["geometry"] == {
        "type": "line", "axes": [{"name": "motor", "units": "", "start": 0.0, "stop": 2.0, "points": 10}]}


def test_motion_geometry_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="are not the scan's 30 points"):
        motion_geometry(GRID, 30, [Scanned("a", 0, 1, 5), Scanned("b", 0, 1, 7)])
    with pytest.raises(ValueError, match="not known at scan start"):
        motion_geometry(POINTS, 0)
    assert motion_geometry(POINTS, 4, moving=[{"name": "a"}, {"name": "b"}]) == {
        "type": "points", "points": 4, "axes": [{"name": "a", "units": ""}, {"name": "b", "units": ""}]}


def test_shared_parts_follow_one_rule() -> None:
    assert scan_document.sample_part("cell7") == {"name": "cell7"}
    assert scan_document.sample_part({"name": "cell7", "temperature_K": np.float64(300)}) == \
        {"name": "cell7", "temperature_K": 300.0}
    assert scan_document.sample_part({}) == scan_document.sample_part(None) == {"name": "unknown"}
    assert scan_document.beamtime_part(BEAMTIME, id=11029999, proposal="")["id"] == "11029999"
    assert [scan_document.wire_dtype(k) for k in ("number", "float64", "int32", "bool", "string", "str", None)] == \
        ["<f8", "<f8", "<i4", "|b1", None, None, None]


def test_the_sardana_settings_come_from_the_environment_and_are_checked() -> None:
    settings = MeshSettings.from_env({mapping.ENV_ANALYSIS: ANALYSIS})
    assert settings.pipelines == ["p1"] and settings.stream == "sardana" and settings.beamtime["id"] == "sardana"
    with pytest.raises(SardanaMappingError, match="TangoMeshAnalysis is not set: senv TangoMeshAnalysis"):
        MeshSettings.from_env({})
    with pytest.raises(SardanaMappingError, match=r"TangoMeshAnalysis\['p1'\] must be a dict with a 'processor'"):
        MeshSettings.from_env({mapping.ENV_ANALYSIS: {"p1": "counters"}})
    with pytest.raises(SardanaMappingError, match="TangoMeshStream 'Bad Name'"):
        MeshSettings.from_env({mapping.ENV_ANALYSIS: ANALYSIS, mapping.ENV_STREAM: "Bad Name"})
    bad_beamtime = MeshSettings(ANALYSIS, {"id": "x y", "beamline": "P06", "paths": {"raw": "r", "processed": "p"}})
    with pytest.raises(ValueError, match="beamtime/id"):
        mapping.document(sardana_mesh(Scanned("a", 0, 1, 2), Scanned("b", 0, 1, 2), False), bad_beamtime)


def test_a_record_becomes_one_point_and_a_missing_value_its_fill() -> None:
    columns = [Column("mot01", "mot01", "<f8"), Column("tango://h:1/expchan/c/1/value", "ct01", "<i4"),
               Column("tango://h:1/expchan/s/1/value", "spectrum", "<f4", (3,))]
    problems: list[str] = []
    arrays = mapping.point_arrays(columns, {"point_nb": 7, "mot01": 0.5, "tango://h:1/expchan/c/1/value": None,
                                            "tango://h:1/expchan/s/1/value": [1, 2]}, problems.append)
    assert arrays["mot01"].tolist() == [0.5] and arrays["mot01"].dtype == np.dtype("<f8")
    assert arrays["ct01"].tolist() == [0] and arrays["ct01"].dtype == np.dtype("<i4")
    assert arrays["spectrum"].shape == (1, 3) and np.isnan(arrays["spectrum"]).all()
    assert problems == ["ct01: no value", "spectrum: shape (2,), described as (3,)"]
    assert mapping.end_reason("Stop", "ascan m 0 1 9 0.1", 3, 10) == \
        "Sardana macro 'ascan m 0 1 9 0.1' stopped after 3 of 10 points"


def test_the_abort_argument_carries_the_reason_or_is_the_bare_scan_id() -> None:
    assert abort_argument("s-1") == "s-1" and parse_abort("s-1") == ("s-1", "")
    text = abort_argument("s-1", "macro\nstopped  by the user")
    assert parse_abort(text) == ("s-1", "macro stopped by the user")
    for bad, why in (("", "empty"), ('{"scan": "s-1", "why": "x"}', "Additional properties"),
                     ('{"reason": "x"}', "'scan' is a required property"), ("{not json", "not JSON")):
        with pytest.raises(schema.SchemaError, match=why):
            parse_abort(bad)


def test_a_pipeline_missing_a_stage_is_named_before_anything_starts() -> None:
    from services.ops.sardana.feed import MeshLink, status_lines
    from topology_manager.component import Registry
    from topology_manager.local import LocalManagerLink

    link = LocalManagerLink(Registry(10.0, 2.0))
    for name, kind, pipeline in (("t/p1/master", "master", "p1"), ("t/p1/sorter", "sorter", "p1"),
                                 ("t/p1-worker/1", "worker", "p1"), ("t/p2/master", "master", "p2"),
                                 ("t/sink/1", "sink", "")):
        link.register({"name": name, "kind": kind, "host": "h", "pid": 1,
                       **({"pipeline": pipeline} if pipeline else {})})
    mesh = MeshLink("t/topology/manager", "127.0.0.1", "sardana", link=link)
    mesh.check_up(["p1"])  # complete: no complaint
    with pytest.raises(RuntimeError, match=r"the scan cannot start: pipeline p2 is down "
                                           r"\(no sorter, no worker registered\); "
                                           r"pipeline p3 is down \(no master, no sorter, no worker registered\)"):
        mesh.check_up(["p1", "p2", "p3"])
    lines = status_lines(link, read_master=lambda name: {"open_scans": [{"scan": "s-1", "points": 20,
                                                                         "streams": ["sardana"]}]})
    assert lines[0] == "pipeline p1: up; master t/p1/master; sorter t/p1/sorter; 1 worker(s); 0 source(s)"
    assert lines[1] == "  master t/p1/master: 1 open scan(s)\n    s-1: 20 points, streams sardana"
    assert lines[2].startswith("pipeline p2: DOWN; master t/p2/master; sorter none; 0 worker(s)")
    assert lines[-1] == "services of every pipeline: t/sink/1 (sink)"
