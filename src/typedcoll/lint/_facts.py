"""What the interpretation of one function records, and what it asks of the whole program."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Set, Tuple

from ._callgraph import CallTarget, Function, Program
from ._config import Config
from ._values import LOCAL, SYMMETRIC, Taint, only_synced


class Gate:
    """A condition code runs under; ``taint`` may still hold parameter placeholders.

    An early-exit gate (``early-return``...) is the ``if`` (or loop, or handler) holding a
    ``return``/``break``/``continue``, seen from the code that exit skips: it shares its
    ``origin``'s taint and balance.
    """

    __slots__ = ("kind", "node", "test", "_taint", "fn", "rest", "exit_line", "origin")

    def __init__(self, kind: str, node: ast.AST, test: Optional[ast.AST], taint: Taint,
                 fn: Function, rest: Tuple[ast.stmt, ...] = (), exit_line: int = 0,
                 origin: Optional["Gate"] = None) -> None:
        self.kind = kind
        self.node = node
        self.test = test
        self._taint = taint
        self.fn = fn
        self.rest = rest
        self.exit_line = exit_line
        self.origin = origin

    @property
    def taint(self) -> Taint:
        return self.origin._taint if self.origin is not None else self._taint

    @taint.setter
    def taint(self, value: Taint) -> None:
        self._taint = value

    @property
    def line(self) -> int:
        line: int = getattr(self.node, "lineno", 0)
        return line

    @property
    def root(self) -> "Gate":
        return self.origin if self.origin is not None else self


@dataclass
class CallRecord:
    node: ast.Call
    target: CallTarget
    gates: Tuple[Gate, ...]
    args: List[Taint]
    keywords: Dict[str, Taint]
    spread: Taint


@dataclass
class AttrWrite:
    name: str
    taint: Taint
    line: int
    mutation: bool


class Facts(Protocol):
    """What the analysis of one function needs to know about the rest of the program."""

    program: Program
    config: Config
    static_cache: Dict[int, Optional[Taint]]  # per AST node: verdicts that never change

    def key(self, fn: Function) -> str: ...
    def attribute(self, fn: Function, name: str) -> Taint: ...
    def presence(self, fn: Function, name: str) -> Optional[Taint]: ...  # None: not tracked
    def attribute_kinds(self, fn: Function, name: str) -> Set[str]: ...
    def returns(self, fn: Function) -> Taint: ...
    def returned_items(self, fn: Function) -> Optional[List[Taint]]: ...
    def syncs(self, fn: Function) -> Set[str]: ...
    def outer_name(self, fn: Function, name: str) -> Optional[Taint]: ...
    def accepted(self, fn: Function, first: int, last: int) -> bool: ...
    def balanced(self, gate: Gate, point_to_point: bool) -> bool: ...
    # balanced, and its sides issue a collective: what they return is every rank's
    def pairs_within(self, gate: Gate, point_to_point: bool) -> bool: ...
    def caught(self, fn: Function) -> Dict[int, int]: ...  # raise id -> id of the try catching it
    def shaped_params(self, fn: Function) -> Set[str]: ...  # tensors an all-reduce... takes


def gate_flow(facts: Facts, gate: Gate, taint: Taint, value: Taint, roles: bool = True,
              exits: bool = False) -> Taint:
    """What ``gate`` (its taint ``taint``) adds to ``value`` stored under it (implicit flow).

    An early return's gate matters to what a function returns (ranks that left returned
    something else) but not to a value stored after it: no rank that left reads it. A rank that
    left a loop (``break``, ``continue``, a handler's too) goes on and reads it, so those gates
    count. A handler's fallback value is taken as what every rank computes; ``roles`` False
    leaves out gates on the rank identity alone; a value from collectives the gate's balanced
    sides issue is every rank's.
    """
    left_loop = gate.kind in ("early-break", "early-continue")
    if not taint or (gate.origin is not None and not exits and not left_loop) or \
            (gate.root.kind == "except" and not left_loop):
        return SYMMETRIC
    local = any(s.kind == LOCAL for s in taint)
    if not roles and not local:
        return SYMMETRIC
    if only_synced(value) and facts.pairs_within(gate, point_to_point=local):
        return SYMMETRIC
    return taint
