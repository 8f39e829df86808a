"""What a function's definitions bind: its parameters, and the functions that a lambda, a bound
method or a ``functools.partial`` bound to a name stand for, read as nested functions (or, bound
to a ``self`` attribute, as methods) so that calls through the name resolve to what it runs."""

from __future__ import annotations

import ast
import copy
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from ._collectives import dotted_name

FunctionNode = Union[ast.FunctionDef, ast.AsyncFunctionDef]
SCOPE_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def params_of(node: FunctionNode, method: bool, decorators: Tuple[str, ...]) -> Tuple[
        List[str], Optional[str]]:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args]
    self_name = None
    if method and "staticmethod" not in decorators and names:
        self_name = names.pop(0)
    names += [a.arg for a in args.kwonlyargs]
    if args.vararg:
        names.append(args.vararg.arg)
    if args.kwarg:
        names.append(args.kwarg.arg)
    return names, self_name


def lambda_def(name: str, node: ast.Lambda) -> ast.FunctionDef:
    """A lambda bound to a local name, as the nested function it is: its body returned."""
    body = ast.copy_location(ast.Return(value=node.body), node.body)
    return ast.copy_location(ast.FunctionDef(name=name, args=node.args, body=[body],
                                             decorator_list=[], returns=None), node)


_PARTIALS = frozenset({"functools.partial", "partial"})


def alias_def(name: str, value: ast.expr, where: ast.AST, method: bool) -> ast.FunctionDef:
    """What ``name(...)`` runs where ``name = comm.allgather`` or ``name = partial(dist.all_reduce,
    group=g)`` (``self.name = ...`` for a method, ``method``): a function that calls the
    callable bound with the arguments given after those the partial binds."""
    target, head, bound = value, [], []
    if isinstance(value, ast.Call) and dotted_name(value.func) in _PARTIALS and value.args:
        target, head, bound = value.args[0], value.args[1:], value.keywords
    call = ast.Call(func=copy.deepcopy(target),
                    args=[*map(copy.deepcopy, head),
                          ast.Starred(ast.Name("args", ast.Load()), ast.Load())],
                    keywords=[*map(copy.deepcopy, bound),
                              ast.keyword(arg=None, value=ast.Name("kwargs", ast.Load()))])
    arguments = ast.arguments(posonlyargs=[], args=[ast.arg("self")] if method else [],
                              vararg=ast.arg("args"), kwonlyargs=[], kw_defaults=[],
                              kwarg=ast.arg("kwargs"), defaults=[])
    made = ast.FunctionDef(name=name, args=arguments, body=[ast.Return(value=call)],
                           decorator_list=[], returns=None)
    return ast.fix_missing_locations(ast.copy_location(made, where))


_BODY = "_typedcoll_body"  # where a node keeps its scope's nodes, once walked


def body_nodes(root: ast.AST) -> Tuple[ast.AST, ...]:
    """Every node in ``root``'s own scope: nested functions, classes and lambdas left out.

    Walked once per node and kept on it: each function's scope is read by several passes, and
    walking it again each time was most of a large package's analysis. The trees are never
    changed once parsed."""
    found: Optional[Tuple[ast.AST, ...]] = getattr(root, _BODY, None)
    if found is not None:
        return found
    out = []
    stack = list(ast.iter_child_nodes(root))
    while stack:
        node = stack.pop()
        out.append(node)
        if not isinstance(node, SCOPE_NODES):
            stack.extend(ast.iter_child_nodes(node))
    found = tuple(out)
    setattr(root, _BODY, found)
    return found



def aliases(node: ast.AST, self_name: Optional[str], local: bool,
            collective: Callable[[ast.expr], bool]) -> Iterator[Tuple[str, ast.expr, ast.AST]]:
    """The names a function binds once to a collective's bound method (``collective`` tells), one
    of ``self``'s, or a ``functools.partial``: plain names where ``local``, else ``self``
    attributes. Each with its value and its assignment."""
    found: Dict[str, List[Tuple[ast.expr, ast.AST]]] = {}
    for n in body_nodes(node):
        if not (isinstance(n, ast.Assign) and len(n.targets) == 1):
            continue
        target = n.targets[0]
        if local and isinstance(target, ast.Name):
            found.setdefault(target.id, []).append((n.value, n))
        elif (not local and isinstance(target, ast.Attribute)
              and isinstance(target.value, ast.Name) and target.value.id == self_name):
            found.setdefault(target.attr, []).append((n.value, n))
    for name, bound in found.items():
        if len(bound) != 1:
            continue
        value, where = bound[0]
        callee = value.args[0] if (isinstance(value, ast.Call) and value.args and dotted_name(
            value.func) in _PARTIALS) else value
        if not isinstance(callee, ast.Attribute):
            continue
        on_self = isinstance(callee.value, ast.Name) and callee.value.id == self_name
        if callee is not value or on_self or collective(callee):
            yield name, value, where
