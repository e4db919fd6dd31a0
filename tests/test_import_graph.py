"""The operator's modules import one another without a cycle (a cycle is a design smell and an
import-order trap): the graph is read from the source, `if TYPE_CHECKING:` imports included."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import libvirt_operator

pytestmark = pytest.mark.unit

PACKAGE = Path(libvirt_operator.__file__).parent


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module name the file imports, and each name a `from` import takes from a module."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    return imported


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports."""
    modules = {module_name(path, package): path for path in package.rglob("*.py")}
    return {name: {target for target in imports(path) if target in modules and target != name}
            for name, path in modules.items()}


def test_the_operator_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "libvirt_operator.agent" in graph and "libvirt_operator.metrics" in graph
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_a_cycle_is_found(tmp_path: Path) -> None:
    package = tmp_path / "libvirt_operator"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from libvirt_operator import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from libvirt_operator.a import A\n")
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(import_graph(package)).static_order())


def test_only_the_kopf_wiring_imports_kopf() -> None:
    importers = {module_name(path, PACKAGE) for path in PACKAGE.rglob("*.py")
                 if any(name.split(".")[0] == "kopf" for name in imports(path))}
    assert importers <= {"libvirt_operator.handlers", "libvirt_operator.cli"}
