"""Which ``raise`` statements a ``try`` of the same function catches.

An exception that leaves the function ends the rank that raised it: a crash the other ranks see,
not a collective they wait for in vain. One that a handler of the same function catches is a jump
instead: the rest of the ``try`` body is skipped on the ranks that raise, like after a ``break``.
A handler catches a raise when it is bare, names the raised class or one of its bases (builtin
exception classes and the analysed classes are known), or names ``Exception``/``BaseException``;
the first that does is Python's pick, and one that ends in a ``raise`` passes the exception on (a
crash again). A ``raise`` of anything but a class or a call of one (a re-raise, a variable) is
taken as uncaught.
"""

from __future__ import annotations

import ast
import builtins
from typing import Callable, Dict, List, Optional, Sequence

from ._callgraph import Function, Program, is_try
from ._definitions import SCOPE_NODES

# The bases an analysed class is declared with (last names), or none when it is not analysed.
BaseLookup = Callable[[str], List[str]]
_BROAD = frozenset({"Exception", "BaseException"})
_MAX_DEPTH = 16


def _class_name(node: Optional[ast.expr]) -> Optional[str]:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


def _handled_names(handler: ast.ExceptHandler) -> Optional[List[str]]:
    """The class names a handler catches; None for a bare ``except``."""
    if handler.type is None:
        return None
    parts = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return [name for part in parts if (name := _class_name(part)) is not None]


def _is_a(raised: str, caught: str, bases: BaseLookup, depth: int = 0) -> bool:
    if raised == caught:
        return True
    known = getattr(builtins, raised, None)
    if isinstance(known, type) and issubclass(known, BaseException):
        parent = getattr(builtins, caught, None)
        return isinstance(parent, type) and issubclass(known, parent)
    if depth > _MAX_DEPTH:
        return False
    declared = bases(raised)
    if not declared:
        # an unknown class: most user exceptions derive from Exception
        return caught == "Exception"
    return any(_is_a(base, caught, bases, depth + 1) for base in declared)


def _handler_for(handlers: Sequence[ast.ExceptHandler], raised: str, bases: BaseLookup
                 ) -> Optional[ast.ExceptHandler]:
    """The first handler that catches ``raised``, as Python picks it."""
    for handler in handlers:
        names = _handled_names(handler)
        if names is None or any(n == "BaseException" or _is_a(raised, n, bases) for n in names):
            return handler
        if "Exception" in names and raised not in ("KeyboardInterrupt", "SystemExit",
                                                   "GeneratorExit"):
            return handler
    return None


def _reraises(handler: ast.ExceptHandler) -> bool:
    """A handler that ends in a ``raise`` (``except E: log(); raise``) turns the jump back into
    an exception leaving the ``try``."""
    return bool(handler.body) and isinstance(handler.body[-1], ast.Raise)


def caught_raises(root: ast.AST, bases: BaseLookup) -> Dict[int, int]:
    """For each ``raise`` in ``root``'s own scope that a ``try`` of that scope catches, the id of
    the innermost such ``try``."""
    out: Dict[int, int] = {}

    def visit(node: ast.AST, tries: List[ast.Try]) -> None:
        if isinstance(node, SCOPE_NODES):
            return
        if isinstance(node, ast.Raise) and (raised := _class_name(node.exc)) is not None:
            for candidate in reversed(tries):
                handler = _handler_for(candidate.handlers, raised, bases)
                if handler is not None:
                    if not _reraises(handler):
                        out[id(node)] = id(candidate)
                    break
        if is_try(node):
            for stmt in node.body:
                visit(stmt, tries + [node])
            for part in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(part, tries)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, tries)

    for child in ast.iter_child_nodes(root):
        visit(child, [])
    return out


class Catches:
    """:func:`caught_raises` of each function, computed once."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._found: Dict[Function, Dict[int, int]] = {}

    def bases(self, name: str) -> List[str]:
        return [base.rsplit(".", 1)[-1] for info in self.program.classes_by_name.get(name, [])
                for base in info.bases]

    def of(self, fn: Function) -> Dict[int, int]:
        found = self._found.get(fn)
        if found is None:
            found = self._found[fn] = caught_raises(fn.node, self.bases)
        return found
