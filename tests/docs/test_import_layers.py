"""The import structure the architecture promises, read from the source (imports inside functions
included): sync/ imports no other package of ours and has no import circle; nothing below launch/
imports launch/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "data", "trainer", "rollout", "sync", "launch")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours `path` imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def _graph(package: str) -> dict[str, set[str]]:
    modules = {_module(p): p for p in (ROOT / package).rglob("*.py")}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node: str, stack: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in stack:
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(node)

    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    return found


def test_sync_has_no_import_circle_and_imports_no_other_package_of_ours():
    assert _cycles(_graph("sync")) == []
    foreign = {(_module(p), i) for p in (ROOT / "sync").rglob("*.py") for i in _imports(p) if i.split(".")[0] != "sync"}
    assert foreign == set()


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_nothing_below_launch_imports_launch():
    upward = {(_module(p), i) for pkg in PACKAGES if pkg != "launch" for p in (ROOT / pkg).rglob("*.py")
              for i in _imports(p) if i.split(".")[0] == "launch"}
    assert upward == set()
