"""The whole-program analysis: per-function summaries iterated to a fixed point.

Every function is interpreted with its parameters as placeholders; a round then recomputes what
each function returns, which parameters it hands to an in-place collective, what its callers pass
each parameter, and what every ``self`` attribute holds. Rounds repeat until nothing changes.

Parameters take what the analysed callers pass. With no analysed caller a parameter is rank-local,
except names that say they are configuration or the rank, and a set-up method's other parameters
(configuration).
A parameter a collective's contract makes symmetric (its group or root, see :mod:`_contracts`) is
symmetric whatever its callers pass.
"""

from __future__ import annotations

import ast
from typing import Dict, Iterator, List, Optional, Set, Tuple

from . import _presence as presence
from ._attributes import AttributeModel
from ._balance import Sequencer, gate_balanced, gate_issues
from ._callgraph import Function, Module, Program
from ._collectives import is_rank_name
from ._config import Config
from ._contracts import Contracts
from ._calls import bind
from ._facts import AttrWrite, CallRecord, Gate, gate_flow
from ._roles import Roles
from ._taint import FunctionAnalysis, function_globals
from ._values import SYMMETRIC, Taint, collapse, divergent, expand, join, local, rank

_MAX_ROUNDS = 8
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
        self.contracts = Contracts(program, self._callers, self.config)
        self.attributes = AttributeModel(program, config, self._callers)
        # Indexed once: scanning every function per module or per changed scope made a whole
        # package's analysis quadratic in its size.
        in_module: Dict[Module, List[Function]] = {}
        for f in program.functions:
            in_module.setdefault(f.module, []).append(f)
        self._rebound = {m: set().union(*map(function_globals, in_module.get(m, ())))
                         for m in program.modules}
        # scope -> the functions that read its final environment: nested ones, and for a
        # module's top-level code every other function of that module.
        self._enclosed: Dict[Function, List[Function]] = {}
        for f in program.functions:
            if f.name == "<module>":
                self._enclosed.setdefault(f, []).extend(
                    g for g in in_module[f.module] if g is not f and g.parent is not f)
            if f.parent is not None:
                self._enclosed.setdefault(f.parent, []).append(f)
        self._balance: Dict[Tuple[int, str, bool], bool] = {}
        self._issuing: Dict[int, bool] = {}
        self.roles = Roles(self.sequencer, self._gates_of, lambda: self.params)
        self.static_cache: Dict[int, Optional[Taint]] = {}
        self._contexts: Dict[Function, Tuple[Gate, ...]] = {}

    # -- Facts ------------------------------------------------------------------------------
    def key(self, fn: Function) -> str:
        return self._keys[fn]

    def attribute(self, fn: Function, name: str) -> Taint:
        if fn.cls is not None and "." not in name:
            method = self.program.class_method(fn.cls, name)
            if method is not None and method.is_property:
                return expand(self._returns.get(method, SYMMETRIC), self.params)
        return self.attributes.read(fn, name)

    def presence(self, fn: Function, name: str) -> Optional[Taint]:
        if fn.cls is not None:
            method = self.program.class_method(fn.cls, name)
            if method is not None and method.is_property:
                return None
        return self.attributes.taints.get((self.attributes.family(fn), presence.key(name)))

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

    def pairs_within(self, gate: Gate, point_to_point: bool) -> bool:
        root = gate.root
        issues = self._issuing.get(id(root.node))
        if issues is None:
            issues = self._issuing[id(root.node)] = gate_issues(self.sequencer, root)
        return issues and self.balanced(gate, point_to_point)

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

    def shaped_params(self, fn: Function) -> Set[str]:
        return self.contracts.shaped[fn]

    def _entry_params(self, fn: Function) -> Dict[str, Taint]:
        out: Dict[str, Taint] = {}
        for name in fn.params:
            if name in self.contracts.communicators[fn] or self.config.matches(
                    "symmetric_names", name):
                out[name] = SYMMETRIC
            elif is_rank_name(name, self.config):  # set-up's too: ``self.leader = rank == 0``
                out[name] = rank(name, "rank identity", getattr(fn.node, "lineno", 0))
            elif self.attributes.is_setup_root(fn):
                out[name] = SYMMETRIC
            else:
                out[name] = local(name, f"parameter of {fn.qualname}, which no analysed code "
                                  "calls", getattr(fn.node, "lineno", 0))
        return out

    def _writes(self) -> Iterator[Tuple[Function, AttrWrite, Taint]]:
        for fn in self.program.functions:
            result = self.results.get(fn)
            if result is not None:
                over = self._contexts.get(fn, ())
                for write in result.writes:
                    value = expand(write.taint, self.params)
                    yield fn, write, join(value, *(self._carried(g, value) for g in over))

    def _call_contexts(self) -> Dict[Function, Tuple[Gate, ...]]:
        """The gates over each function's analysed calls, and over its callers' calls: what it
        stores in ``self`` is stored on the ranks that called it, as if stored at the call.
        Set-up and teardown run on every rank, whoever calls them, and a call that reaches a
        collective is a finding of its own under such a gate: its callee's state would only
        echo it."""
        contexts: Dict[Function, Dict[int, Gate]] = {}
        for _ in range(_MAX_ROUNDS):
            changed = False
            for callee, callers in self._callers.items():
                if callee in self.attributes.setup or callee in self.attributes.teardown:
                    continue
                found = contexts.setdefault(callee, {})
                before = len(found)
                for caller, node in callers:
                    result = self.results.get(caller)
                    record = (result.calls.get(id(node))
                              if result is not None and node is not None else None)
                    if record is not None and self.program.call_reach(record.target) is None:
                        for gate in record.gates + tuple(contexts.get(caller, {}).values()):
                            found.setdefault(id(gate), gate)
                changed = changed or len(found) != before
            if not changed:
                break
        return {fn: tuple(gates.values()) for fn, gates in contexts.items() if gates}

    def _carried(self, gate: Gate, value: Taint) -> Taint:
        """What a gate over a call adds to a value the callee stores, as if stored there."""
        return gate_flow(self, gate, expand(gate.taint, self.params), value)

    def _update(self) -> Set[Function]:
        """Recompute the summaries; the functions whose inputs changed."""
        returns = {fn: r.returned for fn, r in self.results.items()}
        items = {fn: self.returned_items(fn) for fn in self.results}
        syncs = {fn: r.synced_params for fn, r in self.results.items()}
        self._contexts = self._call_contexts()
        setter_values = self.attributes.setter_values(self._writes())
        params: Dict[str, Dict[str, Taint]] = {}
        for fn in self.program.functions:
            params[self._keys[fn]] = self._passed(fn, setter_values.get(fn))
        before = dict(self.attributes.taints)
        self.attributes.uniform_teardown = {fn for fn in self.attributes.teardown
                                            if self._called_alike(fn)}
        self.attributes.lockstep = self._lockstep()
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
                pending.update(self._enclosed.get(scope, ()))
        self._returns, self._items, self._syncs, self.params = returns, items, syncs, params
        self.roles.forget()
        self._envs = envs
        return pending

    def _called_alike(self, fn: Function) -> bool:
        """No analysed call of ``fn`` is under a divergent gate, other than a teardown's, or one
        that asks only whether the object torn down exists (``if _TP: _TP.destroy()``): one that
        releases what it holds (``if self.ws is not None: self.ws.destroy()``) ends alike."""
        for caller, node in self._callers.get(fn, []):
            if caller in self.attributes.teardown:
                continue
            result = self.results.get(caller)
            record = result.calls.get(id(node)) if result is not None and node is not None else None
            if record is not None and any(divergent(expand(g.taint, self.params))
                                          and not _tests_presence_of(g, record.node.func)
                                          for g in record.gates):
                return False
        return True

    def _lockstep(self) -> Set[Function]:
        """Functions that issue a collective on every call (directly or through one that does),
        under no divergent gate: each rank's calls of one pair with every other rank's, or that
        collective is a finding, so what they store from symmetric values is stored alike."""
        found: Set[Function] = set()

        def pairs(record: CallRecord) -> bool:
            target = record.target
            if target.collective is not None:
                issues = not target.collective.point_to_point
            else:
                issues = bool(target.functions) and all(f in found for f in target.functions)
            return issues and not any(divergent(expand(g.taint, self.params))
                                      for g in record.gates)

        changed = True
        while changed:
            changed = False
            for fn, result in self.results.items():
                if fn not in found and any(map(pairs, result.calls.values())):
                    found.add(fn)
                    changed = True
        return found

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
        return {name: SYMMETRIC if name in self.contracts.communicators[fn] else collapse(
                    join(*values), name, f"parameter of {fn.qualname}; a caller passes", line)
                for name, values in passed.items()}


def _tests_presence_of(gate: Gate, func: ast.expr) -> bool:
    """``gate`` is ``if X:``, ``if X is not None:`` or those and'ed with ``X is not Y`` (an alias
    torn down elsewhere), with a call of a method of ``X`` in its body: the object is torn down
    either way."""
    if (gate.kind != "if" or not isinstance(func, ast.Attribute) or gate.test is None
            or not isinstance(gate.node, ast.If)
            or not any(n is func for stmt in gate.node.body for n in ast.walk(stmt))):
        return False
    held = ast.dump(func.value)
    test = gate.test
    parts = test.values if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]
    return all(ast.dump(part) == held or (
        isinstance(part, ast.Compare) and len(part.ops) == 1 and isinstance(part.ops[0], ast.IsNot)
        and ast.dump(part.left) == held) for part in parts)
