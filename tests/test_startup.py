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


def test_an_analytic_run_of_uniform_routing_imports_no_numba():
    """Expected routing of uniform preferences needs no quadrature: the analytic run loads
    neither numba nor the network's kernels (the compiled integral is for skewed ones)."""
    code = (
        "from moesim.cli import main\n"
        "main(['run', '-q', 'scenarios/mixtral-8x7b-8xh100-decode.yaml',"
        " '--set', 'sim.fidelity=analytic'])\n"
    )
    assert _heavy_imported_after(code) == {"numpy", "pydantic", "yaml"}


def test_the_program_flushes_its_output_and_exit_code_before_its_fast_exit(tmp_path):
    """``python -m moesim`` ends with ``os._exit`` after the command (no interpreter
    teardown): what it printed and wrote is complete, and its exit codes are main's."""
    import json

    run = subprocess.run(
        [sys.executable, "-m", "moesim", "run", "--json", "--set", "model.n_layers=1",
         "scenarios/mixtral-8x7b-8xh100-decode.yaml", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary, _ = json.JSONDecoder().raw_decode(run.stdout)  # then the "wrote" line
    assert summary["scenario"] == "mixtral-8x7b-8xh100-decode" and "wrote" in run.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["step_time_s"] > 0
    bad = subprocess.run(
        [sys.executable, "-m", "moesim", "run", "missing.yaml"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    usage = subprocess.run(
        [sys.executable, "-m", "moesim"], capture_output=True, text=True, cwd=ROOT
    )
    assert usage.returncode == 2 and "COMMAND" in usage.stderr


def test_loading_the_compiled_kernels_imports_no_scipy_linalg():
    """numba's BLAS probe (an import of ``scipy.linalg``) is skipped while its array-math
    module loads (``moesim._jit``): the kernels load and run without it, and afterwards
    ``scipy.linalg`` imports and works as usual."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from moesim.network.fluid import maxmin_rates, warm_up\n"
        "warm_up()\n"
        "assert 'scipy.linalg' not in sys.modules\n"
        "rates = maxmin_rates(np.array([[0], [0]]), np.array([3.0]), compiled=True)\n"
        "assert np.allclose(rates, [1.5, 1.5]), rates\n"
        "import scipy.linalg\n"
        "assert np.isclose(scipy.linalg.det(np.eye(2) * 2.0), 4.0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
