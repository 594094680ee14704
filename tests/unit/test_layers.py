"""The layering rule of docs/architecture.md, checked on the import graph.

Kit (``services/`` without ``ops`` and ``sim``) at the bottom; the services
(``topology_manager``, ``pipelines``, ``sink``, ``writers``, ``ingesters``) as peers that
import only the kit and themselves; the simulator above the kit; ops on top,
free to import anything. A module imported inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEERS = ("topology_manager", "pipelines", "sink", "writers", "ingesters")
PROJECT = ("services", *PEERS)


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "services":
        if len(parts) > 1 and parts[1] in ("ops", "sim"):
            return f"services.{parts[1]}"
        return "kit"
    return parts[0]


ALLOWED = {
    "kit": {"kit"},
    "services.sim": {"kit", "services.sim"},
    "services.ops": {"kit", "services.sim", "services.ops", *PEERS},
    **{peer: {"kit", peer} for peer in PEERS},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in PROJECT]


def project_modules() -> list[Path]:
    return sorted(p for top in PROJECT for p in (ROOT / top).rglob("*.py"))


def test_the_tree_has_modules_in_every_layer():
    layers = {layer(module_name(p)) for p in project_modules()}
    assert layers == set(ALLOWED), layers


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_upwards_or_across_peers(path):
    own = layer(module_name(path))
    wrong = [f"line {line}: {name} ({layer(name)})" for line, name in imports(path)
             if layer(name) not in ALLOWED[own]]
    assert not wrong, f"{path.relative_to(ROOT)} is in layer {own} and imports " + "; ".join(wrong)


def test_the_rule_sees_a_violation():
    """The check itself: a sink module importing a writer is caught."""
    assert layer("writers.nexus") not in ALLOWED[layer("sink.store")]
    assert layer("services.ops.cli") not in ALLOWED[layer("services.codec")]
    assert layer("sink.queries") in ALLOWED[layer("services.ops.cli")]
