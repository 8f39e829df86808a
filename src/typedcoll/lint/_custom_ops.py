"""Torch custom ops registered in the analysed files: ``torch.ops.<namespace>.<name>(...)`` runs
the function registered under ``name``, so the call graph follows it there.

Registrations read: vLLM's and SGLang's ``direct_register_custom_op(op_name="name",
op_func=f)``, and the decorators ``@torch.library.custom_op("namespace::name")`` and SGLang's
``@register_custom_op(...)`` (its ``op_name=``, else the function's own name).
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Tuple

from ._collectives import dotted_name, resolve_alias

if TYPE_CHECKING:
    from ._callgraph import Function

_REGISTER_CALLS = frozenset({"direct_register_custom_op"})
_DECORATORS = frozenset({"custom_op", "register_custom_op"})


def _last(node: ast.expr) -> str:
    return (dotted_name(node) or "").rsplit(".", 1)[-1]


def _argument(call: ast.Call, position: int, *names: str) -> Optional[ast.expr]:
    for kw in call.keywords:
        if kw.arg in names:
            return kw.value
    return call.args[position] if len(call.args) > position else None


def _op_name(node: Optional[ast.expr]) -> Optional[str]:
    """``"namespace::name"``, or ``"name"`` where the namespace is not written out (a helper's
    default library)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def registered_ops(functions: Iterable[Function], calls_of: Callable[[Function], List[ast.Call]],
                   resolve: Callable[[str, Function], Tuple[Function, ...]]
                   ) -> Dict[str, List[Function]]:
    """Op name (``namespace::name`` where written) -> the analysed functions registered under it
    (``resolve`` finds a plain name as seen from a function)."""
    ops: Dict[str, List[Function]] = {}
    for fn in functions:
        if isinstance(fn.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in fn.node.decorator_list:
                if isinstance(decorator, ast.Call) and _last(decorator.func) in _DECORATORS:
                    named = _op_name(_argument(decorator, 0, "op_name", "name")) or fn.name
                    ops.setdefault(named, []).append(fn)
        for call in calls_of(fn):
            if _last(call.func) not in _REGISTER_CALLS:
                continue
            name = _op_name(_argument(call, 0, "op_name"))
            func = _argument(call, 1, "op_func")
            if name is not None and isinstance(func, ast.Name):
                ops.setdefault(name, []).extend(resolve(func.id, fn))
    return ops


def custom_op_namespace(receiver: ast.expr, imports: Dict[str, str]) -> Optional[str]:
    """``torch.ops.<namespace>`` (imports resolved) -> the namespace: a call on it runs a
    registered op (``torch.ops.<namespace>.<name>`` -> "<namespace>.<name>": a call on it runs
    one of the op's overloads); None for any other receiver."""
    owner = dotted_name(receiver)
    resolved = resolve_alias(owner, imports) if owner is not None else ""
    head, _, namespace = resolved.partition("torch.ops.")
    return namespace if not head and namespace else None


def ops_named(ops: Dict[str, List[Function]], namespace: str, name: str
              ) -> Tuple[Function, ...]:
    """The functions ``torch.ops.<namespace>.<name>`` runs (``.<overload>`` after it): registered
    under that namespace, or under the name alone."""
    if "." in namespace:
        namespace, _, name = namespace.partition(".")
        name = name.split(".")[0]
    return tuple(ops.get(f"{namespace}::{name}", []) + ops.get(name, []))
