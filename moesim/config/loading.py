"""The one loader every input file goes through: read, parse, validate, or a one-line error.

Every failure (a missing file, a directory, unreadable or non-UTF-8 bytes, bad YAML, nesting
deeper than :data:`MAX_DEPTH`, an alias bomb expanding past :data:`MAX_YAML_NODES`, a file over
:data:`MAX_INPUT_BYTES`, a schema error, a non-finite number) becomes a :class:`ScenarioError`,
printed by the CLI as ``error: FILE: field.path: reason`` with exit code 2.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from moesim.config.errors import ScenarioError

MAX_INPUT_BYTES = 16 * 2**20
"""Largest YAML / JSON input file read (16 MiB): a scenario is a few kB."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists accepted in an input file."""
MAX_YAML_NODES = 1_000_000
"""Most YAML nodes a file may expand to once aliases are followed (an alias bomb expands
exponentially: ``a: &a [x, x]``, ``b: &b [*a, *a]``, ...)."""

M = TypeVar("M", bound=BaseModel)


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (difflib ratio >= 0.6), or ""."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; every OS or decoding failure is a :class:`ScenarioError`."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ScenarioError("", f"is a directory, not a {what}", str(path))
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise ScenarioError(
                "", f"{size:,} bytes: larger than the {MAX_INPUT_BYTES:,}-byte limit", str(path)
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise ScenarioError("", f"{what} not found", str(path)) from None
    except OSError as err:
        raise ScenarioError("", f"cannot read: {err.strerror or err}", str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ScenarioError(
            "", f"not UTF-8 text (byte {err.start}: {data[err.start : err.start + 1]!r})", str(path)
        ) from None


def _check_graph(node: yaml.Node) -> None:
    """Refuse nesting deeper than MAX_DEPTH and graphs expanding past MAX_YAML_NODES
    (iterative, memoised on shared alias targets)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(node, 1, False)]
    while stack:
        cur, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        children = _children(cur)
        if done:
            sizes[id(cur)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(cur)] > MAX_YAML_NODES:
                raise ValueError(f"expands to more than {MAX_YAML_NODES:,} nodes through aliases")
            continue
        if id(cur) in sizes:
            continue
        stack.append((cur, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def parse_yaml(text: str, file: str | None = None, where: str = "") -> Any:
    """Parse YAML text under the nesting and expansion limits; errors name ``file`` and
    ``where`` (a field path, for ``--set`` values)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = where or (f"line {mark.line + 1}" if mark else "")
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ScenarioError(at, f"invalid YAML: {problem}", file) from None
    except RecursionError:
        raise ScenarioError(
            where, f"invalid YAML: nested deeper than {MAX_DEPTH} levels", file
        ) from None
    except ValueError as err:
        raise ScenarioError(where, f"invalid YAML: {err}", file) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file; any failure is a one-line :class:`ScenarioError`."""
    return parse_yaml(read_text(path), str(path))


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a scenario, sweep or plan file)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ScenarioError("", f"a {what} must be a YAML mapping, not {_kind(data)}", str(path))
    return data


def _kind(value: Any) -> str:
    return "empty" if value is None else type(value).__name__


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model found by walking ``loc`` (for the did-you-mean of an unknown
    key); [] when the walk leaves the pydantic models."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(str(part))
        if field is None:
            return []
        cls = _model_in(field.annotation)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


_UNION_TAG = re.compile(
    r"^(float|int|str|bool|none|bytes|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|"
    r"[A-Z]\w*(Spec|Config|Range)|tagged-union\[.*\]|json-or-python\[.*\])$"
)
"""Union member names pydantic puts in an error's location (``zipf_s.float``)."""


def _location(error: dict) -> tuple:
    return tuple(p for p in error["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))


def format_validation_error(
    err: ValidationError, model: type[BaseModel] | None = None
) -> tuple[str, str]:
    """First error as (dotted path, reason), with a did-you-mean for an unknown key and the
    count of other fields in error appended (union members of one field count once)."""
    errors = err.errors()
    first = errors[0]
    loc = _location(first)
    reason = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        known = _known_keys(model, loc) if model is not None and loc else []
        reason = "unknown key" + did_you_mean(loc[-1], known) if loc else "unknown key"
    elif first["type"] == "finite_number":
        reason = "must be a finite number, not NaN or infinity"
    more = len({_location(e) for e in errors} - {loc})
    if more:
        reason += f" (and {more} more error{'s' if more > 1 else ''})"
    return ".".join(map(str, loc)), reason


def non_finite_path(value: Any, prefix: str = "") -> str | None:
    """Dotted path of the first NaN or infinite float in nested dicts / lists, else None."""
    stack: list[tuple[str, Any]] = [(prefix, value)]
    while stack:
        path, cur = stack.pop()
        if isinstance(cur, float) and not math.isfinite(cur):
            return path
        if isinstance(cur, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in cur.items())
        elif isinstance(cur, list | tuple):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(cur))
    return None


def validate(
    model: type[M],
    data: Any,
    file: str | None,
    what: str,
    check: Callable[[M], None] | None = None,
) -> M:
    """``model.model_validate(data)`` with every failure a :class:`ScenarioError` naming
    ``file``; refuses a non-mapping and any NaN / infinity left in the validated fields."""
    if not isinstance(data, dict):
        raise ScenarioError("", f"a {what} must be a YAML mapping, not {_kind(data)}", file)
    try:
        obj = model.model_validate(data)
        if check is not None:
            check(obj)
    except ValidationError as err:
        path, reason = format_validation_error(err, model)
        raise ScenarioError(path, reason, file) from None
    except ScenarioError as err:
        err.file = err.file or file
        raise
    except (TypeError, ValueError, OverflowError, RecursionError) as err:
        raise ScenarioError("", f"{type(err).__name__}: {err}", file) from None
    bad = non_finite_path(obj.model_dump(mode="python"))
    if bad is not None:
        raise ScenarioError(bad, "must be a finite number, not NaN or infinity", file)
    return obj
