"""The shipped mesh files: the laptop mesh (deploy/mesh.json) and the
Ansible example for a beamline (deploy/ansible/mesh.example.json) declare
the same services, and the example is fit for several hosts."""

from __future__ import annotations

import json
from pathlib import Path

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
