"""The library's layout, read from its code (issue 26): rooms named for what they hold,
no import circle, no import that runs back up, and no unit too large to read.

Rooms, lower first; a module imports only from its own room or from lower ones:
top level (classes, errors, terminology) < imaging < engine < analysis < simulation
< training < commands < slicer; ``__main__`` may import anything. Imports inside
functions and under ``TYPE_CHECKING`` count too: they are arrows all the same.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from conftest import REPO

LIB = REPO / "ILDSegmentationLib"
ROOMS = ("", "imaging", "engine", "analysis", "simulation", "training", "commands", "slicer")
TOP_LEVEL = {"__init__", "__main__", "classes", "errors", "terminology"}
MAX_FILE, MAX_CLASS, MAX_FUNCTION = 800, 400, 150


def _name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_name(p): p for p in sorted(LIB.rglob("*.py"))}


def _imports(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Module -> the library modules it imports (``from . import x`` names module x)."""
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _room(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in TOP_LEVEL - {"__main__"}):
        return 0
    if parts[1] == "__main__":
        return len(ROOMS)
    return ROOMS.index(parts[1])


def _circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_lives_in_a_room_and_the_top_level_stays_small():
    modules = _modules()
    top = {p.stem for p in LIB.glob("*.py")}
    assert top == TOP_LEVEL, f"modules at the top level besides {sorted(TOP_LEVEL)}: {sorted(top - TOP_LEVEL)}"
    rooms = {p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms == set(ROOMS) - {""}, f"subpackages not in the room order: {sorted(rooms ^ (set(ROOMS) - {''}))}"
    assert all(_room(m) >= 0 for m in modules)


def test_no_import_circle():
    assert _circles(_imports(_modules())) == []


def test_no_import_runs_back_up():
    graph = _imports(_modules())
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if m != "ILDSegmentationLib" and _room(t) > _room(m))
    assert upward == [], "imports from a higher room (order: " + " < ".join(r or "top" for r in ROOMS) + ")"


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The two checks above can fail: on a made-up graph they find what is wrong."""
    graph = {"ILDSegmentationLib.imaging.io": {"ILDSegmentationLib.imaging.segfile"},
             "ILDSegmentationLib.imaging.segfile": {"ILDSegmentationLib.imaging.io"},
             "ILDSegmentationLib.analysis.suitability": {"ILDSegmentationLib.simulation.simulate"},
             "ILDSegmentationLib.simulation.simulate": set()}
    assert _circles(graph) == [["ILDSegmentationLib.imaging.io", "ILDSegmentationLib.imaging.segfile"]]
    assert _room("ILDSegmentationLib.simulation.simulate") > _room("ILDSegmentationLib.analysis.suitability")


def _sizes() -> List[Tuple[str, str, int]]:
    rows = []
    for path in sorted(LIB.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = str(path.relative_to(REPO))
        rows.append(("file", where, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                rows.append(("class", f"{where}:{node.name}", node.end_lineno - node.lineno + 1))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append(("function", f"{where}:{node.name}", node.end_lineno - node.lineno + 1))
    return rows


def test_no_file_class_or_function_too_large_to_read():
    """At most 800 lines a file, 400 a class, 150 a function (the Slicer module file,
    ILDSegmentation/ILDSegmentation.py, kept whole by Slicer's conventions, is not part
    of the library)."""
    limits = {"file": MAX_FILE, "class": MAX_CLASS, "function": MAX_FUNCTION}
    over = [f"{where}: {n} lines ({kind}, limit {limits[kind]})" for kind, where, n in _sizes() if n > limits[kind]]
    assert over == []
