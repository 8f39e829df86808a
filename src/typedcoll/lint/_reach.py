"""Which collective each analysed function reaches first, and what one call reaches.

A fixed point over the call graph: a function reaches what the first of its calls (in source
order) reaches, and a collective proper is preferred to a point-to-point op found earlier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import ast

    from ._callgraph import CallTarget, Function


@dataclass(frozen=True)
class Reach:
    """How a function reaches its first collective: ``chain`` from its callee down to the op."""

    collective: str
    chain: Tuple[str, ...]
    point_to_point: bool


def reachability(functions: List[Function],
                 calls: Dict[Function, List[Tuple[ast.Call, CallTarget]]],
                 rank_safe: Callable[[Function], bool]) -> Dict[Function, Reach]:
    """First collective (in source order) each function reaches; collectives over
    point-to-point ops."""
    reach: Dict[Function, Reach] = {}
    changed = True
    while changed:
        changed = False
        for fn in functions:
            best = _first_reach(calls[fn], reach, rank_safe)
            old = reach.get(fn)
            if best is not None and (old is None or (old.point_to_point
                                                     and not best.point_to_point)):
                reach[fn] = best
                changed = True
    return reach


def _first_reach(calls: List[Tuple[ast.Call, CallTarget]], reach: Dict[Function, Reach],
                 rank_safe: Callable[[Function], bool]) -> Optional[Reach]:
    fallback: Optional[Reach] = None
    for _, target in calls:
        found = call_reach(target, reach, rank_safe)
        if found is None:
            continue
        if not found.point_to_point:
            return found
        fallback = fallback or found
    return fallback


def call_reach(target: CallTarget, reach: Dict[Function, Reach],
               rank_safe: Callable[[Function], bool]) -> Optional[Reach]:
    """What a call reaches: the collective it is, or its first callee's reach."""
    if target.collective is not None:
        op = target.collective
        return Reach(op.display, (op.display,), op.point_to_point)
    fallback: Optional[Reach] = None
    for callee in target.functions + target.entered:
        if rank_safe(callee):
            continue
        inner = reach.get(callee)
        if inner is None:
            continue
        found = Reach(inner.collective, (callee.qualname,) + inner.chain, inner.point_to_point)
        if not found.point_to_point:
            return found
        fallback = fallback or found
    return fallback
