"""Calls the analysis cannot look into, and how arguments bind to parameters of those it can.

The verdict on a call outside the analysed files, or on an attribute read, depends only on the
expression and the configuration (a clock, an environment variable, a probe, a queue held in an
attribute, configuration by name), so it is computed once per expression.
"""

from __future__ import annotations

import ast
from typing import Dict, List, Optional

from ._callgraph import Function
from ._collectives import dotted_name, is_rank_name, last_identifier, resolve_alias
from ._config import Config
from ._facts import Facts
from ._values import SYMMETRIC, Taint, join, local, rank


def self_attribute(node: ast.Attribute, fn: Function) -> Optional[str]:
    """``self.x`` -> "x", ``self.x.y`` -> "x.y"; None for anything else."""
    owner = node.value
    if isinstance(owner, ast.Name) and owner.id == fn.self_name:
        return node.attr
    if (isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name)
            and owner.value.id == fn.self_name):
        return f"{owner.attr}.{node.attr}"
    return None


def static_attribute(node: ast.Attribute, fn: Function, config: Config) -> Optional[Taint]:
    """What an attribute read is whatever the values around it: an environment variable,
    configuration by name, or None when it depends on them."""
    dotted = dotted_name(node)
    if dotted is not None and config.environment_is_rank_local:
        resolved = resolve_alias(dotted, fn.module.imports)
        if config.matches("environment_calls", resolved):
            return local(dotted, "environment variable", node.lineno)
    if config.matches("symmetric_names", node.attr):
        return SYMMETRIC
    name = self_attribute(node, fn)
    if name is not None and "." in name and config.matches("symmetric_names",
                                                                name.split(".")[0]):
        return SYMMETRIC
    return None


def static_call(node: ast.Call, fn: Function, facts: Facts) -> Optional[Taint]:
    """The verdict on an unanalysed call that does not depend on the values around it;
    None: the receiver's own value (an unknown method of a symmetric object is taken to
    return a symmetric value, since state hidden in objects of other files is invisible
    here: name such methods in the configuration's ``rank_local_calls``)."""
    func = node.func
    dotted = dotted_name(func)
    resolved = resolve_alias(dotted, fn.module.imports) if dotted else ""
    name = func.attr if isinstance(func, ast.Attribute) else (
        func.id if isinstance(func, ast.Name) else "")
    text = f"{dotted or name}()"
    config = facts.config
    if config.matches("clock_calls", resolved) or config.matches("clock_calls", name):
        return local(text, "clock", node.lineno)
    if config.environment_is_rank_local and config.matches("environment_calls", resolved):
        return local(text, "environment variable", node.lineno)
    if config.matches("rank_local_calls", resolved):
        return local(text, "rank-local call", node.lineno)
    if name and is_rank_name(name, config):
        return rank(text, "rank identity", node.lineno)
    if not isinstance(func, ast.Attribute):
        return SYMMETRIC
    owner = func.value
    module_function = dotted is not None and dotted.split(".")[0] in fn.module.imports
    if not module_function and config.matches("rank_local_calls", name):
        return local(text, "rank-local call", node.lineno)
    owner_name = last_identifier(owner)
    if owner_name is not None and (config.matches("symmetric_names", owner_name)
                                   or facts.program.table.is_communicator_name(
                                       owner_name)):
        return SYMMETRIC
    attr = self_attribute(owner, fn) if isinstance(owner, ast.Attribute) else None
    if attr is not None and "queue" in facts.attribute_kinds(fn, attr.split(".")[0]):
        return local(text, "queue held by this rank", node.lineno)
    return None


def bind(callee: Function, bound: bool, node: ast.Call, args: List[Taint],
         keywords: Dict[str, Taint], spread: Taint) -> Dict[str, Taint]:
    """The taint each parameter of ``callee`` receives at this call."""
    params = callee.params
    positional = args[1:] if (callee.self_name is not None and not bound and args) else args
    out: Dict[str, Taint] = {}
    for name, value in zip(params, positional):
        out[name] = value
    extra = positional[len(params):]
    for name, value in keywords.items():
        out[name] = join(out.get(name, SYMMETRIC), value)
    if spread or extra:
        rest = join(spread, *extra)
        for name in params:
            out[name] = join(out.get(name, SYMMETRIC), rest)
    return out


def bound_nodes(callee: Function, bound: bool, node: ast.Call) -> Dict[str, ast.expr]:
    args = [a for a in node.args if not isinstance(a, ast.Starred)]
    if callee.self_name is not None and not bound:
        args = args[1:]
    out = dict(zip(callee.params, args))
    out.update({kw.arg: kw.value for kw in node.keywords if kw.arg is not None})
    return out


def wraps(value: Optional[ast.expr], name: str) -> bool:
    """``f(name, ...)``: a call that takes the variable it is assigned to."""
    return (isinstance(value, ast.Call) and bool(value.args) and isinstance(value.args[0], ast.Name)
            and value.args[0].id == name)


def decorates(value: ast.expr, plain: ast.expr) -> bool:
    """``f(x, ...)`` against ``x``: a call whose first argument is the other expression."""
    return (isinstance(value, ast.Call) and bool(value.args)
            and ast.dump(value.args[0]) == ast.dump(plain))


# Constructors whose result takes only its argument's shape, dtype and device, never its values.
_SHAPE_COPIES = frozenset({"zeros_like", "ones_like", "full_like"})


def shape_copy(node: ast.Call) -> Optional[str]:
    """The local ``x`` of ``zeros_like(x)`` (``ones_like``, ``full_like``), else None."""
    func, first = node.func, node.args[0] if node.args else None
    name = func.attr if isinstance(func, ast.Attribute) else \
        func.id if isinstance(func, ast.Name) else ""
    return first.id if name in _SHAPE_COPIES and isinstance(first, ast.Name) else None
