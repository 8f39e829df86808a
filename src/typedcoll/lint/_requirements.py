"""Configuration a function needs before it issues any collective, to excuse ``local or config``.

The buffer-and-drain fix calls its drain under ``if pending or self.enable_attention_dp:``, and the
drain's collective runs only under ``if self.enable_attention_dp ...:``. Whenever that collective
runs, the gate is true on every rank, whatever ``pending`` holds: the gate cannot make ranks
diverge. So a function's *requirement* is the set of symmetric conditions on ``self`` that hold on
every path to each of its collectives (the tests of the ``if`` statements around the call, split
at ``and``, and the requirements of the methods it calls on ``self``), and a rank-local ``or``
gate with one of those conditions among its operands is not reported.
"""

from __future__ import annotations

import ast
from typing import Dict, FrozenSet, Optional, Set

from ._analysis import Analysis
from ._callgraph import Function
from ._facts import CallRecord, Gate
from ._values import divergent, expand

_NONE: FrozenSet[str] = frozenset()


def _conjuncts(test: ast.expr) -> Set[str]:
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return set().union(*(_conjuncts(v) for v in test.values))
    text = ast.unparse(test)
    return {text} if "self." in text else set()


def _in_body(call: ast.Call, branch: ast.If) -> bool:
    if not branch.body:
        return False
    first, last = branch.body[0].lineno, branch.body[-1].end_lineno or branch.body[-1].lineno
    return first <= call.lineno <= last


class Requirements:
    """Memoised requirements of the analysed functions."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self._memo: Dict[Function, FrozenSet[str]] = {}

    def of(self, fn: Function) -> FrozenSet[str]:
        hit = self._memo.get(fn)
        if hit is not None:
            return hit
        self._memo[fn] = _NONE  # recursion: assume nothing while computing
        result = self.analysis.results.get(fn)
        found: Optional[Set[str]] = None
        if result is not None:
            for record in result.calls.values():
                if self.analysis.program.call_reach(record.target) is None:
                    continue
                site = self._site(record, fn)
                found = site if found is None else found & site
        self._memo[fn] = frozenset(found or ())
        return self._memo[fn]

    def _site(self, record: CallRecord, fn: Function) -> Set[str]:
        site: Set[str] = set()
        for gate in record.gates:
            node = gate.node
            if (gate.kind == "if" and isinstance(node, ast.If) and _in_body(record.node, node)
                    and not divergent(expand(gate.taint, self.analysis.params))):
                site |= _conjuncts(node.test)
        if record.target.collective is None:
            program = self.analysis.program
            callees = [c for c in record.target.functions
                       if c in program.reach and not program.is_rank_safe(c)]
            if callees and all(c.cls is not None and c.cls is fn.cls for c in callees):
                site |= set.intersection(*(set(self.of(c)) for c in callees))
        return site

    def excuses(self, gate: Gate, record: CallRecord) -> bool:
        """An ``if a or b:`` gate around a call whose callees need one of its operands."""
        node = gate.root.node
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.BoolOp)
                and isinstance(node.test.op, ast.Or) and _in_body(record.node, node)):
            return False
        program = self.analysis.program
        callees = [c for c in record.target.functions
                   if c in program.reach and not program.is_rank_safe(c)]
        if record.target.collective is not None or not callees:
            return False
        operands = {ast.unparse(v) for v in node.test.values}
        return all(operands & self.of(c) for c in callees)
