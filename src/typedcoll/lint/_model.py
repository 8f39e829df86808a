"""Findings as plain frozen records, ready for ``json.dumps`` through :meth:`Finding.to_json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

# A collective, or a call that reaches one, under a condition that depends on a rank-local value.
RANK_LOCAL_GATE = "collective-under-rank-local-gate"
# A collective under a branch on the rank identity whose sides issue different collectives.
UNBALANCED_RANK_BRANCH = "collective-under-unbalanced-rank-branch"

RULES = (RANK_LOCAL_GATE, UNBALANCED_RANK_BRANCH)


@dataclass(frozen=True)
class GateInfo:
    """One condition a gated collective depends on.

    ``kind`` is ``if``, ``while``, ``for``, ``except``, ``and``/``or`` (a short-circuit operand),
    ``if-expression``, ``match``, or ``early-return`` / ``early-break`` / ``early-continue`` /
    ``early-raise`` (then ``line`` and ``text`` are the condition's and ``exit_line`` the exit
    statement's: a ``raise`` is one when a handler of the same function catches it).
    ``source`` names the rank-local value the condition depends on, and where it comes from.
    """

    line: int
    kind: str
    text: str
    source: str
    exit_line: int = 0

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"line": self.line, "kind": self.kind, "text": self.text,
                               "source": self.source}
        if self.exit_line:
            out["exit_line"] = self.exit_line
        return out


@dataclass(frozen=True)
class Finding:
    """A collective reached under a rank-divergent condition.

    ``line`` is the line of the call, in ``function`` (the function holding the gates), that is
    or reaches ``collective``; ``chain`` lists the calls from ``function`` down to it.
    """

    path: str
    line: int
    column: int
    rule: str
    function: str
    collective: str
    chain: Tuple[str, ...]
    gates: Tuple[GateInfo, ...]

    def to_json(self) -> Dict[str, Any]:
        gates: List[Dict[str, Any]] = [g.to_json() for g in self.gates]
        return {"path": self.path, "line": self.line, "column": self.column, "rule": self.rule,
                "function": self.function, "collective": self.collective,
                "chain": list(self.chain), "gates": gates}
