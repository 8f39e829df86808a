"""Parameters whose symmetry a collective's own contract gives, whatever the callers pass.

- Communicators and roots: a parameter a function hands to a collective as its communicator
  (``group=pg``, ``pg.barrier()``) or its root (names in ``src=``, ``root=``, ``dst=`` of a
  collective that is not point-to-point: ``src=self.ranks[src]``), or on to such a parameter of a
  callee. Every rank that takes part in a collective passes its group and its root, so a test of
  the group (``isinstance(pg, ProcessGroup)``, ``group is not None`` for membership) is taken
  alike by all of them, and ``rank == src`` is a test of the rank identity.
- Shaped tensors: a parameter handed to an all-reduce, a broadcast, an all-gather or a
  reduce-scatter of tensors, or on to such a parameter of a callee, or that every analysed caller
  fills with such a tensor of its own: those collectives need one dtype, shape and device on every
  rank, so what those say is symmetric (:mod:`_expressions` reads them while the name still holds
  the parameter).
"""

from __future__ import annotations

import ast
import re
from typing import Callable, Dict, List, Optional, Set, Tuple

from ._callgraph import Function, Program
from ._calls import bound_nodes
from ._collectives import CollectiveOp, communicator_text, is_rank_name
from ._config import Config
from ._definitions import body_nodes

_ROOT_KEYWORDS = ("root", "src", "dst", "group_src", "group_dst")
# Collectives whose tensors must have one dtype, shape and device on every rank, and the keywords
# that name such a tensor (besides the positional arguments).
# mpi4py's lowercase methods (allreduce, bcast, allgather) pickle any object: no shape is agreed.
_SHAPED_OPS = re.compile(r"all_reduce|Allreduce|broadcast|Bcast|all_gather|Allgather|"
                         r"reduce_scatter|Reduce_scatter")
_UNSHAPED_OPS = re.compile(r"obj|dict|gatherv|scatterv")
_BUFFER_KEYWORDS = ("tensor", "input", "input_", "inp", "buf")

Callers = Dict[Function, List[Tuple[Function, Optional[ast.Call]]]]


class Contracts:
    """``communicators`` and ``shaped``: each function's parameters of either kind."""

    def __init__(self, program: Program, callers: Callers, config: Config) -> None:
        self.program = program
        self.config = config
        self._callers = callers
        self.communicators = self._communicator_params()
        self.shaped = self._buffer_params()

    def _communicator_params(self) -> Dict[Function, Set[str]]:
        """Each function's parameters that reach a collective as its communicator or root."""
        def named(node: ast.Call, op: CollectiveOp) -> Set[str]:
            names = {communicator_text(node, op) or ""}
            return names if op.point_to_point else names | self._root_names(node)
        return self._reaching(named)

    def _buffer_params(self) -> Dict[Function, Set[str]]:
        """Each function's parameters that reach a collective as a tensor that must have one
        dtype, shape and device on every rank (``dist.all_reduce(tensor)``)."""
        def named(node: ast.Call, op: CollectiveOp) -> Set[str]:
            if op.point_to_point or not _SHAPED_OPS.search(op.op) or _UNSHAPED_OPS.search(op.op):
                return set()
            # every positional argument: the tensor is not the first where a communicator is
            # (all_gather_push(comm, local, out)); the others (a group, a root) have no shape
            args = list(node.args) + [kw.value for kw in node.keywords
                                      if kw.arg in _BUFFER_KEYWORDS]
            return {a.id for a in args if isinstance(a, ast.Name)}
        return self._passed_alike(self._reaching(named))

    def _reaching(self, named: Callable[[ast.Call, CollectiveOp], Set[str]]
                  ) -> Dict[Function, Set[str]]:
        """Each function's parameters that ``named`` finds in a collective's call, or that it
        hands on to such a parameter of a function it calls, to a fixpoint."""
        found: Dict[Function, Set[str]] = {fn: set() for fn in self.program.functions}
        changed = True
        while changed:
            changed = False
            for fn, calls in self.program.calls.items():
                for node, target in calls:
                    if target.collective is not None:
                        names = named(node, target.collective)
                    else:
                        names = {arg.id for callee in target.functions
                                 for name, arg in bound_nodes(callee, target.bound, node).items()
                                 if name in found[callee] and isinstance(arg, ast.Name)}
                    new = (names & set(fn.params)) - found[fn]
                    if new:
                        found[fn] |= new
                        changed = True
        return found

    def _passed_alike(self, found: Dict[Function, Set[str]]) -> Dict[Function, Set[str]]:
        """Add the parameters every analysed caller fills with such a tensor of its own, never
        rebound there: a helper that sizes the tensor (``fits(tensor)``) sees it alike too."""
        rebound = {fn: {n.id for n in body_nodes(fn.node) if isinstance(n, ast.Name)
                        and isinstance(n.ctx, ast.Store)} for fn in self.program.functions}
        changed = True
        while changed:
            changed = False
            for fn in self.program.functions:
                callers = self._callers.get(fn, [])
                if not callers or any(node is None for _, node in callers):
                    continue
                passed: Dict[str, bool] = {}
                for caller, node in callers:
                    if node is None:
                        continue
                    target = self.program.target(node, caller)
                    for name, arg in bound_nodes(fn, target.bound, node).items():
                        alike = (isinstance(arg, ast.Name) and arg.id in found[caller]
                                 and arg.id not in rebound[caller])
                        passed[name] = passed.get(name, True) and alike
                new = {name for name in fn.params if passed.get(name)} - found[fn]
                if new:
                    found[fn] |= new
                    changed = True
        return found

    def _root_names(self, node: ast.Call) -> Set[str]:
        """Names a rooted collective's root is computed from (``src=self.ranks[src]``); the rank
        identity is left out (a root of ``rank`` would be each rank's own)."""
        return {name.id for kw in node.keywords if kw.arg in _ROOT_KEYWORDS
                for name in ast.walk(kw.value) if isinstance(name, ast.Name)
                and not is_rank_name(name.id, self.config)}
