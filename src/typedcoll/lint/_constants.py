"""Constants a call passes, and the branches they decide in the callee.

A role helper is often one function whose callers pick its arm with a constant:
``self._share(x, True)`` on the source, ``self._share(None, False)`` elsewhere. Read once for
every caller, its ``if is_src:`` is an alternative both calls share, and a helper that
broadcasts on one arm only looks balanced. Sequenced for the constants each call passes (its
defaults included), the branch is decided and each call issues what it really does.
"""

from __future__ import annotations

import ast
import operator
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from ._callgraph import Function

# (parameter, the value's type name, the value): hashable, and True apart from 1
Bindings = Tuple[Tuple[str, str, object], ...]

_COMPARISONS: Dict[type, Callable[[object, object], object]] = {
    ast.Is: operator.is_, ast.IsNot: operator.is_not, ast.Eq: operator.eq, ast.NotEq: operator.ne}


def constant_arguments(call: ast.Call, callee: Function, bound: bool) -> Bindings:
    """The callee's parameters that ``call`` sets to a constant, by position, keyword or
    default; none past a ``*args`` or ``**kwargs`` it cannot read."""
    node = callee.node
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return ()
    spec = node.args
    positional = [a.arg for a in spec.posonlyargs + spec.args]
    if callee.self_name is not None and positional and bound:
        positional = positional[1:]  # self is the receiver, not an argument written out
    values: Dict[str, ast.expr] = {}
    defaults = spec.defaults
    values.update(zip(positional[len(positional) - len(defaults):], defaults))
    values.update((a.arg, d) for a, d in zip(spec.kwonlyargs, spec.kw_defaults) if d is not None)
    for name, arg in zip(positional, call.args):
        if isinstance(arg, ast.Starred):
            return ()
        values[name] = arg
    for keyword in call.keywords:
        if keyword.arg is None:
            return ()
        values[keyword.arg] = keyword.value
    pairs: List[Tuple[str, str, object]] = [
        (name, type(value.value).__name__, value.value) for name, value in values.items()
        if isinstance(value, ast.Constant) and name != callee.self_name]
    return tuple(sorted(pairs, key=lambda p: p[0]))


def decided(test: ast.expr, bindings: Dict[str, object]) -> Optional[bool]:
    """The test's truth where the bound constants settle it, else None."""
    if isinstance(test, ast.Name):
        return bool(bindings[test.id]) if test.id in bindings else None
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = decided(test.operand, bindings)
        return None if inner is None else not inner
    if isinstance(test, ast.BoolOp):
        parts = [decided(v, bindings) for v in test.values]
        settles = isinstance(test.op, ast.Or)  # True settles an `or`, False an `and`
        if settles in parts:
            return settles
        return None if None in parts else not settles
    if (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.left, ast.Name) and test.left.id in bindings
            and isinstance(test.comparators[0], ast.Constant)
            and type(test.ops[0]) in _COMPARISONS):
        compare = _COMPARISONS[type(test.ops[0])]
        return bool(compare(bindings[test.left.id], test.comparators[0].value))
    return None
