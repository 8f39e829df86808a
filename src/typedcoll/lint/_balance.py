"""Collective sequences of code paths, to tell a divergent branch from a balanced one.

A branch is harmless, whatever its condition, when both of its paths issue the same sequence of
collectives: ``if rank == 0: comm.bcast(x) else: comm.bcast(None)``. A path runs from the branch to
the end of the scope its exits leave (the function for ``return``, the loop body for ``break`` and
``continue``), so ``if not work: comm.allgather(None); return`` followed by
``comm.allgather(work)`` is balanced too. Point-to-point operations are left out when comparing the
sides of a branch on the rank identity alone, where a send on one side and its receive on the
other is the normal pairing, and exception handlers are left out of every path. The same operation
on two communicators written out differently (``self.tp_comm.allgather`` and
``self.dp_comm.allgather``) is two different collectives. A callee is read for the constants its
call passes (``_constants``): ``helper(x, True)`` issues what that arm of the helper does.
"""

from __future__ import annotations

import ast
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ._callgraph import Function, Program, is_try
from ._collectives import communicator_text
from ._constants import Bindings, constant_arguments, decided
from ._facts import Gate
from ._raises import Catches
from ._sequences import (EXIT, RAISE, Op, Seq, Token, alt, anonymous, branches, has_ops,
                         paths_equal, resume, same, terminates)


def _irrefutable(case: ast.match_case) -> bool:
    """Whether a case matches every subject: ``case _:`` or ``case name:``, with no guard."""
    def matches_all(pattern: ast.pattern) -> bool:
        if isinstance(pattern, ast.MatchAs):
            return pattern.pattern is None or matches_all(pattern.pattern)
        return isinstance(pattern, ast.MatchOr) and any(matches_all(p) for p in pattern.patterns)
    return case.guard is None and matches_all(case.pattern)


def exits_in(stmts: Sequence[ast.stmt]) -> Tuple[bool, bool]:
    """Whether ``stmts`` hold a ``return``, and a ``break``/``continue`` leaving their loop."""
    has_return = has_loop_exit = False
    stack: List[Tuple[ast.AST, bool]] = [(s, False) for s in stmts]
    while stack:
        node, in_loop = stack.pop()
        if isinstance(node, ast.Return):
            has_return = True
        elif isinstance(node, (ast.Break, ast.Continue)) and not in_loop:
            has_loop_exit = True
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        inner = in_loop or isinstance(node, (ast.For, ast.AsyncFor, ast.While))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node)
                     if isinstance(child, ast.stmt))
    return has_return, has_loop_exit


class Sequencer:
    """Collective sequences of statements, expressions and functions (memoised per function)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.catches = Catches(program)
        self._functions: Dict[Tuple[Function, bool, Bindings], Seq] = {}
        self._active: Set[Tuple[Function, bool, Bindings]] = set()
        self._bound: Dict[str, object] = {}  # the constants the function being read was passed

    def function(self, fn: Function, p2p: bool, bindings: Bindings = ()) -> Seq:
        key = (fn, p2p, bindings)
        hit = self._functions.get(key)
        if hit is not None:
            return hit
        if key in self._active:
            return (("call", fn.qualname),)
        self._active.add(key)
        outer, self._bound = self._bound, {name: value for name, _, value in bindings}
        try:
            body = fn.node.body
            seq = self.block(body, fn, p2p)
            # the function's own returns end its path, not its caller's
            seq = self._strip_returns(seq)
        finally:
            self._active.discard(key)
            self._bound = outer
        self._functions[key] = seq
        return seq

    def _strip_returns(self, seq: Seq) -> Seq:
        out: List[Token] = []
        for tok in seq:
            if tok == (EXIT, "return"):
                break
            sides = branches(tok)
            if sides is not None:
                then, other = self._strip_returns(sides[0]), self._strip_returns(sides[1])
                if same(then, other):
                    out.extend(then)
                    continue
                tok = ("alt", then, other)
            out.append(tok)
        return tuple(out)

    def block(self, stmts: Sequence[ast.stmt], fn: Function, p2p: bool) -> Seq:
        out: List[Token] = []
        for index, stmt in enumerate(stmts):
            if isinstance(stmt, ast.If):
                out.extend(self.expr(stmt.test, fn, p2p))
                known = decided(stmt.test, self._bound) if self._bound else None
                if known is not None:  # a constant the caller passed picks the arm
                    chosen = stmt.body if known else stmt.orelse
                    return tuple(out) + self.block(list(chosen) + list(stmts[index + 1:]),
                                                   fn, p2p)
                then = self.block(stmt.body, fn, p2p)
                other = self.block(stmt.orelse, fn, p2p)
                if terminates(then) or terminates(other):
                    rest = self.block(stmts[index + 1:], fn, p2p)
                    then = then if terminates(then) else then + rest
                    other = other if terminates(other) else other + rest
                    out.extend(alt(then, other))
                    return tuple(out)
                out.extend(alt(then, other))
                continue
            seq = self.statement(stmt, fn, p2p)
            out.extend(seq)
            if terminates(seq):
                break
        return tuple(out)

    def statement(self, stmt: ast.stmt, fn: Function, p2p: bool) -> Seq:
        if isinstance(stmt, (ast.Return, ast.Break, ast.Continue)):
            kind = {ast.Return: "return", ast.Break: "break", ast.Continue: "continue"}[type(stmt)]
            value = self.expr(stmt.value, fn, p2p) if isinstance(stmt, ast.Return) else ()
            return value + ((EXIT, kind),)
        if isinstance(stmt, ast.Raise):
            catcher = self.catches.of(fn).get(id(stmt))
            # caught here: the path leaves the try's body for its handler, left out below
            return ((EXIT, "raise", catcher),) if catcher is not None else (RAISE,)
        if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)):
            head = self.expr(stmt.iter if isinstance(stmt, (ast.For, ast.AsyncFor))
                             else stmt.test, fn, p2p)
            body = self.block(stmt.body, fn, p2p)
            loop: Seq = (("loop", body),) if has_ops(body) else ()
            return head + loop + self.block(stmt.orelse, fn, p2p)
        if is_try(stmt):
            # Handlers are left out: the normal path is what the two sides of a branch must agree
            # on, and a collective in a handler is a divergent gate of its own.
            body = resume(self.block(stmt.body, fn, p2p), id(stmt))
            return body + self.block(stmt.orelse, fn, p2p) + self.block(stmt.finalbody, fn, p2p)
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            entered: Seq = ()
            for item in stmt.items:
                entered += self.expr(item.context_expr, fn, p2p)
            return entered + self.block(stmt.body, fn, p2p)
        if isinstance(stmt, ast.Match):
            out = self.expr(stmt.subject, fn, p2p)
            cases = self.match_paths(stmt, fn, p2p)
            if cases and all(same(c, cases[0]) for c in cases):
                return out + cases[0]
            return out + (("alt",) + tuple(cases),)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return ()
        out = ()
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.expr):
                out += self.expr(child, fn, p2p)
        return out

    def match_paths(self, stmt: ast.Match, fn: Function, p2p: bool) -> List[Seq]:
        """One path per case, and an empty one where a subject may match none of them."""
        paths = [self.block(case.body, fn, p2p) for case in stmt.cases]
        if not any(_irrefutable(case) for case in stmt.cases):
            paths.append(())
        return paths

    def expr(self, node: Optional[ast.expr], fn: Function, p2p: bool) -> Seq:
        if node is None or isinstance(node, (ast.Constant, ast.Name, ast.Lambda)):
            return ()
        if isinstance(node, ast.IfExp):
            return self.expr(node.test, fn, p2p) + alt(self.expr(node.body, fn, p2p),
                                                         self.expr(node.orelse, fn, p2p))
        if isinstance(node, ast.BoolOp):
            out = self.expr(node.values[0], fn, p2p)
            for value in node.values[1:]:
                out += alt(self.expr(value, fn, p2p), ())
            return out
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            head: Seq = ()
            for gen in node.generators:
                head += self.expr(gen.iter, fn, p2p)
            parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            body: Seq = ()
            for part in parts:
                body += self.expr(part, fn, p2p)
            return head + ((("loop", body),) if has_ops(body) else ())
        seq: Seq = ()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                seq += self.expr(child, fn, p2p)
            elif isinstance(child, ast.keyword):
                seq += self.expr(child.value, fn, p2p)
        if isinstance(node, ast.Call):
            seq += self.call(node, fn, p2p)
        return seq

    def call(self, node: ast.Call, fn: Function, p2p: bool) -> Seq:
        target = self.program.target(node, fn)
        if target.collective is not None:
            if target.collective.point_to_point and not p2p:
                return ()
            return (Op(target.collective.op, communicator_text(node, target.collective)),)
        # A callee's names mean nothing here (its ``comm`` may be this function's
        # ``self.tp_comm``): its communicators are compared with none.
        seqs = [s for s in (self._callee(callee, p2p, constant_arguments(node, callee,
                                                                          target.bound))
                            for callee in target.functions)
                if s is not None]
        out: Seq = ()
        if seqs:
            first = seqs[0]
            out = first if all(same(s, first) for s in seqs) else (("alt",) + tuple(seqs),)
        for method in target.entered:  # in order: __enter__, then __exit__
            out += self._callee(method, p2p) or ()
        return out

    def _callee(self, callee: Function, p2p: bool, bindings: Bindings = ()) -> Optional[Seq]:
        if callee not in self.program.reach or self.program.is_rank_safe(callee):
            return None
        return anonymous(self.function(callee, p2p, bindings))


def gate_balanced(sequencer: Sequencer, gate: Gate, point_to_point: bool) -> bool:
    """Whether both paths a gate chooses between issue the same collectives.

    Loops are balanced only when their body issues none; exception handlers never are.
    """
    seq, node, fn, p2p = sequencer, gate.node, gate.fn, point_to_point
    if gate.kind == "if" and isinstance(node, ast.If):
        rest = list(gate.rest)
        return paths_equal(seq.block(node.body + rest, fn, p2p),
                           seq.block(node.orelse + rest, fn, p2p))
    if gate.kind == "if-expression" and isinstance(node, ast.IfExp):
        return paths_equal(seq.expr(node.body, fn, p2p), seq.expr(node.orelse, fn, p2p))
    if gate.kind == "match" and isinstance(node, ast.Match):
        cases = seq.match_paths(node, fn, p2p)
        return all(paths_equal(c, cases[0]) for c in cases)
    if gate.kind in ("and", "or") and isinstance(node, ast.expr):
        return not has_ops(seq.expr(node, fn, p2p))
    if gate.kind in ("for", "while") and isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
        return not has_ops(seq.block(node.body, fn, p2p))
    return False


def gate_issues(sequencer: Sequencer, gate: Gate) -> bool:
    """Whether the code a gate chooses between (its own sides, not what follows them) issues a
    collective: a value stored there came from it, not from before the gate."""
    seq, node, fn = sequencer, gate.node, gate.fn
    if isinstance(node, ast.If):
        sides = [seq.block(node.body, fn, False), seq.block(node.orelse, fn, False)]
    elif isinstance(node, ast.IfExp):
        sides = [seq.expr(node.body, fn, False), seq.expr(node.orelse, fn, False)]
    elif isinstance(node, ast.Match):
        sides = seq.match_paths(node, fn, False)
    elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
        sides = [seq.block(node.body, fn, False)]
    elif isinstance(node, ast.expr):
        sides = [seq.expr(node, fn, False)]
    else:
        return False
    return any(has_ops(side) for side in sides)
