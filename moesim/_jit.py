"""numba's ``njit`` for moesim's compiled kernels, imported without numba's BLAS probe.

numba's array-math module checks at import whether a BLAS is available by importing
``scipy.linalg`` (``numba.np.arraymath._check_blas``), which costs about 0.3 s a process
(scipy's array-API layer imports ``numpy.f2py``), paid on the first compiled call of every
process that loads a kernel. moesim's kernels call no BLAS (no ``np.dot``, ``np.linalg``,
``np.convolve``), so that module is imported here with ``scipy.linalg`` hidden from this
thread for the length of the import: numba then takes its loop versions of the inner
products, as on a machine without scipy, and ``scipy.linalg`` stays importable as usual
(other threads, and this one afterwards, import it normally). Raises ImportError where
numba is not installed.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

from numba import njit

__all__ = ["njit"]


class _HideScipyLinalg(importlib.abc.MetaPathFinder):
    """Fails an import of ``scipy.linalg`` by the thread that installed it; others pass."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if name == "scipy.linalg" and threading.get_ident() == self.thread:
            raise ImportError("scipy.linalg hidden while numba.np.arraymath imports")
        return None


def _import_arraymath() -> None:
    if "numba.np.arraymath" in sys.modules:
        return
    finder = _HideScipyLinalg()
    sys.meta_path.insert(0, finder)
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        sys.meta_path.remove(finder)


_import_arraymath()
