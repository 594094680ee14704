"""The shipped mesh files: the laptop mesh (deploy/mesh.json) and the
Ansible example for a beamline (deploy/ansible/mesh.example.json) declare
the same services, the example is fit for several hosts, and both set only
properties their device classes declare, never one at its default (the
component's config dataclass states each default once)."""

from __future__ import annotations

import configparser
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import tango
from tango.utils import seqStr_2_obj

from services.ops.mesh import DEFAULT_MESH, MeshSpec

EXAMPLE = Path(DEFAULT_MESH).parent / "ansible" / "mesh.example.json"


def devices(spec: MeshSpec) -> dict[str, set[str]]:
    return {s.name: set(s.devices) for s in spec.servers}


def test_the_example_declares_the_laptop_mesh_on_two_hosts() -> None:
    laptop, example = MeshSpec.load(DEFAULT_MESH), MeshSpec.load(EXAMPLE)
    assert devices(example) == devices(laptop)
    assert {s.name: s.level for s in example.servers} == {s.name: s.level for s in laptop.servers}
    hosts = {s.name: s.host for s in example.servers}
    assert {h for n, h in hosts.items() if n.startswith("PipelineWorker/")} == {"bl-comp01"}
    assert {h for n, h in hosts.items() if not n.startswith("PipelineWorker/")} == {"bl-ctrl"}
    raw = json.loads(EXAMPLE.read_text())
    for cls, instances in raw["servers"].items():
        for instance, classes in instances.items():
            for props in (d.get("properties", {}) for devs in classes.values() for d in devs.values()):
                if "DataHost" in props:  # others connect to it: never loopback on a beamline
                    assert props["DataHost"] == [hosts[f"{cls}/{instance}"]], (cls, instance)
    assert "${TANGOMESH_HOME}" not in EXAMPLE.read_text() and "127.0.0.1" not in EXAMPLE.read_text()


# --------------------------------------------------------------------------- properties against the device classes

ROOT = Path(__file__).resolve().parents[2]
MESH_FILES = [Path(DEFAULT_MESH), EXAMPLE]


def server_classes() -> dict[str, dict[str, type]]:
    """Server name (console script, as setup.cfg declares it) -> the device
    classes that server runs, by Tango class name."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    found: dict[str, dict[str, type]] = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = (part.strip() for part in line.partition("="))
        module, _, attribute = target.partition(":")
        main = getattr(importlib.import_module(module), attribute)
        if hasattr(main, "device_classes"):  # a device server, not the tangomesh CLI
            found[name] = {cls.__name__: cls for cls in main.device_classes}
    return found


def declared(cls: type) -> dict[str, tuple[tango.CmdArgType, Any]]:
    """Property name -> (Tango type, default) as the class declares them (its bases' included)."""
    return {name: (spec[0], spec[2]) for name, spec in cls.TangoClassClass.device_property_list.items()}


def mesh_properties(path: Path) -> list[tuple[str, str, str, str, list[str]]]:
    """(server, class, device, property, value) for every property a mesh file sets."""
    raw = json.loads(path.read_text())
    return [(server, cls, device, prop, value)
            for server, instances in raw["servers"].items()
            for classes in instances.values()
            for cls, devs in classes.items()
            for device, spec in devs.items()
            for prop, value in spec.get("properties", {}).items()]


def test_every_mesh_server_and_class_is_a_tangomesh_device_server() -> None:
    servers = server_classes()
    assert {"TopologyManager", "Sink", "PipelineMaster", "PipelineWorker", "Sorter", "Recorder",
            "NexusWriter", "ImageWriter", "FioWriter"} <= set(servers)
    for path in MESH_FILES:
        for server, instances in json.loads(path.read_text())["servers"].items():
            assert server in servers, (path.name, server)
            for classes in instances.values():
                assert set(classes) <= set(servers[server]), (path.name, server, set(classes))


@pytest.mark.parametrize("path", MESH_FILES, ids=lambda p: p.name)
def test_mesh_files_set_only_declared_properties_and_never_restate_a_default(path: Path) -> None:
    servers = server_classes()
    rows = mesh_properties(path)
    assert rows, "the mesh file sets some properties (Pipeline, DataHost, BeamtimeRoot...)"
    problems = []
    for server, cls, device, prop, value in rows:
        properties = declared(servers[server][cls])
        if prop not in properties:
            problems.append(f"{device} sets {prop}, which {cls} does not declare")
            continue
        tango_type, default = properties[prop]
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), (device, prop, value)
        if seqStr_2_obj(value, tango_type) == default:  # as the device reads it from the database
            problems.append(f"{device} {prop} = {value} restates {cls}'s default {default!r}")
    assert not problems, f"{path.name} (leave defaults out: the config dataclass holds them):\n" + "\n".join(problems)


def test_device_defaults_are_the_config_dataclass_defaults() -> None:
    """Spot checks that the device layer states no default of its own."""
    from pipelines.master import MasterConfig
    from pipelines.worker import WorkerConfig
    from services.recorder import RecorderConfig
    from sink.component import SinkConfig
    from topology_manager.component import TopologyConfig
    from writers.images import ImageSettings
    from writers.nexus import NexusSettings

    servers = server_classes()
    expected = {
        ("PipelineMaster", "MaxQueueBytes"): MasterConfig().max_queue_bytes,
        ("PipelineMaster", "WorkerTimeoutSeconds"): MasterConfig().worker_timeout,
        ("PipelineWorker", "Prefetch"): WorkerConfig().prefetch,
        ("PipelineWorker", "Preload"): list(WorkerConfig().preload),
        ("Sink", "MemoryBudgetBytes"): SinkConfig().budget_bytes,
        ("TopologyManager", "LeaseSeconds"): TopologyConfig().lease_seconds,
        ("Recorder", "MaxRecords"): RecorderConfig().max_records,
        ("NexusWriter", "Compression"): NexusSettings().compression,
        ("ImageWriter", "WidthPixels"): ImageSettings().width,
    }
    for (server, prop), value in expected.items():
        assert declared(servers[server][server])[prop][1] == value, (server, prop)


def test_a_config_property_takes_type_and_default_from_its_field_and_builds_the_config() -> None:
    """config_property / config_from_properties: the property list is the
    config's, so a device names neither a default nor the field again."""
    from dataclasses import dataclass

    import tango

    from services.device import MeshDevice, config_property

    @dataclass(frozen=True)
    class Config:
        points: int = 7
        period: float = 0.5
        names: tuple[str, ...] = ("a",)
        label: str = ""
        extra: object = None

    class Holder:  # what PyTango gives a device: property values by name
        Points = config_property(Config, "points", doc="points")
        Period = config_property(Config, "period", doc="period")
        Names = config_property(Config, "names", doc="names")

        def __init__(self, values: dict) -> None:
            for key in ("Points", "Period", "Names"):
                vars(type(self))[key].name = key
            self._tango_properties = values

    assert vars(Holder)["Points"].dtype == tango.CmdArgType.DevLong64 and vars(Holder)["Points"].default_value == 7
    assert vars(Holder)["Names"].dtype == tango.CmdArgType.DevVarStringArray
    assert vars(Holder)["Names"].default_value == ["a"]
    built = MeshDevice.config_from_properties(Holder({"Points": 3, "Period": 2.0, "Names": ["x", "y"]}), Config,
                                              label="computed")
    assert built == Config(points=3, period=2.0, names=("x", "y"), label="computed")
    with pytest.raises(ValueError, match="not a field of a Tango property type"):
        config_property(Config, "extra", doc="")
    with pytest.raises(ValueError, match="not a field"):
        config_property(Config, "missing", doc="")
