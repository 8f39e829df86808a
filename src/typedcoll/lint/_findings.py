"""Findings: for each call that is or reaches a collective, the divergent gates over it.

A gate counts when its condition, with parameters expanded, depends on a rank-local value or on
the rank identity, it is not accepted by a ``# typedcoll: symmetric (reason)`` comment, and its
two paths issue different collectives. A gate on the rank identity alone is also skipped for
point-to-point operations (sends and receives pair by rank on purpose) and when the collective runs
on a group of another parallel dimension than the rank it tests (``if self.pp_rank == 0:`` around
a tensor-parallel all-reduce: every member of that group has the same ``pp_rank``). An ``or`` gate
is skipped when one operand is configuration the callee needs anyway (see :mod:`_requirements`).
"""

from __future__ import annotations

import ast
from typing import Dict, List, Optional, Set, Tuple

from ._analysis import Analysis
from ._callgraph import Function, Module
from ._dimensions import Dimensions
from ._facts import CallRecord, Gate
from ._model import RANK_LOCAL_GATE, UNBALANCED_RANK_BRANCH, Finding, GateInfo
from ._reach import Reach
from ._requirements import Requirements
from ._values import RANK, Taint, divergent, expand, first_cause, rank_local

_TEXT_WIDTH = 100


def findings(analysis: Analysis) -> List[Finding]:
    """Every gated collective, one per (path, line), sorted."""
    return _Findings(analysis).collect()


class _Findings:
    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.requirements = Requirements(analysis)
        self.dimensions = Dimensions(analysis.program)

    def collect(self) -> List[Finding]:
        merged: Dict[Tuple[str, int], Finding] = {}
        for fn, result in self.analysis.results.items():
            for record in result.calls.values():
                reach = self.analysis.program.call_reach(record.target)
                if reach is None:
                    continue
                gates, any_local = self._divergent_gates(record, reach, fn)
                if not gates:
                    continue
                rule = RANK_LOCAL_GATE if any_local else UNBALANCED_RANK_BRANCH
                path = fn.module.source.path
                line = record.node.lineno
                found = Finding(path, line, record.node.col_offset + 1, rule, fn.qualname,
                                reach.collective, (fn.qualname,) + reach.chain, tuple(gates))
                old = merged.get((path, line))
                if old is None or (old.column > found.column):
                    merged[(path, line)] = found
        return sorted(merged.values(), key=lambda f: (f.path, f.line, f.column))

    def _divergent_gates(self, record: CallRecord, reach: Reach, fn: Function
                         ) -> Tuple[List[GateInfo], bool]:
        """The unaccepted, unbalanced gates over a call on divergent values; and whether any is
        rank-local (rather than on the rank identity alone)."""
        out: List[GateInfo] = []
        any_local = False
        seen: Set[int] = set()
        for gate in record.gates:
            root = gate.root
            if id(root) in seen:
                continue
            test_end = getattr(root.test, "end_lineno", None) or root.line
            if self.analysis.accepted(fn, root.line, max(test_end, root.line)):
                continue
            taint = expand(gate.taint, self.analysis.params)
            if not divergent(taint):
                continue
            is_local = rank_local(taint)
            if not is_local and (reach.point_to_point or self._other_dimension(taint, record)):
                continue
            if (self.analysis.balanced(gate, point_to_point=is_local)
                    or self.requirements.excuses(gate, record)
                    or self.analysis.roles.excused(gate, record.gates)):
                continue
            seen.add(id(root))
            any_local = any_local or is_local
            text = self._text(root, fn.module)
            cause = first_cause(taint, text).describe()
            out.append(GateInfo(root.line, gate.kind, text, cause, gate.exit_line))
        return out, any_local

    def _other_dimension(self, taint: Taint, record: CallRecord) -> bool:
        """Every rank the gate tests is of a dimension the call's collectives do not span."""
        ranks = [s.text + " " + s.owner for s in taint if s.kind == RANK]
        return bool(ranks) and all(self.dimensions.disjoint(text, record.node, record.target)
                                   for text in ranks)

    def _text(self, gate: Gate, module: Module) -> str:
        node = gate.node
        lines = module.source.lines
        if gate.kind == "except":
            head = _except_clause(lines, node) + (
                f" {segment(lines, gate.test)}" if gate.test is not None else "")
        elif gate.kind == "for" and isinstance(node, (ast.For, ast.AsyncFor)):
            head = f"for {segment(lines, node.target)} in {segment(lines, node.iter)}"
        elif gate.kind == "for":
            head = f"for ... in {segment(lines, gate.test)}"
        elif gate.kind in ("if", "while", "match") and isinstance(node, ast.stmt):
            head = f"{gate.kind} {segment(lines, gate.test)}"
        else:
            head = segment(lines, gate.test)
        return head if len(head) <= _TEXT_WIDTH else head[:_TEXT_WIDTH - 3] + "..."


def _except_clause(lines: List[str], handler: ast.AST) -> str:
    """``except`` or ``except*``: the handler's node does not say which, its source does."""
    line: int = getattr(handler, "lineno", 0)
    start: int = getattr(handler, "col_offset", 0)
    if not 0 < line <= len(lines):
        return "except"
    rest = lines[line - 1].encode("utf-8")[start:].decode("utf-8", "replace")
    return "except*" if rest[len("except"):].lstrip().startswith("*") else "except"


def segment(lines: List[str], node: Optional[ast.AST]) -> str:
    """The source of ``node`` on one line (columns are UTF-8 byte offsets)."""
    first: int = getattr(node, "lineno", 0)
    if not first:
        return ""
    last: int = getattr(node, "end_lineno", None) or first
    start: int = getattr(node, "col_offset", 0)
    end: Optional[int] = getattr(node, "end_col_offset", None)
    chunk = [line.encode("utf-8") for line in lines[first - 1:last]]
    if not chunk:
        return ""
    if len(chunk) == 1:
        parts = [chunk[0][start:end]]
    else:
        parts = [chunk[0][start:]] + chunk[1:-1] + [chunk[-1][:end]]
    text = " ".join(p.decode("utf-8", "replace").strip() for p in parts)
    return " ".join(text.split())
