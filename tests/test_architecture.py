"""The package's shape, checked from its source: no import circles, no import from a lower layer upward.

Every `import opd...` / `from opd... import` statement counts, at module top or inside a function (a lazy
import is still a dependency a reader has to follow).
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import opd

PACKAGE = Path(opd.__file__).parent
# Spine and step stages: only the entry points and the lab/benchmarks (which drive whole runs) use them.
SPINE = ("opd.cli", "opd.assemble", "opd.train", "opd.collect", "opd.teachers", "opd.checks")
# Layers below the spine: none of them may import it.
LOWER = ("opd.runtime", "opd.rollout", "opd.grading", "opd.objectives", "opd.evaluate", "opd.types",
         "opd.config", "opd.scoring", "opd.packing", "opd.functional", "opd.aggregate", "opd.metrics", "opd.data",
         "opd.report")


def module_name(path: Path) -> str:
    parts = ("opd", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The opd modules `path` imports (a `from package import name` of a submodule counts as that module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("opd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opd") and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(paths)
    graph = {name: imported_modules(path, known) - {name} for name, path in paths.items()}
    # A package's __init__ importing its own submodules (a registry filling itself) is not a dependency
    # of those submodules on the package.
    return {name: {m for m in targets if not m.startswith(name + ".")} for name, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_no_lower_layer_imports_the_spine():
    upward = [(name, target) for name, targets in import_graph().items() for target in targets
              if name.startswith(LOWER) and target.startswith(SPINE)]
    assert upward == []


def test_the_checks_can_fail():
    """The two checks above on made-up graphs: a circle is found, an upward import is seen."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "opd.rollout.hf".startswith(LOWER) and "opd.train".startswith(SPINE)


def test_nothing_in_the_repository_points_outside_the_clone():
    """The docs and comments cite docs/algorithms.md, never the development folder beside the clone, which
    a user's clone does not have."""
    forbidden = ("../" + "shared", "ALGORITHMS" + ".md")  # spelled apart so that this file does not match
    root = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    offenders = []
    for name in tracked.split():
        path = root / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg"} and path.name != "Makefile":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(text in line for text in forbidden):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert (root / "docs" / "algorithms.md").is_file()
