"""The whole-program analysis: per-function summaries iterated to a fixed point.

Every function is interpreted with its parameters as placeholders; a round then recomputes what
each function returns, which parameters it hands to an in-place collective, what its callers pass
each parameter, and what every ``self`` attribute holds. Rounds repeat until nothing changes.

Parameters take what the analysed callers pass. With no analysed caller a parameter is rank-local,
except a set-up method's (configuration) and names that say they are configuration or the rank.
A parameter the function hands to a collective as its communicator (``group=pg``, ``pg.barrier()``)
or its root (names in ``src=``, ``root=``, ``dst=`` of a collective that is not point-to-point:
``src=self.ranks[src]``), or on to such a parameter of a callee, is symmetric whatever its
callers pass: every rank that takes part in a collective passes its group and its root, so a test
of the group (``isinstance(pg, ProcessGroup)``, ``group is not None`` for membership) is taken
alike by all of them, and ``rank == src`` is a test of the rank identity.
"""

from __future__ import annotations

import ast
import re
from typing import Dict, Iterator, List, Optional, Set, Tuple

from ._attributes import AttributeModel
from ._balance import Sequencer, gate_balanced
from ._callgraph import Function, Program, body_nodes
from ._collectives import communicator_text, is_rank_name
from ._config import Config
from ._calls import bind, bound_nodes
from ._facts import AttrWrite, Gate
from ._roles import Roles
from ._taint import FunctionAnalysis, function_globals
from ._values import SYMMETRIC, Taint, collapse, divergent, expand, join, local, rank

_MAX_ROUNDS = 8
_ROOT_KEYWORDS = ("root", "src", "dst", "group_src", "group_dst")
# Collectives whose tensors must have one dtype, shape and device on every rank, and the keywords
# that name such a tensor (besides the positional arguments).
# mpi4py's lowercase methods (allreduce, bcast, allgather) pickle any object: no shape is agreed.
_SHAPED_OPS = re.compile(r"all_reduce|Allreduce|broadcast|Bcast|all_gather|Allgather|"
                         r"reduce_scatter|Reduce_scatter")
_UNSHAPED_OPS = re.compile(r"obj|dict|gatherv|scatterv")
_BUFFER_KEYWORDS = ("tensor", "input", "input_", "inp", "buf")
Callers = Dict[Function, List[Tuple[Function, Optional[ast.Call]]]]


class Analysis:
    """Implements the ``Facts`` the per-function interpreter asks for, and runs the rounds."""

    def __init__(self, program: Program, config: Config) -> None:
        self.program = program
        self.config = config
        self.sequencer = Sequencer(program)
        self._keys = {fn: f"{fn.module.source.path}:{fn.qualname}" for fn in program.functions}
        self.results: Dict[Function, FunctionAnalysis] = {}
        self._returns: Dict[Function, Taint] = {}
        self._syncs: Dict[Function, Set[str]] = {}
        self._items: Dict[Function, Optional[List[Taint]]] = {}
        self._envs: Dict[Function, Dict[str, Taint]] = {}
        self.params: Dict[str, Dict[str, Taint]] = {}
        self._callers = self._caller_map()
        self.communicators = self._communicator_params()
        self.buffers = self._buffer_params()
        self.attributes = AttributeModel(program, config, self._callers)
        self._rebound = {m: set().union(*(function_globals(f) for f in program.functions
                                           if f.module is m)) for m in program.modules}
        self._balance: Dict[Tuple[int, str, bool], bool] = {}
        self.roles = Roles(self.sequencer, self._gates_of, lambda: self.params)
        self.static_cache: Dict[int, Optional[Taint]] = {}

    # -- Facts ------------------------------------------------------------------------------
    def key(self, fn: Function) -> str:
        return self._keys[fn]

    def attribute(self, fn: Function, name: str) -> Taint:
        if fn.cls is not None and "." not in name:
            method = self.program.class_method(fn.cls, name)
            if method is not None and method.is_property:
                return expand(self._returns.get(method, SYMMETRIC), self.params)
        return self.attributes.read(fn, name)

    def attribute_kinds(self, fn: Function, name: str) -> Set[str]:
        return self.attributes.kinds.get((self.attributes.family(fn), name), set())

    def returns(self, fn: Function) -> Taint:
        return self._returns.get(fn, SYMMETRIC)

    def returned_items(self, fn: Function) -> Optional[List[Taint]]:
        result = self.results.get(fn)
        if result is None or result.returns_other:
            return None
        return result.returned_items

    def syncs(self, fn: Function) -> Set[str]:
        return self._syncs.get(fn, set())

    def outer_name(self, fn: Function, name: str) -> Optional[Taint]:
        scope = fn.parent
        while scope is not None:
            result = self.results.get(scope)
            if result is not None and name in result.final_env:
                return result.final_env[name]
            scope = scope.parent
        top = fn.module.top
        if top is None or fn is top:
            return None
        result = self.results.get(top)
        found = result.final_env.get(name) if result is not None else None
        if name in self._rebound[fn.module]:
            return join(found or SYMMETRIC, local(name, "module state rebound by a function", 0))
        return found

    def accepted(self, fn: Function, first: int, last: int) -> bool:
        accepted = fn.module.source.accepted
        return bool(accepted) and any(line in accepted for line in range(first, last + 1))

    def balanced(self, gate: Gate, point_to_point: bool) -> bool:
        root = gate.root
        key = (id(root.node), root.kind, point_to_point)
        hit = self._balance.get(key)
        if hit is None:
            hit = self._balance[key] = gate_balanced(self.sequencer, root, point_to_point)
        # a branch on the rank identity alone may be a leader's and its followers' (_roles)
        return hit or (not point_to_point and root.kind == "if" and self.roles.led(root))

    def _gates_of(self, fn: Function) -> List[Gate]:
        result = self.results.get(fn)
        return result.all_gates() if result is not None else []

    def caught(self, fn: Function) -> Dict[int, int]:
        return self.sequencer.catches.of(fn)

    # -- rounds -----------------------------------------------------------------------------
    def _caller_map(self) -> Callers:
        callers: Callers = {}
        for caller, calls in self.program.calls.items():
            for node, target in calls:
                for callee in target.functions:
                    callers.setdefault(callee, []).append((caller, node))
        return callers

    def run(self) -> None:
        """Rounds to a fixed point; after the first, only the functions whose inputs changed
        (their parameters, their callees' results, the attributes and names they read) are
        interpreted again."""
        order = [m.top for m in self.program.modules if m.top is not None]
        order += [fn for fn in self.program.functions
                  if fn.parent is None and fn.name != "<module>"]
        order += [fn for fn in self.program.functions if fn.parent is not None]
        self.params = {self._keys[fn]: self._entry_params(fn) for fn in self.program.functions}
        pending: Set[Function] = set(order)
        for _ in range(_MAX_ROUNDS):
            for fn in order:
                if fn in pending:
                    self.results[fn] = FunctionAnalysis(fn, self).run()
            pending = self._update()
            if not pending:
                break

    def _communicator_params(self) -> Dict[Function, Set[str]]:
        """Each function's parameters that reach a collective as its communicator or root."""
        found: Dict[Function, Set[str]] = {fn: set() for fn in self.program.functions}
        changed = True
        while changed:
            changed = False
            for fn, calls in self.program.calls.items():
                for node, target in calls:
                    op = target.collective
                    if op is not None:
                        names = {communicator_text(node, op) or ""}
                        if not op.point_to_point:
                            names |= self._root_names(node)
                    else:
                        names = {arg.id for callee in target.functions
                                 for name, arg in bound_nodes(callee, target.bound, node).items()
                                 if name in found[callee] and isinstance(arg, ast.Name)}
                    new = (names & set(fn.params)) - found[fn]
                    if new:
                        found[fn] |= new
                        changed = True
        return found

    def shaped_params(self, fn: Function) -> Set[str]:
        return self.buffers[fn]

    def _buffer_params(self) -> Dict[Function, Set[str]]:
        """Each function's parameters that reach a collective as a tensor that must have one
        dtype, shape and device on every rank (``dist.all_reduce(tensor)``)."""
        found: Dict[Function, Set[str]] = {fn: set() for fn in self.program.functions}
        changed = True
        while changed:
            changed = False
            for fn, calls in self.program.calls.items():
                for node, target in calls:
                    op = target.collective
                    if op is not None:
                        if op.point_to_point or not _SHAPED_OPS.search(op.op) or (
                                _UNSHAPED_OPS.search(op.op)):
                            continue
                        # every positional argument: the tensor is not the first where a
                        # communicator is (all_gather_push(comm, local, out)); the others
                        # (a group, a root) have no shape to test
                        args = list(node.args) + [kw.value for kw in node.keywords
                                                  if kw.arg in _BUFFER_KEYWORDS]
                    else:
                        args = [arg for callee in target.functions for name, arg in
                                bound_nodes(callee, target.bound, node).items()
                                if name in found[callee]]
                    names = {a.id for a in args if isinstance(a, ast.Name)}
                    new = (names & set(fn.params)) - found[fn]
                    if new:
                        found[fn] |= new
                        changed = True
        return self._passed_alike(found)

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

    def _entry_params(self, fn: Function) -> Dict[str, Taint]:
        out: Dict[str, Taint] = {}
        for name in fn.params:
            if (self.attributes.is_setup_root(fn) or name in self.communicators[fn]
                    or self.config.matches("symmetric_names", name)):
                out[name] = SYMMETRIC
            elif is_rank_name(name, self.config):
                out[name] = rank(name, "rank identity", 0)
            else:
                out[name] = local(name, f"parameter of {fn.qualname}, which no analysed code "
                                  "calls", getattr(fn.node, "lineno", 0))
        return out

    def _writes(self) -> Iterator[Tuple[Function, AttrWrite, Taint]]:
        for fn in self.program.functions:
            result = self.results.get(fn)
            if result is not None:
                for write in result.writes:
                    yield fn, write, expand(write.taint, self.params)

    def _update(self) -> Set[Function]:
        """Recompute the summaries; the functions whose inputs changed."""
        returns = {fn: r.returned for fn, r in self.results.items()}
        items = {fn: self.returned_items(fn) for fn in self.results}
        syncs = {fn: r.synced_params for fn, r in self.results.items()}
        setter_values = self.attributes.setter_values(self._writes())
        params: Dict[str, Dict[str, Taint]] = {}
        for fn in self.program.functions:
            params[self._keys[fn]] = self._passed(fn, setter_values.get(fn))
        before = dict(self.attributes.taints)
        self.attributes.uniform_teardown = {fn for fn in self.attributes.teardown
                                            if self._called_alike(fn)}
        self.attributes.update(self._writes())
        pending: Set[Function] = set()
        for fn in self.program.functions:
            if params[self._keys[fn]] != self.params.get(self._keys[fn]):
                pending.add(fn)
            if (returns.get(fn) != self._returns.get(fn) or syncs.get(fn) != self._syncs.get(fn)
                    or items.get(fn) != self._items.get(fn)):
                pending.update(caller for caller, _ in self._callers.get(fn, []))
                if fn.is_property:
                    pending.update(self._readers({fn.name}))
        changed = {key[1] for key in set(before) | set(self.attributes.taints)
                   if before.get(key) != self.attributes.taints.get(key)}
        pending.update(self._readers(changed))
        envs = {fn: r.final_env for fn, r in self.results.items()}
        for scope, env in envs.items():
            if env != self._envs.get(scope):
                pending.update(f for f in self.program.functions
                               if f is not scope and (f.parent is scope or (
                                   scope.name == "<module>" and f.module is scope.module)))
        self._returns, self._items, self._syncs, self.params = returns, items, syncs, params
        self.roles.forget()
        self._envs = envs
        return pending

    def _called_alike(self, fn: Function) -> bool:
        """No analysed call of ``fn`` is under a divergent gate, other than a teardown's (one that
        releases what it holds, ``if self.ws is not None: self.ws.destroy()``, ends alike)."""
        for caller, node in self._callers.get(fn, []):
            if caller in self.attributes.teardown:
                continue
            result = self.results.get(caller)
            record = result.calls.get(id(node)) if result is not None and node is not None else None
            if record is not None and any(divergent(expand(g.taint, self.params))
                                          for g in record.gates):
                return False
        return True

    def _readers(self, names: Set[str]) -> Set[Function]:
        if not names:
            return set()
        return {fn for fn, result in self.results.items() if result.attribute_reads & names}

    def _passed(self, fn: Function, setter_value: Optional[Taint]) -> Dict[str, Taint]:
        """What the analysed callers pass each parameter of ``fn`` (collapsed to one cause)."""
        callers = self._callers.get(fn)
        if not callers or self.attributes.is_setup_root(fn):
            return self._entry_params(fn)
        passed: Dict[str, List[Taint]] = {name: [] for name in fn.params}
        if setter_value is not None and fn.params:
            passed[fn.params[0]].append(setter_value)
        for caller, node in callers:
            record = self.results[caller].calls.get(id(node)) if node is not None else None
            if node is None or record is None:
                continue  # a property assignment, or dead code in the caller
            for name, value in bind(fn, record.target.bound, node, record.args,
                                    record.keywords, record.spread).items():
                if name in passed:
                    passed[name].append(expand(value, self.params))
        line = getattr(fn.node, "lineno", 0)
        return {name: SYMMETRIC if name in self.communicators[fn] else collapse(
                    join(*values), name, f"parameter of {fn.qualname}; a caller passes", line)
                for name, values in passed.items()}
