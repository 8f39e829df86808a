"""Parallel dimensions of collectives: which group a call's collectives run on, by naming.

A branch on one dimension's rank around a collective on another dimension's group is taken alike
by every member of that group: every rank of a tensor-parallel group sits on the same pipeline
stage, so ``if self.pp_rank == 0: self.tp_group.allreduce(x)`` cannot make them diverge. The
dimension of a collective is read from the words of its name, its receiver, its group keyword
(``group=``, ``dist_group=``...) and positional arguments whose names say they are communicators,
each with every name along its chain (``tp_gather``, ``self.tp_group``, ``group=get_pp_group()``,
``cp_group.cpu_group``); "*" marks a collective whose names carry none, such as the world's.
"""

from __future__ import annotations

import ast
from typing import Dict, FrozenSet

from ._callgraph import CallTarget, Function, Program
from ._collectives import GROUP_KEYWORDS, chain_identifiers, last_identifier, words

WORLD = "*"

# Spelled-out names of the default dimensions, as engines write them
# (``tensor_model_parallel_all_gather``, ``get_pipeline_model_parallel_rank``).
_SPELLED = (
    (("tensor", "model", "parallel"), "tp"), (("tensor", "parallel"), "tp"),
    (("pipeline", "model", "parallel"), "pp"), (("pipeline", "parallel"), "pp"),
    (("data", "parallel"), "dp"), (("context", "parallel"), "cp"),
    (("expert", "model", "parallel"), "ep"), (("expert", "parallel"), "ep"),
    (("sequence", "parallel"), "sp"),
)


def dimension_words(name: str) -> FrozenSet[str]:
    """The words of ``name``, with the short word of each spelled-out dimension in it."""
    found = words(name)
    extra = {short for phrase, short in _SPELLED
             if any(found[i:i + len(phrase)] == phrase for i in range(len(found)))}
    return frozenset(found) | extra


class Dimensions:
    """The dimensions every analysed function's collectives may run on, to a fixed point."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.known = frozenset(program.table.config.parallel_dimensions)
        self.reached: Dict[Function, FrozenSet[str]] = {}
        changed = True
        while changed:
            changed = False
            for fn in program.functions:
                found = frozenset().union(*(self.of_call(node, target)
                                            for node, target in program.calls[fn]))
                if found != self.reached.get(fn, frozenset()):
                    self.reached[fn] = found
                    changed = True

    def of_call(self, node: ast.Call, target: CallTarget) -> FrozenSet[str]:
        if target.collective is None:
            return frozenset().union(*(self.reached.get(f, frozenset())
                                       for f in target.functions))
        names = [target.collective.op]
        if isinstance(node.func, ast.Attribute):
            names += chain_identifiers(node.func.value)
        for kw in node.keywords:
            if kw.arg in GROUP_KEYWORDS:
                names += chain_identifiers(kw.value)
        for arg in node.args:
            # A group passed by position, as wrappers take it (broadcast_pyobj(data, rank, group))
            if self.program.table.is_communicator_name(last_identifier(arg) or ""):
                names += chain_identifiers(arg)
        found = {w for name in names for w in dimension_words(name)} & self.known
        return frozenset(found) if found else frozenset({WORLD})

    def disjoint(self, tested: str, node: ast.Call, target: CallTarget) -> bool:
        """The rank named in ``tested`` (a source text) is of dimensions none of the call's
        collectives spans; False when either side names no dimension."""
        ranks = set(dimension_words(tested)) & self.known
        dims = self.of_call(node, target)
        return bool(ranks) and WORLD not in dims and not ranks & dims
