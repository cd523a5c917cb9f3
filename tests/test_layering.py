"""The layering of the code, read from the source with ``ast`` (nothing under test is imported).

The import graph holds every module of ``cxr_search``, ``train`` and ``index`` and ``cli.py``, with module-level
and function-level imports (``importlib.import_module("literal")`` too). ``from pkg import name`` points at
``pkg.name`` when that is a submodule, else at ``pkg``. Rules: the core (``cxr_search``) imports neither ``train``
nor ``index``; ``train`` and ``index`` do not import each other; no package module imports ``cli`` (the only
module that imports all three); and there is no import cycle anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cxr_search", "train", "index")
ENTRY = "cli"
#: (importer's package, imported package) pairs that break the layering.
FORBIDDEN = {("cxr_search", "train"), ("cxr_search", "index"), ("train", "index"), ("index", "train")}

Graph = Dict[str, Set[str]]


# ----------------------------------------------------------------------------------------- the checker
def find_modules(root: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for the packages and the entry module under ``root``."""
    modules: Dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    if (root / f"{ENTRY}.py").is_file():
        modules[ENTRY] = root / f"{ENTRY}.py"
    return modules


def _known(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The longest prefix of ``name`` that is one of ``modules`` (None for third-party and stdlib names)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _imported_names(module: str, path: Path) -> Iterator[Tuple[str, List[str]]]:
    """(imported module, names taken from it) for every import statement anywhere in the file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [alias.name for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, []


def import_graph(root: Path) -> Graph:
    """Module -> the modules of the project it imports (self-imports dropped)."""
    modules = find_modules(root)
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in _imported_names(name, path):
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if len(hits) < len(names) or not names:  # some names are attributes of ``target`` itself
                hits.append(target)
            for hit in hits:
                known = _known(hit, modules)
                if known is not None and known != name:
                    graph[name].add(known)
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def layering_violations(graph: Graph) -> List[str]:
    """``importer -> imported (rule)`` for every import that breaks a rule."""
    out = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            if (_top(src), _top(dst)) in FORBIDDEN:
                out.append(f"{src} -> {dst} ({_top(src)} must not import {_top(dst)})")
            elif dst == ENTRY:
                out.append(f"{src} -> {dst} (only the entry point imports the packages, not the reverse)")
    return out


def import_cycles(graph: Graph) -> List[List[str]]:
    """One cycle (a closed path of modules, first == last) per strongly connected component of the graph."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[Set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graphs are small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_cycle_in(graph, comp) for comp in components)


def _cycle_in(graph: Graph, comp: Set[str]) -> List[str]:
    """A shortest closed path through the component's first module (breadth-first, inside the component)."""
    start = min(comp)
    parent: Dict[str, Optional[str]] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")  # a component always has one


# --------------------------------------------------------------------------------------- the real tree
@pytest.fixture(scope="module")
def graph() -> Graph:
    """The import graph of this checkout (parsed once for the module)."""
    return import_graph(ROOT)


def test_every_package_is_read(graph: Graph) -> None:
    assert {_top(m) for m in graph} == {*PACKAGES, ENTRY}
    assert {"cxr_search", "cxr_search.model", "cxr_search.dicom.read", "train.trainer", "index.build",
            "index.ann.vector_index"} <= graph.keys()


def test_layering_rules_hold(graph: Graph) -> None:
    violations = layering_violations(graph)
    assert not violations, "imports that break the layering:\n" + "\n".join(violations)


def test_only_cli_imports_all_three_packages(graph: Graph) -> None:
    assert {_top(dst) for dst in graph[ENTRY]} >= set(PACKAGES)
    for src, dsts in graph.items():
        if src != ENTRY:
            assert not set(PACKAGES) <= {_top(d) for d in dsts}, src


def test_there_is_no_import_cycle(graph: Graph) -> None:
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# ---------------------------------------------------------------------------------- the checker itself
def _write(root: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def test_checker_catches_a_cycle_and_layering_violations(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        # A package __init__ that imports a submodule which imports the package back, in a function.
        "cxr_search/__init__.py": "from cxr_search.core import helper\nVERSION = 1\n",
        "cxr_search/core.py": "def helper():\n    from cxr_search import VERSION\n    return VERSION\n",
        # Relative imports and `from pkg import submodule` resolve to the submodule: no cycle here.
        "cxr_search/sub/__init__.py": "from .leaf import x\n",
        "cxr_search/sub/leaf.py": "import os\nx = 1\n",
        "cxr_search/sub/user.py": "from cxr_search.sub import leaf\nfrom . import leaf as again\n",
        # Layering: core -> train (function level), train -> index, index -> cli (via importlib).
        "cxr_search/bad.py": "def f():\n    import train.loop\n",
        "train/__init__.py": "",
        "train/loop.py": "from index import store\n",
        "index/__init__.py": "",
        "index/store.py": "import importlib\nCLI = importlib.import_module('cli')\n",
        "cli.py": "import cxr_search\nimport index.store\nfrom train import loop\n",
    })
    graph = import_graph(root)
    assert graph["cxr_search.sub.user"] == {"cxr_search.sub.leaf"}
    assert graph["cxr_search.sub"] == {"cxr_search.sub.leaf"}
    assert graph["cli"] == {"cxr_search", "index.store", "train.loop"}
    # The package <-> submodule cycle, and index -> cli closing a loop with cli -> index.
    assert import_cycles(graph) == [["cli", "index.store", "cli"], ["cxr_search", "cxr_search.core", "cxr_search"]]
    assert layering_violations(graph) == [
        "cxr_search.bad -> train.loop (cxr_search must not import train)",
        "index.store -> cli (only the entry point imports the packages, not the reverse)",
        "train.loop -> index.store (train must not import index)",
    ]
    # Fixing the cycle the way the real tree does: import the name from the module that defines it.
    _write(root, {"cxr_search/version.py": "VERSION = 1\n",
                  "cxr_search/__init__.py": "from cxr_search.core import helper\nfrom cxr_search.version import VERSION\n",
                  "cxr_search/core.py": "def helper():\n    from cxr_search.version import VERSION\n    return VERSION\n"})
    assert import_cycles(import_graph(root)) == [["cli", "index.store", "cli"]]


def test_longer_cycles_are_reported_with_their_modules(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "index/__init__.py": "", "index/a.py": "from index.b import f\n", "index/b.py": "from index import c\nf = 1\n",
        "index/c.py": "import index.a\n", "train/__init__.py": "", "train/x.py": "import train.y\n",
        "train/y.py": "from train import x\n",
    })
    assert import_cycles(import_graph(root)) == [["index.a", "index.b", "index.c", "index.a"],
                                                 ["train.x", "train.y", "train.x"]]
