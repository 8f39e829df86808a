"""A leader and its followers: a branch on the rank identity whose sides issue the same *set* of
collective sequences, the followers taking the one the leader picked.

SGLang's ``broadcast_pyobj``: under ``if rank == src:`` the root broadcasts a size and then,
unless it is 0, the payload; the other ranks broadcast into a size buffer and then receive the
payload unless the size they received is 0. Each side issues one broadcast or two, so path by path
the sides differ and the plain balance check reports the branch, and the root's own choice (on
the data only it holds) with it. But the receivers choose only on what a collective gave them,
the size the root sent, so they all take the path the root took. Such a branch is balanced when

- its test is an equality (``==``, ``!=``, ``is``, ``is not``): the leader's side, where the rank
  equals the one tested, is taken by one rank of the group, which has no peer to disagree with;
- every path of either side matches a path of the other (up to a final ``return``);
- every gate on the followers' side (its statements, and those after the branch) that changes
  which collectives they issue is on a value only collectives on that side produced (a vote taken
  before the branch says nothing of what the leader picks on its own data).

Gates on the leader's side are then excused too: they pick among paths the followers mirror.
"""

from __future__ import annotations

import ast
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ._balance import Sequencer, gate_balanced
from ._sequences import linear, one_path_equal
from ._callgraph import Function
from ._facts import Gate
from ._values import Taint, divergent, expand, only_synced, rank_local

Params = Mapping[str, Mapping[str, Taint]]


def sides(node: ast.AST) -> Optional[Tuple[List[ast.stmt], List[ast.stmt]]]:
    """The leader's and the followers' statements of an ``if`` testing an equality."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return None
    if len(node.test.ops) != 1:
        return None
    op = node.test.ops[0]
    if isinstance(op, (ast.Eq, ast.Is)):
        return node.body, node.orelse
    if isinstance(op, (ast.NotEq, ast.IsNot)):
        return node.orelse, node.body
    return None


def _within(stmts: Sequence[ast.stmt]) -> Set[int]:
    return {id(n) for stmt in stmts for n in ast.walk(stmt)}


class Roles:
    """Which role branches are led (memoised until :meth:`forget`)."""

    def __init__(self, sequencer: Sequencer, gates: Callable[[Function], List[Gate]],
                 params: Callable[[], Params]) -> None:
        self.sequencer = sequencer
        self._gates = gates
        self._params = params
        self._led: Dict[int, bool] = {}

    def forget(self) -> None:
        """Taints changed: whether followers choose on synced values may have too."""
        self._led.clear()

    def led(self, gate: Gate) -> bool:
        """Whether ``gate`` (an ``if`` on the rank identity) is a leader-and-followers branch."""
        key = id(gate.node)
        hit = self._led.get(key)
        if hit is None:
            hit = self._led[key] = self._check(gate)
        return hit

    def excused(self, gate: Gate, over: Sequence[Gate]) -> bool:
        """Whether ``gate`` lies on the leader's side of a led branch among ``over``."""
        for outer in over:
            root = outer.root
            split = sides(root.node)
            if root is gate.root or split is None or id(gate.root.node) not in _within(split[0]):
                continue
            taint = expand(root.taint, self._params())
            if divergent(taint) and not rank_local(taint) and self.led(root):
                return True
        return False

    def _check(self, gate: Gate) -> bool:
        split = sides(gate.node)
        if split is None:
            return False
        leader, followers = split
        rest = list(gate.rest)
        following = followers + rest
        if not following:
            return False
        seq, fn = self.sequencer, gate.fn
        lead = linear(seq.block(leader + rest, fn, False))
        follow = linear(seq.block(following, fn, False))
        if lead is None or follow is None:
            return False
        if not (all(any(one_path_equal(a, b) for b in follow) for a in lead)
                and all(any(one_path_equal(a, b) for a in lead) for b in follow)):
            return False
        inside = _within(following)
        span = range(following[0].lineno, (following[-1].end_lineno or 0) + 1)
        params = self._params()
        for inner in self._gates(fn):
            if inner.origin is not None or id(inner.node) not in inside:
                continue
            taint = expand(inner.taint, params)
            told = only_synced(taint) and all(source.line in span for source in taint)
            if not told and not gate_balanced(seq, inner, False):
                return False
        return True
