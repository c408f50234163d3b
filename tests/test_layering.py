"""The package's folders are stages of a one-way data flow: each imports only from itself and
the stages before it, and no two modules import each other, directly or through others.

Every import counts, function-level ones included (they are how cycles hide).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "moesim"

# the data flow, first to last (docs/code-map.md)
STAGES = [
    "_version",
    "_jit",
    "catalog",
    "config",
    "cost",
    "routing",
    "plan",
    "network",
    "engine",
    "results",
    "report",
    "serving",
    "studies",
    "validation",
    "cli",
]
FACADES = {"moesim", "moesim.__main__"}  # the public API re-exports; nothing inside imports it


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every moesim module ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "moesim"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "moesim":
                continue
            for alias in node.names:  # `from moesim.routing import gating` imports a module
                sub = PACKAGE.parent / f"{mod}.{alias.name}".replace(".", "/")
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    found.add(f"{mod}.{alias.name}")
                else:
                    found.add(mod)
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        me = _module_name(path)
        g.add_node(me)
        for target in _imports(path):
            if target != me:
                g.add_edge(me, target)
    return g


def test_every_module_sits_in_a_known_stage():
    unknown = {m for m in _graph() if m not in FACADES and _stage(m) not in STAGES}
    assert not unknown, f"modules outside the stages {STAGES}: {sorted(unknown)}"


def test_no_import_runs_against_the_flow():
    order = {s: i for i, s in enumerate(STAGES)}
    bad = []
    for src, dst in _graph().edges:
        if src in FACADES:
            continue
        if dst in FACADES:
            bad.append(f"{src} imports the facade {dst}")
        elif order[_stage(dst)] > order[_stage(src)]:
            bad.append(f"{src} ({_stage(src)}) imports {dst} ({_stage(dst)})")
    assert not bad, "imports against the data flow:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = _graph()
    # a package's __init__ and its own modules are one unit for Python's import system only
    # when the __init__ re-exports them; edges from a package to its children are not cycles
    g.remove_edges_from([(a, b) for a, b in list(g.edges) if b.startswith(a + ".")])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_contract_catches_a_backward_import(tmp_path, monkeypatch):
    """The checker itself can fail: a cost module importing the engine is reported."""
    fake = tmp_path / "moesim"
    (fake / "cost").mkdir(parents=True)
    (fake / "engine").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "cost" / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "engine" / "des.py").write_text("from moesim.cost import x\n")
    (fake / "cost" / "x.py").write_text("def f():\n    from moesim.engine.des import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    edges = set(_graph().edges)
    assert ("moesim.cost.x", "moesim.engine.des") in edges
    try:
        test_no_import_runs_against_the_flow()
    except AssertionError as err:
        assert "moesim.cost.x (cost) imports moesim.engine.des (engine)" in str(err)
    else:
        raise AssertionError("a backward import went unnoticed")


def test_the_version_string_is_the_installed_package_version():
    from importlib.metadata import version

    from moesim._version import __version__

    assert __version__ == version("moesim")
