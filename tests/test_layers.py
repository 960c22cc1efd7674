"""Import layering: every project module's imports (module and function level, parsed with ``ast``) go down the floors.

Floors, bottom first (a package may import its own floor's earlier entries and anything below):

    merging → datamodules → modeling         the bottom, in this order (modeling.pretrain trains on datamodules'
                                             renders; datamodules reads a model's preprocessing from its config file)
    attacks                                  poisoning + vector attacks; imported by lightning_modules.injection
    lightning_modules
    evaluation
    defenses, callbacks
    experiments                              the engine and the shared CLI helper
    entry scripts: train, merge, pipeline, sweep, bv; nothing imports them

tests/, scripts/ and benchmarks/ are tools and may import anything.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS: list[tuple[str, ...]] = [
    ("merging",), ("datamodules",), ("modeling",), ("attacks",), ("lightning_modules",), ("evaluation",),
    ("defenses", "callbacks"), ("experiments",),
]
ENTRY_SCRIPTS = ("train", "merge", "pipeline", "sweep", "bv")
TOOLS = ("tests", "scripts", "benchmarks")  # not library code; may import anything
TOP = len(FLOORS)  # the entry floor
FLOOR_OF = {pkg: i for i, floor in enumerate(FLOORS) for pkg in floor}


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``source``: ``import``, ``from`` (relative ones resolved
    against ``module``; ``from p import n`` also yields ``p.n``, which may be a module), and
    ``importlib.import_module`` / ``__import__`` of a string constant — at any depth (functions, ``if`` blocks)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = ".".join(p for p in (base, node.module) if p)
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.args[0].value, node.lineno))
    return found


def project_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package __init__) of every library module and entry script."""
    modules = {}
    for path in sorted(ROOT.glob("*.py")):
        modules[path.stem] = (path, False)
    for top in sorted(p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if top.name in TOOLS or not any(top.rglob("*.py")) or top.name.endswith(".egg-info"):
            continue
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            is_package = rel.name == "__init__"
            parts = rel.parts[:-1] if is_package else rel.parts
            modules[".".join(parts)] = (path, is_package)
    return modules


def unit_of(module: str) -> str | None:
    """What a dotted name belongs to: an entry script or a package (its name), or None (not the project's)."""
    top = module.split(".")[0]
    if top in ENTRY_SCRIPTS or top in FLOOR_OF:
        return top
    return None


def floor(unit: str) -> int:
    return TOP if unit in ENTRY_SCRIPTS else FLOOR_OF[unit]


def edges() -> list[tuple[str, str, str, str]]:
    """(importer unit, imported unit, "file:line", imported name) for every import between project units,
    once per line and imported unit (``from p import a, b`` is one edge)."""
    found, seen = [], set()
    for module, (path, is_package) in project_modules().items():
        importer = unit_of(module)
        if importer is None:
            continue
        for name, line in imports_of(path.read_text(encoding="utf-8"), module, is_package):
            imported = unit_of(name)
            where = f"{path.relative_to(ROOT)}:{line}"
            if imported is not None and imported != importer and (where, imported) not in seen:
                seen.add((where, imported))
                found.append((importer, imported, where, name))
    return found


def test_the_import_parser_sees_function_level_relative_and_dynamic_imports():
    source = ("import os\nfrom .io import load\nfrom . import engine\n"
              "def f():\n    from evaluation.evaluate import x\n    import train\n"
              "    importlib.import_module('bv')\n")
    names = [name for name, _ in imports_of(source, "merging.methods")]
    assert {"os", "merging.io", "merging.engine", "evaluation.evaluate", "train", "bv"} <= set(names)
    assert ("merging.io", 2) in imports_of(source, "merging.methods")
    assert "merging.io" in [n for n, _ in imports_of("from .io import x\n", "merging", is_package=True)]
    assert unit_of("modeling.clip") == "modeling" and unit_of("bv") == "bv" and unit_of("torch.nn") is None


def test_every_project_package_has_a_floor():
    units = {unit_of(m) or m.split(".")[0] for m in project_modules()}
    unplaced = sorted(u for u in units if u not in FLOOR_OF and u not in ENTRY_SCRIPTS)
    assert not unplaced, f"package(s)/script(s) {unplaced} have no floor: add them to FLOORS or ENTRY_SCRIPTS in {__file__}"


def test_imports_only_go_down_the_floors():
    bad = [f"{where}: {importer} (floor {floor(importer)}) imports {name} (floor {floor(imported)})"
           for importer, imported, where, name in edges()
           if floor(imported) > floor(importer) and importer not in ENTRY_SCRIPTS]
    assert not bad, "upward imports:\n" + "\n".join(sorted(set(bad)))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_packages_or_scripts():
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for importer, imported, at, _ in edges():
        graph[importer].add(imported)
        where.setdefault((importer, imported), at)
    cycles = _cycles(graph)
    detail = ["; ".join(f"{a} -> {b} ({where[a, b]})" for a in c for b in c if (a, b) in where) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


@pytest.mark.parametrize("who", ["library", "entry script"])
def test_nothing_imports_an_entry_script(who):
    # scripts are thin CLIs over the library: neither a library module nor another script imports one (tests may)
    bad = [f"{at}: {importer} imports {name}" for importer, imported, at, name in edges()
           if imported in ENTRY_SCRIPTS and (importer in ENTRY_SCRIPTS) == (who == "entry script")]
    assert not bad, f"{who} modules importing entry scripts:\n" + "\n".join(sorted(bad))
