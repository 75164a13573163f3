"""The package's layout rules (docs/architecture.md), checked on the source tree.

* no import cycle anywhere in ``src/selfalign`` (imports inside functions count: a lazy import
  back up the layers is still a cycle; imports under ``if TYPE_CHECKING:`` do not);
* no module over 500 lines;
* nothing outside ``selfalign.cli`` imports the command line;
* one name, one thing: no module is named like a package, and no two modules share a name
  (``config`` excepted: each layer's settings live in its own ``config.py``).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "selfalign"
MAX_LINES = 500
SHARED_NAMES = {"config", "__init__", "__main__"}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package directory)."""
    mods = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package tree it imports (``from a import b`` counts as
    ``a.b`` when that is a module, else ``a``)."""
    mods = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.name
                    while name and name not in mods:
                        name = name.rpartition(".")[0]
                    if name:
                        graph[mod].add(name)
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in mods:
                    graph[mod].add(target)
                elif base in mods:
                    graph[mod].add(base)
        graph[mod].discard(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One concrete loop through ``component``, for the failure message."""
    members = set(component)
    path = [component[0]]
    while True:
        nxt = min(m for m in graph[path[-1]] if m in members)
        if nxt in path:
            return " -> ".join(path[path.index(nxt):] + [nxt])
        path.append(nxt)


def test_no_import_cycle():
    graph = import_graph(SRC)
    assert len(graph) > 50, "the walk found too few modules: is SRC right?"
    found = cycles(graph)
    assert not found, "import cycles in src/selfalign:\n" + "\n".join(_cycle_path(graph, c) for c in found)


def test_the_cycle_check_finds_cycles(tmp_path):
    """The checker itself: a lazy import back up, a relative import and a TYPE_CHECKING import."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from pkg.sub import low\n")
    (pkg / "sub" / "low.py").write_text("def f():\n    from ..top import g\n")
    (pkg / "sub" / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n")
    (pkg / "leaf.py").write_text("import pkg.sub.typed\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.low"] == {"pkg.top"}
    assert graph["pkg.sub.typed"] == set()
    assert cycles(graph) == [["pkg.sub.low", "pkg.top"]]
    (pkg / "sub" / "low.py").write_text("X = 1\n")
    assert cycles(import_graph(pkg)) == []


def test_no_module_over_the_line_limit():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


def test_only_the_cli_imports_the_cli():
    graph = import_graph(SRC)
    offenders = sorted(m for m, deps in graph.items()
                       if not m.startswith("selfalign.cli") and any(d.startswith("selfalign.cli") for d in deps))
    assert not offenders, f"modules below the command line import selfalign.cli: {offenders}"


@pytest.mark.parametrize("rule", ["module named like a package", "two modules with one name"])
def test_one_name_one_thing(rule):
    mods = module_files(SRC)
    packages = {m.rpartition(".")[2] for m, p in mods.items() if p.name == "__init__.py"}
    names = Counter(p.stem for p in mods.values())
    if rule == "module named like a package":
        clash = sorted(str(p.relative_to(SRC)) for p in mods.values() if p.name != "__init__.py" and p.stem in packages)
    else:
        clash = sorted(str(p.relative_to(SRC)) for p in mods.values() if names[p.stem] > 1 and p.stem not in SHARED_NAMES)
    assert not clash, f"{rule}: {clash}"
