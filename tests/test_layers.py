"""The package's layers: imports point down, never in a cycle (docs/ARCHITECTURE.md).

The walk reads every module under src/dpsynth with `ast`, so imports inside functions
count as much as those at the top; an import inside a function must say why (optional
dependency or start-up time) in a comment.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Module prefix -> package (the longest prefix wins); package -> layer. A module may import
# its own package and anything on a lower layer; same-layer packages only along
# ALLOWED_SIDEWAYS.
PACKAGES: dict[str, str] = {
    "dpsynth.attributes": "core",
    "dpsynth.errors": "core",
    "dpsynth.io": "core",
    "dpsynth.config": "core",
    "dpsynth.orientation": "core",
    "dpsynth.launch": "core",
    "dpsynth.presets": "core",
    "dpsynth.data": "data",
    "dpsynth.models": "models",
    "dpsynth.diffusion": "diffusion",
    "dpsynth.privacy": "privacy",
    "dpsynth.runs": "runs",
    "dpsynth.training": "training",
    "dpsynth.evaluation": "evaluation",
    "dpsynth.report": "report",
    "dpsynth.app": "app",
    "dpsynth.cli": "app",  # compatibility entry point for older installs
    "dpsynth.__main__": "app",
    "dpsynth": "app",  # the package root: `dpsynth.load`, the public face
}
LAYERS: dict[str, int] = {
    "core": 0,
    "data": 1,
    "models": 1,
    "diffusion": 2,
    "privacy": 2,
    "runs": 2,
    "training": 3,
    "evaluation": 3,
    "report": 3,
    "app": 4,
}
# The report presents evaluation results and reads their volume sets; a run loads into a
# diffusion pipeline, and its ledger is read checked against its model.json.
ALLOWED_SIDEWAYS = {("report", "evaluation"), ("runs", "diffusion"), ("runs", "privacy")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _owner(module: str) -> str:
    """The package of the longest PACKAGES key that is `module` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in PACKAGES:
            return PACKAGES[prefix]
    if module == "dpsynth":  # the root is its own entry, never a catch-all for new modules
        return PACKAGES[module]
    raise AssertionError(f"{module}: not in the layer map; add it to PACKAGES")


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported dpsynth module, line, inside a function) for every import in `path`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, child.lineno, in_function))
                # `from dpsynth.x import y` may name a submodule y
                found.extend(
                    (f"{target}.{a.name}", child.lineno, in_function)
                    for a in child.names
                    if _is_module(f"{target}.{a.name}")
                )
            visit(child, inner)

    visit(tree, False)
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


MODULES = sorted(SRC.joinpath("dpsynth").rglob("*.py"))


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {
        _module_name(p): [i for i in _imports(p) if i[0].split(".")[0] == "dpsynth"]
        for p in MODULES
    }


def _violation(src: str, dst: str) -> str | None:
    a, b = _owner(src), _owner(dst)
    if dst == "dpsynth" and src != "dpsynth":  # the public face sits above everything
        return f"{src} imports the package root `dpsynth` (app): imports must point down"
    if a == b:
        return None
    la, lb = LAYERS[a], LAYERS[b]
    if lb < la or (a, b) in ALLOWED_SIDEWAYS:
        return None
    return f"{src} ({a}) imports {dst} ({b}): imports must point down (docs/ARCHITECTURE.md)"


def test_every_module_is_in_the_layer_map():
    for p in MODULES:
        _owner(_module_name(p))
    with pytest.raises(AssertionError, match="not in the layer map"):
        _owner("dpsynth.new_module")  # a new top-level module must be placed explicitly


def test_imports_point_down():
    problems = [
        f"{src}:{line}: {why}"
        for src, imports in _graph().items()
        for dst, line, _ in imports
        if (why := _violation(src, dst))
    ]
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    # Edges between modules, package __init__ files included. An edge from a module to a
    # package above it is left out: Python runs that __init__ before the module anyway.
    nodes = _graph_nodes()
    graph = {
        m: {d for d, _, _ in imps if d in nodes and d != m and not m.startswith(d + ".")}
        for m, imps in _graph().items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _graph_nodes() -> set[str]:
    return {_module_name(p) for p in MODULES}


def _comment_lines(text: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT}


def test_imports_inside_functions_say_why():
    """A function-level import carries a comment on its line or the line(s) just above."""
    problems = []
    for path in MODULES:
        text = path.read_text()
        lines = text.splitlines()
        comments = _comment_lines(text)
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if not isinstance(inner, ast.Import | ast.ImportFrom):
                    continue
                if _explained(inner, lines, comments):
                    continue
                problems.append(f"{path.relative_to(SRC)}:{inner.lineno}: no comment says why")
    assert not problems, "\n".join(sorted(set(problems)))


def _explained(node: ast.stmt, lines: list[str], comments: set[int]) -> bool:
    """A comment on the import's lines, or above it across a block of imports/blank lines."""
    if any(n in comments for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
        return True
    n = node.lineno - 1
    while n >= 1:
        text = lines[n - 1].strip()
        if n in comments and text.startswith("#"):
            return True
        if text and not text.startswith(("import ", "from ", ")")) and not _continues(text):
            return False
        if n in comments:
            return True
        n -= 1
    return False


def _continues(text: str) -> bool:
    """A line inside a parenthesised `from x import (...)` list."""
    return text.endswith(",") and " " not in text.rstrip(",")


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    """The walker itself: a nested import counts and is flagged as inside a function."""
    pkg = SRC / "dpsynth" / "data" / "cache.py"
    found = _imports(pkg)
    assert any(d.startswith("dpsynth.") for d, _, _ in found)
    probe = ast.parse("def f():\n    from dpsynth.cli import main\n")
    assert isinstance(probe.body[0].body[0], ast.ImportFrom)
    assert _violation("dpsynth.data.cache", "dpsynth.cli") is not None
    assert _violation("dpsynth.training.ldm", "dpsynth.data.cache") is None
    assert _violation("dpsynth.evaluation.audit", "dpsynth") is not None
