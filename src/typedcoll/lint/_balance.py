"""Collective sequences of code paths, to tell a divergent branch from a balanced one.

A branch is harmless, whatever its condition, when both of its paths issue the same sequence of
collectives: ``if rank == 0: comm.bcast(x) else: comm.bcast(None)``. A path runs from the branch to
the end of the scope its exits leave (the function for ``return``, the loop body for ``break`` and
``continue``), so ``if not work: comm.allgather(None); return`` followed by
``comm.allgather(work)`` is balanced too. Point-to-point operations are left out when comparing the
sides of a branch on the rank identity alone, where a send on one side and its receive on the
other is the normal pairing, and exception handlers are left out of every path. The same operation
on two communicators written out differently (``self.tp_comm.allgather`` and
``self.dp_comm.allgather``) is two different collectives.
"""

from __future__ import annotations

import ast
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union, cast

from ._callgraph import Function, Program, is_try
from ._collectives import communicator_text
from ._facts import Gate
from ._raises import Catches


class Op:
    """A collective in a sequence: its operation and, where the call writes it out, the source
    text of its communicator. Two match when their operations do and their communicators are not
    both known and different: a communicator left implicit may be any."""

    __slots__ = ("name", "comm")

    def __init__(self, name: str, comm: Optional[str]) -> None:
        self.name = name
        self.comm = comm

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Op):
            return NotImplemented
        return self.name == other.name and (
            self.comm is None or other.comm is None or self.comm == other.comm)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, {self.comm!r})"


Token = Union[Op, Tuple[object, ...]]
Seq = Tuple[Token, ...]

_EXIT = "exit"
_RAISE = ("raise",)
_MAX_PATHS = 64  # beyond this many paths through a side, only its structure is compared


def _branches(tok: Token) -> Optional[Tuple[Seq, Seq]]:
    """The two sides of an ``("alt", a, b)`` token; None for anything else."""
    if isinstance(tok, tuple) and len(tok) == 3 and tok[0] == "alt":
        return cast(Seq, tok[1]), cast(Seq, tok[2])
    return None


def _terminates(seq: Seq) -> bool:
    if not seq:
        return False
    last = seq[-1]
    if isinstance(last, tuple) and last and last[0] in (_EXIT, "raise"):
        return True
    sides = _branches(last)
    return sides is not None and _terminates(sides[0]) and _terminates(sides[1])


def _has_ops(seq: Seq) -> bool:
    """Whether any collective is issued on some path of ``seq`` (exits alone issue none)."""
    for tok in seq:
        if isinstance(tok, Op):
            return True
        if tok and tok[0] in ("alt", "loop") and any(
                _has_ops(cast(Seq, part)) for part in tok[1:]):
            return True
    return False


def _strict(seq: Seq) -> Tuple[object, ...]:
    """``seq`` with each collective as a plain tuple of its operation and communicator."""
    out: List[object] = []
    for tok in seq:
        if isinstance(tok, Op):
            out.append(("op", tok.name, tok.comm))
        elif tok and tok[0] in ("alt", "loop"):
            out.append((tok[0],) + tuple(_strict(cast(Seq, part)) for part in tok[1:]))
        else:
            out.append(tok)
    return tuple(out)


def _same(a: Seq, b: Seq) -> bool:
    """Equal communicators included: two sides merge into one only then, so that a communicator
    one side leaves implicit does not take the other side's name (or lose it)."""
    return a == b and _strict(a) == _strict(b)


def _alt(a: Seq, b: Seq) -> Seq:
    if _same(a, b):
        return a
    if not (_has_ops(a) or _has_ops(b)) and not (_terminates(a) and _terminates(b)):
        return ()  # the two sides differ only in exits that skip no collective
    return (("alt", a, b),)


def _resume(seq: Seq, catcher: int) -> Seq:
    """``seq`` with the raises ``catcher`` catches no longer ending their paths: those go on
    after the ``try`` (its handlers are left out of every path)."""
    out: List[Token] = []
    for tok in seq:
        if tok == (_EXIT, "raise", catcher):
            break
        sides = _branches(tok)
        if sides is not None:
            out.extend(_alt(_resume(sides[0], catcher), _resume(sides[1], catcher)))
        elif isinstance(tok, tuple) and tok and tok[0] in ("alt", "loop"):
            out.append((tok[0],) + tuple(_resume(cast(Seq, p), catcher) for p in tok[1:]))
        else:
            out.append(tok)
    return tuple(out)


def _anonymous(seq: Seq) -> Seq:
    """``seq`` with every communicator left implicit."""
    out: List[Token] = []
    for tok in seq:
        if isinstance(tok, Op):
            out.append(Op(tok.name, None) if tok.comm is not None else tok)
        elif tok and tok[0] in ("alt", "loop"):
            out.append((tok[0],) + tuple(_anonymous(cast(Seq, part)) for part in tok[1:]))
        else:
            out.append(tok)
    return tuple(out)


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


def _linear(seq: Seq) -> Optional[List[Seq]]:
    """Every path through the alternatives in ``seq``; None when there are too many to list."""
    paths: List[Seq] = [()]
    for tok in seq:
        if not (isinstance(tok, tuple) and tok and tok[0] == "alt"):
            paths = [path + (tok,) for path in paths]
            continue
        sides: List[Seq] = []
        for part in tok[1:]:
            found = _linear(cast(Seq, part))
            if found is None:
                return None
            sides += found
        paths = [path + side for path in paths for side in sides]
        if len(paths) > _MAX_PATHS:
            return None
    return paths


def _one_path_equal(a: Seq, b: Seq) -> bool:
    def trim(seq: Seq) -> Seq:
        while seq and seq[-1] in ((_EXIT, "return"), (_EXIT, "continue")):
            seq = seq[:-1]
        return seq
    a, b = trim(a), trim(b)
    if (a and a[-1] == _RAISE) or (b and b[-1] == _RAISE):
        return True
    return a == b


def paths_equal(a: Seq, b: Seq) -> bool:
    """Two paths issue the same collectives (an exception raised on either ends that rank).

    Alternatives inside them match alike, or else every path through one side must match every
    path through the other: a collective in a callee, whose communicator is left implicit,
    matches either side of ``if pynccl: pynccl.all_gather(x) else: self.all_gather(x)``.
    """
    if _one_path_equal(a, b):
        return True
    paths_a, paths_b = _linear(a), _linear(b)
    if paths_a is None or paths_b is None or (len(paths_a) == 1 and len(paths_b) == 1):
        return False
    return all(_one_path_equal(x, y) for x in paths_a for y in paths_b)


class Sequencer:
    """Collective sequences of statements, expressions and functions (memoised per function)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.catches = Catches(program)
        self._functions: Dict[Tuple[Function, bool], Seq] = {}
        self._active: Set[Tuple[Function, bool]] = set()

    def function(self, fn: Function, p2p: bool) -> Seq:
        key = (fn, p2p)
        hit = self._functions.get(key)
        if hit is not None:
            return hit
        if key in self._active:
            return (("call", fn.qualname),)
        self._active.add(key)
        try:
            body = fn.node.body
            seq = self.block(body, fn, p2p)
            # the function's own returns end its path, not its caller's
            seq = self._strip_returns(seq)
        finally:
            self._active.discard(key)
        self._functions[key] = seq
        return seq

    def _strip_returns(self, seq: Seq) -> Seq:
        out: List[Token] = []
        for tok in seq:
            if tok == (_EXIT, "return"):
                break
            sides = _branches(tok)
            if sides is not None:
                then, other = self._strip_returns(sides[0]), self._strip_returns(sides[1])
                if _same(then, other):
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
                then = self.block(stmt.body, fn, p2p)
                other = self.block(stmt.orelse, fn, p2p)
                if _terminates(then) or _terminates(other):
                    rest = self.block(stmts[index + 1:], fn, p2p)
                    then = then if _terminates(then) else then + rest
                    other = other if _terminates(other) else other + rest
                    out.extend(_alt(then, other))
                    return tuple(out)
                out.extend(_alt(then, other))
                continue
            seq = self.statement(stmt, fn, p2p)
            out.extend(seq)
            if _terminates(seq):
                break
        return tuple(out)

    def statement(self, stmt: ast.stmt, fn: Function, p2p: bool) -> Seq:
        if isinstance(stmt, (ast.Return, ast.Break, ast.Continue)):
            kind = {ast.Return: "return", ast.Break: "break", ast.Continue: "continue"}[type(stmt)]
            value = self.expr(stmt.value, fn, p2p) if isinstance(stmt, ast.Return) else ()
            return value + ((_EXIT, kind),)
        if isinstance(stmt, ast.Raise):
            catcher = self.catches.of(fn).get(id(stmt))
            # caught here: the path leaves the try's body for its handler, left out below
            return ((_EXIT, "raise", catcher),) if catcher is not None else (_RAISE,)
        if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)):
            head = self.expr(stmt.iter if isinstance(stmt, (ast.For, ast.AsyncFor))
                             else stmt.test, fn, p2p)
            body = self.block(stmt.body, fn, p2p)
            loop: Seq = (("loop", body),) if _has_ops(body) else ()
            return head + loop + self.block(stmt.orelse, fn, p2p)
        if is_try(stmt):
            # Handlers are left out: the normal path is what the two sides of a branch must agree
            # on, and a collective in a handler is a divergent gate of its own.
            body = _resume(self.block(stmt.body, fn, p2p), id(stmt))
            return body + self.block(stmt.orelse, fn, p2p) + self.block(stmt.finalbody, fn, p2p)
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            entered: Seq = ()
            for item in stmt.items:
                entered += self.expr(item.context_expr, fn, p2p)
            return entered + self.block(stmt.body, fn, p2p)
        if isinstance(stmt, ast.Match):
            out = self.expr(stmt.subject, fn, p2p)
            cases = self.match_paths(stmt, fn, p2p)
            if cases and all(_same(c, cases[0]) for c in cases):
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
            return self.expr(node.test, fn, p2p) + _alt(self.expr(node.body, fn, p2p),
                                                         self.expr(node.orelse, fn, p2p))
        if isinstance(node, ast.BoolOp):
            out = self.expr(node.values[0], fn, p2p)
            for value in node.values[1:]:
                out += _alt(self.expr(value, fn, p2p), ())
            return out
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            head: Seq = ()
            for gen in node.generators:
                head += self.expr(gen.iter, fn, p2p)
            parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            body: Seq = ()
            for part in parts:
                body += self.expr(part, fn, p2p)
            return head + ((("loop", body),) if _has_ops(body) else ())
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
        seqs = [s for s in (self._callee(callee, p2p) for callee in target.functions)
                if s is not None]
        out: Seq = ()
        if seqs:
            first = seqs[0]
            out = first if all(_same(s, first) for s in seqs) else (("alt",) + tuple(seqs),)
        for method in target.entered:  # in order: __enter__, then __exit__
            out += self._callee(method, p2p) or ()
        return out

    def _callee(self, callee: Function, p2p: bool) -> Optional[Seq]:
        if callee not in self.program.reach or self.program.is_rank_safe(callee):
            return None
        return _anonymous(self.function(callee, p2p))


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
        return not _has_ops(seq.expr(node, fn, p2p))
    if gate.kind in ("for", "while") and isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
        return not _has_ops(seq.block(node.body, fn, p2p))
    return False
