"""Start-up: the command line parser loads no heavy library, so ``moesim --version`` and
``moesim --help`` cost little more than Python itself."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

HEAVY = ("numpy", "pydantic", "pandas", "numba", "networkx", "yaml", "matplotlib", "scipy")


def _heavy_imported_after(code: str) -> set[str]:
    """The heavy libraries a fresh Python has imported after running ``code``."""
    report = f"import sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run(
        [sys.executable, "-c", code + report], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return set(out.stdout.split())


def test_the_parser_imports_no_heavy_library():
    assert _heavy_imported_after("from moesim.cli import build_parser\nbuild_parser()\n") == set()
    version = subprocess.run(
        [sys.executable, "-m", "moesim", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert version.returncode == 0 and version.stdout.startswith("moesim ")


def test_a_run_without_tables_imports_no_table_or_graph_library():
    """``moesim run`` of a small scenario, summary printed, no ``--out``: no pandas (tables
    are built on access), no networkx (the graph is built on access), no matplotlib, and
    no numba (small networks solve without the compiled kernels)."""
    code = (
        "from moesim.cli import main\n"
        "main(['run', '-q', 'scenarios/mixtral-8x7b-8xh100-decode.yaml',"
        " '--set', 'model.n_layers=1'])\n"
    )
    assert _heavy_imported_after(code) == {"numpy", "pydantic", "yaml"}
