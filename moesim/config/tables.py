"""Data files a scenario names (a routing trace, a measured kernel table), read and checked
when the scenario is loaded: a missing, binary, malformed, non-numeric or non-finite file is a
one-line :class:`ScenarioError` naming the field, never a parser traceback mid-run.
"""

from __future__ import annotations

import io
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moesim.config.errors import ScenarioError
from moesim.config.loading import read_text

if TYPE_CHECKING:
    import pandas as pd

KERNEL_COLUMNS = ("op", "m", "k", "n", "dtype", "seconds")
TRACE_COLUMNS = ("layer", "token", "slot", "expert")
MAX_TRACE_TOKENS = 10**7
"""Largest token id + 1 a routing trace may hold per layer (the trace becomes one
``[tokens, top_k]`` array per layer)."""


def resolve_kernel_table(path: str) -> Path:
    """A kernel-table path as given, or a bare file name from ``moesim/catalog/kernels/``."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    shipped = Path(str(resources.files("moesim.catalog").joinpath("kernels", path)))
    return shipped if shipped.exists() else given


def read_csv(path: str | Path, where: str, columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd

    """A CSV file with at least ``columns``; errors are :class:`ScenarioError` at ``where``."""

    try:
        text = read_text(path, "CSV file")
    except ScenarioError as err:
        raise ScenarioError(where, f"{path}: {err.reason}") from None
    try:
        df = pd.read_csv(io.StringIO(text))
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScenarioError(where, f"{path}: not a readable CSV: {first}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ScenarioError(where, f"{path}: missing columns {missing}; need {list(columns)}")
    if not len(df):
        raise ScenarioError(where, f"{path}: no rows")
    return df


def _numeric(df: pd.DataFrame, cols: list[str], path: str | Path, where: str) -> pd.DataFrame:
    import pandas as pd

    num = df[cols].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(num.to_numpy(dtype=float)).all():
        raise ScenarioError(where, f"{path}: non-numeric, empty or non-finite values in {cols}")
    return num


@cache
def read_kernel_table(path: str, where: str = "cluster.device.kernel_table") -> pd.DataFrame:
    """A measured kernel table (``op,m,k,n,dtype,seconds``), checked: m, k, n and seconds
    finite and positive."""
    resolved = resolve_kernel_table(path)
    df = read_csv(resolved, where, KERNEL_COLUMNS)
    num = _numeric(df, ["m", "k", "n", "seconds"], resolved, where)
    if (num <= 0).any().any():
        raise ScenarioError(where, f"{resolved}: m, k, n and seconds must be > 0")
    return df.assign(**{c: num[c] for c in num}).assign(
        op=df["op"].astype(str), dtype=df["dtype"].astype(str)
    )


def read_routing_trace(path: str, where: str = "routing.trace") -> list[np.ndarray]:
    """Expert ids per MoE layer, each ``[tokens, top_k]`` (-1 where a slot is missing), from
    an NPZ (``expert_ids``: ``[layers, tokens, k]`` or ``[tokens, k]``) or a CSV (columns
    ``layer, token, slot, expert``; layer counts MoE layers from 0)."""
    if str(path).endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                ids = np.asarray(npz["expert_ids"])
        except KeyError:
            raise ScenarioError(where, f"{path}: no expert_ids array") from None
        except (OSError, ValueError, EOFError) as err:
            raise ScenarioError(where, f"{path}: not a readable NPZ: {err}") from None
        if ids.ndim not in (2, 3) or not np.issubdtype(ids.dtype, np.integer) or not ids.size:
            raise ScenarioError(
                where, f"{path}: expert_ids must be a non-empty integer [layers, tokens, k] array"
            )
        ids = ids[None] if ids.ndim == 2 else ids
        return [np.asarray(layer, dtype=np.int64) for layer in ids]
    df = read_csv(path, where, TRACE_COLUMNS)
    num = _numeric(df, list(TRACE_COLUMNS), path, where)
    if (num < 0).any().any() or (num != num.round()).any().any():
        raise ScenarioError(where, f"{path}: layer, token, slot and expert must be integers >= 0")
    num = num.astype(np.int64)
    if num["token"].max() >= MAX_TRACE_TOKENS or num["slot"].max() >= 1024:
        raise ScenarioError(
            where,
            f"{path}: token ids up to {num['token'].max():,} and slots up to "
            f"{num['slot'].max():,}: too large (limits {MAX_TRACE_TOKENS:,} and 1024)",
        )
    layers = []
    for _, grp in num.groupby("layer", sort=True):
        t, k = int(grp["token"].max()) + 1, int(grp["slot"].max()) + 1
        ids = np.full((t, k), -1, dtype=np.int64)
        ids[grp["token"].to_numpy(), grp["slot"].to_numpy()] = grp["expert"].to_numpy()
        layers.append(ids)
    return layers
