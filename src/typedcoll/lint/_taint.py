"""One function, interpreted over taints: under which gates each call runs.

Flow-sensitive over locals: a loop's body is repeated until its variables stop changing. Gates are
``if``/``while``/``for``/``match``, exception handlers, later operands of ``and``/``or``,
conditional expressions, and early exits: a ``return``, ``break`` or ``continue`` under a gate puts
that gate over everything it skips (the rest of the block; for ``return`` and ``break`` also the
whole loop body, whose later iterations are skipped). A ``raise`` that a ``try`` of the same
function catches is an early exit from that ``try``'s body (see :mod:`_raises`); one that leaves
the function ends the rank and gates nothing. A ``try``'s ``else`` is under its handlers' gates, a
loop's ``else`` under its ``break`` statements'.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set, Tuple, Union

from . import _presence as presence
from ._callgraph import Function, is_try
from ._definitions import body_nodes
from ._expressions import ValueAnalysis
from ._facts import AttrWrite, Gate
from ._values import SYMMETRIC, join, local, merge

_MAX_LOOP_PASSES = 8


@dataclass
class _Exit:
    """``kind``: ``return``, ``break``, ``continue``, ``raise`` (caught by the ``try`` whose id
    is ``catcher``, in this function) or ``crash`` (an exception that leaves the function)."""

    kind: str
    gates: Tuple[Gate, ...]
    line: int
    catcher: int = 0


class FunctionAnalysis(ValueAnalysis):
    """Interpret one function once, against the current :class:`Facts`."""

    def run(self) -> "FunctionAnalysis":
        self.block(self.fn.node.body, ())
        self.final_env = dict(self.env)
        return self

    # -- statements -------------------------------------------------------------------------
    def block(self, stmts: Sequence[ast.stmt], ctrl: Tuple[Gate, ...],
              loop_body: bool = False) -> List[_Exit]:
        exits: List[_Exit] = []
        for index, stmt in enumerate(stmts):
            self.frames.append((stmts, index + 1, loop_body))
            try:
                found = self.statement(stmt, ctrl)
            finally:
                self.frames.pop()
            exits += found
            added: List[Gate] = []
            for ex in found:
                extra = self.new_gates(ex, ctrl)
                if extra is None:
                    return exits  # an unconditional exit: the rest is dead code
                added += [g for g in extra if g not in added]
            if added:
                ctrl = ctrl + tuple(added)
        return exits

    def statement(self, stmt: ast.stmt, ctrl: Tuple[Gate, ...]) -> List[_Exit]:
        if isinstance(stmt, ast.If):
            return self.branch(stmt, ctrl)
        if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)):
            return self.loop(stmt, ctrl)
        if is_try(stmt):
            return self.try_(stmt, ctrl)
        if isinstance(stmt, (ast.Return, ast.Break, ast.Continue)):
            if isinstance(stmt, ast.Return):
                self.record_return(stmt.value, ctrl)
            kind = {ast.Return: "return", ast.Break: "break", ast.Continue: "continue"}[type(stmt)]
            return [_Exit(kind, ctrl, stmt.lineno)]
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            self.assign_statement(stmt, ctrl)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                value = self.expr(item.context_expr, ctrl)
                if item.optional_vars is not None:
                    self.assign(item.optional_vars, value, ctrl, stmt)
            return self.block(stmt.body, ctrl)
        elif isinstance(stmt, ast.Match):
            return self.match(stmt, ctrl)
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                name = self.self_attribute(target) if isinstance(target, ast.Attribute) else None
                if name is not None and "." not in name:
                    # ``del self.x`` replaces the attribute, like storing a value, not its history
                    for written in (name, presence.key(name)):
                        self.writes.append(AttrWrite(written, self.implicit(ctrl, SYMMETRIC),
                                                     stmt.lineno, False))
                else:  # ``del x[:n]`` changes x as much as n is rank-local
                    removed = (self.expr(target.slice, ctrl) if isinstance(target, ast.Subscript)
                               else SYMMETRIC)
                    self.mutate(target, removed, ctrl, stmt.lineno)
        elif isinstance(stmt, ast.Raise):
            if stmt.exc is not None:
                self.expr(stmt.exc, ctrl)
            catcher = self.facts.caught(self.fn).get(id(stmt))
            if catcher is not None:
                return [_Exit("raise", ctrl, stmt.lineno, catcher)]
            return [_Exit("crash", ctrl, stmt.lineno)]
        elif isinstance(stmt, (ast.Expr, ast.Assert)):
            self.expr(stmt.value if isinstance(stmt, ast.Expr) else stmt.test, ctrl)
        return []

    def branch(self, stmt: ast.If, ctrl: Tuple[Gate, ...]) -> List[_Exit]:
        test = self.expr(stmt.test, ctrl)
        gate = self.gate("if", stmt, stmt.test, test, stmt.body + stmt.orelse)
        inner = ctrl + (gate,)
        before = dict(self.env)
        exits = self.block(stmt.body, inner)
        after_then = self.env
        self.env = dict(before)
        exits += self.block(stmt.orelse, inner)
        self.env = merge(after_then, self.env)
        return [e for e in exits if e.kind != "crash"]

    def loop(self, stmt: Union[ast.For, ast.AsyncFor, ast.While],
             ctrl: Tuple[Gate, ...]) -> List[_Exit]:
        is_for = not isinstance(stmt, ast.While)
        head = stmt.test if isinstance(stmt, ast.While) else stmt.iter
        test = self.expr(head, ctrl)
        if isinstance(stmt, ast.While) and isinstance(stmt.test, ast.Constant):
            test = SYMMETRIC
        gate = self.gate("for" if is_for else "while", stmt, head, test)
        before = dict(self.env)
        wide: Tuple[Gate, ...] = ()
        escaping: List[_Exit] = []
        broken: List[Gate] = []
        for _ in range(_MAX_LOOP_PASSES):
            start = dict(self.env)
            inner = ctrl + (gate,) + wide
            if not isinstance(stmt, ast.While):
                self.assign(stmt.target, test, inner, stmt)
            else:
                gate.taint = join(gate.taint, self.expr(head, inner))
            exits = self.block(stmt.body, inner, loop_body=True)
            escaping = [e for e in exits if e.kind in ("return", "raise", "crash")]
            broken = self.break_gates(exits, ctrl)
            grown = list(wide)
            for ex in exits:
                if ex.kind in ("break", "return", "raise"):
                    grown += [g for g in self.new_gates(ex, inner) or () if g not in grown]
            self.env = merge(start, self.env)
            if self.env == start and len(grown) == len(wide):
                break
            wide = tuple(grown)
        self.env = merge(before, self.env)
        # A loop's else runs only on ranks that did not break out of it.
        escaping += self.block(stmt.orelse, ctrl + tuple(broken))
        return [e for e in escaping if e.kind != "crash"]

    def break_gates(self, exits: List[_Exit], ctrl: Tuple[Gate, ...]) -> List[Gate]:
        """The gates a loop's ``break`` statements put over its ``else``: those they are under
        in the loop, the loop's own included (an unconditional break skips the else on every
        rank that iterates once)."""
        out: List[Gate] = []
        for ex in exits:
            if ex.kind == "break":
                out += [g for g in self.new_gates(ex, ctrl) or () if g not in out]
        return out

    def try_(self, stmt: ast.Try, ctrl: Tuple[Gate, ...]) -> List[_Exit]:
        before = dict(self.env)
        exits = self.block(stmt.body, ctrl)
        after_body = self.env
        merged = after_body
        handled: List[Gate] = []
        clause = "except" if isinstance(stmt, ast.Try) else "except*"
        for handler in stmt.handlers:
            caught = ast.unparse(handler.type) if handler.type is not None else "BaseException"
            cause = local(f"{clause} {caught}", "caught exception", handler.lineno)
            gate = self.gate("except", handler, handler.type, cause)
            self.env = merge(before, after_body)
            if handler.name:
                self.rebind(handler.name, cause)
            found = self.block(handler.body, ctrl + (gate,))
            exits += found
            merged = merge(merged, self.env)
            # A rank whose handler always raises ends there: a crash, not a skipped else.
            if not any(e.kind == "crash" and e.gates == ctrl + (gate,) for e in found):
                handled.append(gate)
        self.env = merged
        # The else runs only on ranks where no handler did: every handler's gate is over it.
        exits += self.block(stmt.orelse, ctrl + tuple(handled))
        exits += self.block(stmt.finalbody, ctrl)
        # Raises this try catches end in its handlers: the code after it runs on every rank.
        return [e for e in exits if e.kind != "crash" and e.catcher != id(stmt)]

    def match(self, stmt: ast.Match, ctrl: Tuple[Gate, ...]) -> List[_Exit]:
        subject = self.expr(stmt.subject, ctrl)
        gate = self.gate("match", stmt, stmt.subject, subject)
        before = dict(self.env)
        merged = dict(before)
        exits: List[_Exit] = []
        for case in stmt.cases:
            self.env = dict(before)
            for node in ast.walk(case.pattern):
                name = getattr(node, "name", None)
                if isinstance(name, str):
                    self.rebind(name, subject)
            exits += self.block(case.body, ctrl + (gate,))
            merged = merge(merged, self.env)
        self.env = merged
        return [e for e in exits if e.kind != "crash"]

    def new_gates(self, ex: _Exit, ctrl: Tuple[Gate, ...]) -> Optional[List[Gate]]:
        """The early-exit gates an exit puts over the code after it; None if it is unconditional."""
        roots = {id(g.root) for g in ctrl}
        extra = [g for g in ex.gates if id(g.root) not in roots]
        if not extra:
            return None
        out = []
        for g in extra:
            if g.origin is not None:
                out.append(g)
                continue
            key = (f"early-{ex.kind}", id(g.node))
            early = self._gates.get(key)
            if early is None:
                early = self._gates[key] = Gate(key[0], g.node, g.test, g.taint, self.fn, g.rest,
                                                ex.line, g)
            out.append(early)
        return out


def function_globals(fn: Function) -> Set[str]:
    """Names a function rebinds with ``global``: module state that changes as the program runs."""
    return {name for node in body_nodes(fn.node) if isinstance(node, ast.Global)
            for name in node.names}
