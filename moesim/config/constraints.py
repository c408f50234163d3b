"""Constraint expressions of sweep and plan files: arithmetic, comparisons and and/or/not over
dotted scenario paths (``parallelism.ep <= cluster.nodes * cluster.devices_per_node``).

Parsed once at load time (:func:`parse_constraint`): calls, subscripts, lambdas, comprehensions
and every other node outside a small whitelist are refused, and so are dunder names
(``cluster.__class__``) and powers whose exponent is not a literal of at most
:data:`MAX_EXPONENT` (``2 ** 10 ** 10`` never returns). Evaluation walks the tree itself (no
``eval``), so an expression can only read the scenario's values.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

MAX_EXPONENT = 64
"""Largest literal exponent a constraint may raise to."""
MAX_POWER_BITS = 4096
"""Largest power a constraint may compute (``2**4096``), however its exponents nest."""
MAX_CONSTRAINT_CHARS = 1000
"""Longest constraint expression accepted."""

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_ALLOWED = (
    ast.Expression,
    ast.BoolOp,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.Name,
    ast.Attribute,
    ast.Constant,
    ast.Load,
    ast.And,
    ast.Or,
    ast.Not,
    ast.USub,
    ast.UAdd,
    ast.Tuple,
    ast.List,
    *_BINOPS,
    *_CMPOPS,
)


class ConstraintError(ValueError):
    """A constraint that cannot be parsed or evaluated (the message names it)."""


def parse_constraint(expr: str) -> ast.Expression:
    """The checked syntax tree of ``expr``; raises :class:`ConstraintError` naming what is
    not allowed."""
    if not isinstance(expr, str):
        raise ConstraintError(f"a constraint must be a string, not {type(expr).__name__}")
    if len(expr) > MAX_CONSTRAINT_CHARS:
        raise ConstraintError(f"longer than {MAX_CONSTRAINT_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise ConstraintError(f"constraint '{expr}': invalid expression ({err})") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ConstraintError(f"constraint '{expr}': {type(node).__name__} is not allowed")
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
        if isinstance(name, str) and name.startswith("_"):
            raise ConstraintError(f"constraint '{expr}': name '{name}' is not allowed")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            exp = node.right
            if not (
                isinstance(exp, ast.Constant)
                and isinstance(exp.value, int | float)
                and not isinstance(exp.value, bool)
                and abs(exp.value) <= MAX_EXPONENT
            ):
                raise ConstraintError(
                    f"constraint '{expr}': an exponent must be a number of at most {MAX_EXPONENT}"
                )
    return tree


def parse_constraints(constraints: list[str]) -> list[str]:
    """A field validator for a list of constraints: each must parse (see parse_constraint)."""
    for expr in constraints:
        parse_constraint(expr)
    return constraints


def _pow_bits(base: Any, exp: Any) -> float:
    """log2 of |base ** exp| (0 for non-numbers, left to the operator to refuse)."""
    if not isinstance(base, int | float) or not isinstance(exp, int | float):
        return 0.0
    return abs(exp) * math.log2(abs(base)) if abs(base) > 1 else 0.0


def _eval(node: ast.AST, scope: dict[str, Any], expr: str) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, scope, expr)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if not isinstance(scope, dict) or node.id not in scope:
            raise ConstraintError(f"constraint '{expr}': no field {node.id} in the scenario")
        return scope[node.id]
    if isinstance(node, ast.Attribute):
        value = _eval(node.value, scope, expr)
        if not isinstance(value, dict) or node.attr not in value:
            raise ConstraintError(
                f"constraint '{expr}': no field {ast.unparse(node)} in the scenario"
            )
        return value[node.attr]
    if isinstance(node, ast.Tuple | ast.List):
        return [_eval(e, scope, expr) for e in node.elts]
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, scope, expr)
        if isinstance(node.op, ast.Not):
            return not value
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, scope, expr) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, scope, expr), _eval(node.right, scope, expr)
        if isinstance(node.op, ast.Pow) and _pow_bits(left, right) > MAX_POWER_BITS:
            raise ConstraintError(f"constraint '{expr}': a power larger than 2**{MAX_POWER_BITS}")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, scope, expr)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, scope, expr)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    raise ConstraintError(f"constraint '{expr}': {type(node).__name__} is not allowed")


def check_constraint(expr: str, scenario: dict[str, Any]) -> bool:
    """Evaluate a constraint over a scenario mapping; raises :class:`ConstraintError` for a
    path the scenario does not have or an operation its values do not support."""
    tree = parse_constraint(expr)
    try:
        return bool(_eval(tree, scenario, expr))
    except ConstraintError:
        raise
    except (TypeError, ValueError, ArithmeticError, RecursionError) as err:
        raise ConstraintError(f"constraint '{expr}': {type(err).__name__}: {err}") from None
