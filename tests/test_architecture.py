"""The floor plan holds (docs/architecture.md): the layers contract, no import cycle, nora modules imported at the
top of a file (a function-local one only for an optional dependency, commented), and the picture drawn from today's
code."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _cycles(adjacency: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in adjacency:
        if start in index:
            continue
        work = [(start, iter(sorted(adjacency[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(adjacency[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_counting_function_local_imports():
    graph = grimp.build_graph("nora")  # grimp reads every import statement, inside functions too
    adjacency = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(adjacency) == []


def function_local_nora_imports() -> list[tuple[str, int, str]]:
    """(file, line, text) of every import of a nora module inside a function, with its line's comment."""
    found = []
    for path in sorted((ROOT / "nora").rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                if any(n == "nora" or n.startswith("nora.") for n in names):
                    found.append((str(path.relative_to(ROOT)), node.lineno, lines[node.lineno - 1].strip()))
    return found


def test_function_local_nora_imports_are_few_and_say_why():
    local = function_local_nora_imports()
    assert len(local) <= 25, local
    assert all("#" in text for _, _, text in local), [x for x in local if "#" not in x[2]]


def test_layers_contract_is_kept():
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_architecture_picture_is_drawn_from_todays_code():
    spec = importlib.util.spec_from_file_location("architecture_graph", ROOT / "scripts" / "architecture_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = module.dot_source()
    assert '[color="#cc0000"' not in source  # no arrow runs back up
    assert (ROOT / "docs" / "architecture.dot").read_text() == source, (
        "docs/architecture.dot is stale: run python scripts/architecture_graph.py"
    )
