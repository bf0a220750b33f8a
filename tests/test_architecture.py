"""The engine's rooms depend on each other one way (docs/architecture.md): every import between two rooms,
function-local ones included (they hide circles, not remove them), goes from a later room to an earlier one,
and no two modules import each other through any chain. Imports under ``if TYPE_CHECKING:`` are for type
hints only and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "worker" / "hipp"
# Earlier rooms never import later ones.
ROOMS = ["errors", "registry", "progress", "preference", "models", "data", "sensitivity", "pruning", "checkpoint",
         "evaluation", "plots", "policy", "recovery", "testbed", "calibration_source", "job"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ENGINE.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = resolve(f"{node.module}.{alias.name}") or resolve(node.module)
                if target:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found |= {t for alias in node.names if (t := resolve(alias.name))}
    return found - {module_name(path) if path.is_relative_to(ENGINE) else path.stem}


def room(module: str) -> str:
    return module.split(".")[2] if module.count(".") >= 2 else module


def import_graph() -> dict[str, set[str]]:
    modules = engine_modules()
    return {m: imports_of(p, modules) for m, p in modules.items()}


def test_every_module_is_in_a_room() -> None:
    assert {room(m) for m in engine_modules()} - {"worker.hipp"} <= set(ROOMS)


def test_rooms_import_only_earlier_rooms() -> None:
    backwards = sorted(
        f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
        if room(m) in ROOMS and room(t) in ROOMS and ROOMS.index(room(t)) > ROOMS.index(room(m))
    )
    assert backwards == []


def test_no_import_circles() -> None:
    graph = import_graph()
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert circles == []


def test_the_checker_sees_function_local_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from worker.hipp.errors import HippError\n")
    assert imports_of(module, engine_modules()) == {"worker.hipp.errors"}
