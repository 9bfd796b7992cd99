"""The layout's one rule, read from the code: imports only go down the floors, and nothing imports
in a circle, neither between files nor between folders.

Floors (docs/architecture.md):
  0  mllm_tune/core (+ backends/, retrievers/)   shared pieces
  1  mllm_tune (trainers), data_builders, eval   the real pipeline's logic and commands
  2  synthpedes                                  the simulation that stands in for real models/data
  3  bench                                       benchmarks
Floor-1 folders do not import each other; floor-0 folders may import each other without a circle.
Every import statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {
    "mllm_tune/core": 0, "mllm_tune/core/backends": 0, "mllm_tune/core/retrievers": 0,
    "mllm_tune": 1, "data_builders": 1, "eval": 1,
    "synthpedes": 2,
    "bench": 3,
}
REAL_PIPELINE = ("mllm_tune", "data_builders", "eval")


def module_files() -> dict[str, Path]:
    out = {}
    for top in ("mllm_tune", "data_builders", "eval", "synthpedes", "bench"):
        for f in sorted((ROOT / top).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = f
    return out


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> project modules it imports (``from pkg import name`` counts as pkg.name when that
    is a module, else as pkg)."""
    edges: dict[str, set[str]] = {}
    for mod, f in modules.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                names = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in modules:  # import a.b.c of a module a.b -> a.b
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    targets.add(n)
        edges[mod] = targets
    return edges


def folder_of(mod: str, modules: dict[str, Path]) -> str:
    return modules[mod].parent.relative_to(ROOT).as_posix()


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = module_files()
    return modules, import_edges(modules)


def test_every_folder_has_a_floor(graph):
    modules, _ = graph
    assert {folder_of(m, modules) for m in modules} <= set(FLOORS)


def test_imports_only_go_down(graph):
    modules, edges = graph
    upward = []
    for src, targets in edges.items():
        a = folder_of(src, modules)
        for dst in targets:
            b = folder_of(dst, modules)
            if a == b:
                continue
            fa, fb = FLOORS[a], FLOORS[b]
            if fb > fa or (fb == fa and fa != 0):
                upward.append(f"{src} ({a}, floor {fa}) imports {dst} ({b}, floor {fb})")
    assert not upward, "\n".join(upward)


def test_no_import_circles_between_files_or_folders(graph):
    modules, edges = graph
    assert circles(edges) == []
    folders: dict[str, set[str]] = {}
    for src, targets in edges.items():
        a = folder_of(src, modules)
        folders.setdefault(a, set()).update(folder_of(t, modules) for t in targets if folder_of(t, modules) != a)
    assert circles(folders) == []


def test_the_checker_sees_an_arrow_and_a_circle():
    # the rule above must be able to fail: a hand-made graph with one circle and one upward arrow
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    modules = module_files()
    edges = import_edges(modules)
    assert "mllm_tune.core.backends.base" in edges["mllm_tune.core.backends.cache"]
    assert "mllm_tune.core.metrics" in edges["mllm_tune.retriever_train"]


def test_real_pipeline_imports_without_the_simulation():
    """Deleting synthpedes/ leaves every module of the real pipeline importable (a meta-path hook
    makes `synthpedes` unimportable in a fresh interpreter)."""
    mods = [m for m in module_files() if m.split(".")[0] in REAL_PIPELINE and not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        "class Gone:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'synthpedes' or name.startswith('synthpedes.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (deleted for this test)')\n"
        "sys.meta_path.insert(0, Gone())\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "from mllm_tune.core.backends import make_backend\n"
        "try:\n"
        "    make_backend('oracle', dataset_root='x')\n"
        "except Exception as exc:\n"
        "    assert 'synthpedes' in str(exc), exc\n"
        "print('ok', len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
