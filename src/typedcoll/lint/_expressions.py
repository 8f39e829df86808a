"""Values in one function: which expressions are symmetric, which rank-local, and why.

Locals are tracked flow-sensitively by the statement walk of :mod:`_taint`; this module evaluates
expressions against them, records each call with the gates over it, and records what is stored in
``self`` attributes. Assignments carry implicit flows: a variable assigned under a divergent gate
is divergent, unless the gate is balanced and the value came from a collective.
"""

from __future__ import annotations

import ast
import re
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

from ._balance import exits_in
from ._callgraph import CallTarget, Function
from ._calls import (bind, bound_nodes, decorates, self_attribute, shape_copy,
                     static_attribute, static_call, wraps)
from ._collectives import OUTPUT_KEYWORDS, dotted_name, is_rank_name, received_into
from ._facts import AttrWrite, CallRecord, Facts, Gate, gate_flow
from ._presence import PresenceTracking, asked
from ._values import (SYMMETRIC, SYNCED, Taint, collapse, join, local, only_synced, param,
                      rank, substitute, synced)

# A scatter's, an all-to-all's or a reduce-scatter's result is each rank's own part.
_PARTS = re.compile(r"scatter|alltoall|all_to_all", re.IGNORECASE)

# What every rank's tensor of a shape-bound collective has alike (values and layout are its own).
_SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "is_cpu", "is_cuda", "nbytes", "ndim",
                               "itemsize"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "element_size", "get_device"})
_MUTATORS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "put",
                       "put_nowait", "appendleft", "extendleft", "remove", "discard", "pop",
                       "popleft", "popitem", "clear", "sort", "reverse", "push"})


class ValueAnalysis(PresenceTracking):
    """The values of one function's expressions and variables; :class:`FunctionAnalysis` adds
    the statements and the control flow."""

    def __init__(self, fn: Function, facts: Facts) -> None:
        self.fn = fn
        self.facts = facts
        self.config = facts.config
        self.key = facts.key(fn)
        self.env: Dict[str, Taint] = {}
        # What each local was bound to, joined over the whole function, without the values
        # written into it since (``x[i] = v``): all that its shape, dtype and device can follow.
        self.bound: Dict[str, Taint] = {}
        self.calls: Dict[int, CallRecord] = {}
        self.writes: List[AttrWrite] = []
        self.returned: Taint = SYMMETRIC
        # per position, while every return statement returns a tuple of one length
        self.returned_items: Optional[List[Taint]] = None
        self.returns_other = False
        self.attribute_reads: Set[str] = set()  # to know whom a changed attribute affects
        self.synced_params: Set[str] = set()
        self.frames: List[Tuple[Sequence[ast.stmt], int, bool]] = []
        self.final_env: Dict[str, Taint] = {}
        self._gates: Dict[Tuple[str, int], Gate] = {}
        for name in fn.params:
            self.rebind(name, param(self.key, name))

    def rebind(self, name: str, value: Taint) -> None:
        self.env[name] = value
        self.bound[name] = join(self.bound.get(name, SYMMETRIC), value)

    def all_gates(self) -> List[Gate]:
        return list(self._gates.values())

    def gate(self, kind: str, node: ast.AST, test: Optional[ast.AST], taint: Taint,
             branches: Optional[List[ast.stmt]] = None) -> Gate:
        """The gate of ``node``, one object however often a loop revisits it; taints grow."""
        key = (kind, id(node))
        found = self._gates.get(key)
        if found is None:
            rest = self.rest_for(branches) if branches is not None else ()
            found = self._gates[key] = Gate(kind, node, test, taint, self.fn, rest)
        elif taint != found.taint:
            found.taint = join(found.taint, taint)
        return found

    def rest_for(self, branches: List[ast.stmt]) -> Tuple[ast.stmt, ...]:
        """Statements after a branch, up to the scope its exits leave (for balance checks)."""
        has_return, has_loop_exit = exits_in(branches)
        if not (has_return or has_loop_exit):
            return ()
        rest: List[ast.stmt] = []
        for stmts, start, loop_body in reversed(self.frames):
            rest.extend(stmts[start:])
            if loop_body and not has_return:
                break
        return tuple(rest)

    # -- assignments ------------------------------------------------------------------------
    def implicit(self, ctrl: Tuple[Gate, ...], value: Taint, roles: bool = True,
                 exits: bool = False) -> Taint:
        """What the gates over an assignment add to the assigned value (``gate_flow``)."""
        return join(*(gate_flow(self.facts, gate, gate.taint, value, roles, exits)
                      for gate in ctrl))

    def record_return(self, value_node: Optional[ast.expr], ctrl: Tuple[Gate, ...]) -> None:
        """What a ``return`` (or ``yield``) hands the caller; a tuple is also kept per position,
        so that ``ok, batch = self._step()`` can tell its two values apart."""
        if value_node is None:
            self.returns_other = True
            return
        if isinstance(value_node, ast.Tuple) and not any(isinstance(e, ast.Starred)
                                                          for e in value_node.elts):
            items = [self.expr(e, ctrl) for e in value_node.elts]
            items = [join(t, self.implicit(ctrl, t, exits=True)) for t in items]
            if self.returned_items is None:
                self.returned_items = items
            elif len(self.returned_items) == len(items):
                self.returned_items = [join(a, b) for a, b in zip(self.returned_items, items)]
            else:
                self.returns_other = True
            self.returned = join(self.returned, *items)
            return
        self.returns_other = True
        value = self.expr(value_node, ctrl)
        self.returned = join(self.returned, value, self.implicit(ctrl, value, exits=True))

    def assign_statement(self, stmt: Union[ast.Assign, ast.AnnAssign, ast.AugAssign],
                         ctrl: Tuple[Gate, ...]) -> None:
        value_node = stmt.value
        if value_node is None:  # a bare annotation
            return
        value = self.expr(value_node, ctrl)
        if self.facts.accepted(self.fn, stmt.lineno, stmt.end_lineno or stmt.lineno):
            value = SYMMETRIC
        if isinstance(stmt, ast.AugAssign):
            value = join(value, self.expr(stmt.target, ctrl))
            if isinstance(stmt.target, ast.Subscript):
                self.mutate(stmt.target, value, ctrl, stmt.lineno)
                return
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        for target in targets:
            self.assign(target, value, ctrl, stmt, value_node)

    def assign(self, target: ast.expr, value: Taint, ctrl: Tuple[Gate, ...], stmt: ast.stmt,
               value_node: Optional[ast.expr] = None) -> None:
        if isinstance(target, ast.Name) and wraps(value_node, target.id):
            # ``x = tqdm(x)`` on rank 0 only: the same items, decorated; a role gate adds nothing
            value = join(value, self.implicit(ctrl, value, roles=False))
        elif isinstance(value_node, ast.Constant) and value_node.value is None:
            # ``if self.x is not None: self.x = None`` leaves None on every rank, whichever way
            # each went: a gate that asks only whether the target is set adds nothing
            value = self.implicit(self.not_asking(ctrl, target), value)
        else:
            value = join(value, self.implicit(ctrl, value))
        if isinstance(target, (ast.Name, ast.Attribute)):
            self.store_presence(target, value, ctrl, stmt, value_node)
        if isinstance(target, ast.Name):
            self.rebind(target.id, value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            parts = self.unpacked(value_node, len(target.elts), ctrl)
            for i, element in enumerate(target.elts):
                part = parts[i] if parts is not None else value
                self.assign(element, join(part, self.implicit(ctrl, part)), ctrl, stmt)
        elif isinstance(target, ast.Starred):
            self.assign(target.value, value, ctrl, stmt)
        elif isinstance(target, ast.Attribute):
            name = self.self_attribute(target)
            if name is not None:
                self.writes.append(AttrWrite(name, value, stmt.lineno, False))
            else:
                self.mutate(target, value, ctrl, stmt.lineno)
        elif isinstance(target, ast.Subscript):
            self.mutate(target, join(value, self.expr(target.slice, ctrl)), ctrl, stmt.lineno)

    def unpacked(self, value_node: Optional[ast.expr], count: int, ctrl: Tuple[Gate, ...]
                 ) -> Optional[List[Taint]]:
        """Per-position values of a tuple literal, or of a call to analysed functions that
        always return tuples of ``count`` items; None when positions cannot be told apart."""
        if isinstance(value_node, (ast.Tuple, ast.List)) and len(value_node.elts) == count:
            return [self.expr(e, ctrl) for e in value_node.elts]
        if not isinstance(value_node, ast.Call):
            return None
        record = self.calls.get(id(value_node))
        if record is None or not record.target.functions:
            return None
        per_position: List[List[Taint]] = [[] for _ in range(count)]
        for callee in record.target.functions:
            items = self.facts.returned_items(callee)
            if items is None or len(items) != count:
                return None
            bindings = bind(callee, record.target.bound, value_node, record.args,
                            record.keywords, record.spread)
            for i, item in enumerate(items):
                returned = substitute(item, self.facts.key(callee), bindings)
                per_position[i].append(collapse(returned, f"{callee.qualname}()", "returns",
                                                value_node.lineno))
        return [join(*values) for values in per_position]

    def mutate(self, target: ast.expr, value: Taint, ctrl: Tuple[Gate, ...], line: int) -> None:
        """A change inside an object (``x[k] = v``, ``x.append(v)``, ``obj.f = v``); only the
        first keeps ``x``'s shape."""
        base = target
        while isinstance(base, (ast.Subscript, ast.Attribute)):
            name = self.self_attribute(base) if isinstance(base, ast.Attribute) else None
            if name is not None:
                self.writes.append(AttrWrite(name, join(value, self.implicit(ctrl, value)),
                                             line, True))
                return
            base = base.value
        if isinstance(base, ast.Name) and base.id in self.env:
            changed = join(value, self.implicit(ctrl, value))
            self.env[base.id] = join(self.env[base.id], changed)
            if not (isinstance(target, ast.Subscript) and target.value is base):
                self.bound[base.id] = join(self.bound.get(base.id, SYMMETRIC), changed)

    def self_attribute(self, node: ast.Attribute) -> Optional[str]:
        return self_attribute(node, self.fn)

    # -- expressions ------------------------------------------------------------------------
    def expr(self, node: Optional[ast.expr], ctrl: Tuple[Gate, ...]) -> Taint:
        if node is None or isinstance(node, (ast.Constant, ast.Lambda)):
            return SYMMETRIC
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.Attribute):
            return self.attribute(node, ctrl)
        if isinstance(node, ast.Call):
            return self.call(node, ctrl)
        if isinstance(node, ast.Compare) and (tested := asked(node)) is not None:
            known = self.presence_of(tested)
            whole = self.expr(tested, ctrl)
            return whole if known is None else known
        if isinstance(node, ast.BoolOp):
            parts = [self.expr(node.values[0], ctrl)]
            for value in node.values[1:]:
                gate = self.gate("and" if isinstance(node.op, ast.And) else "or", value, node,
                                 join(*parts))
                parts.append(self.expr(value, ctrl + (gate,)))
            return join(*parts)
        if isinstance(node, ast.IfExp):
            test = self.expr(node.test, ctrl)
            gate = self.gate("if-expression", node, node.test, test)
            body = self.expr(node.body, ctrl + (gate,))
            other = self.expr(node.orelse, ctrl + (gate,))
            if decorates(node.body, node.orelse) or decorates(node.orelse, node.body):
                # ``tqdm(x) if rank == 0 else x``: the same items either way, as for ``x =
                # tqdm(x)`` under such a branch; a role test adds nothing
                return join(body, other, gate_flow(self.facts, gate, test, join(body, other),
                                                   roles=False))
            return join(test, body, other)
        if isinstance(node, ast.NamedExpr):
            named = self.expr(node.value, ctrl)
            self.rebind(node.target.id, join(named, self.implicit(ctrl, named)))
            return named
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            return self.comprehension(node, ctrl)
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            self.record_return(node.value, ctrl)
            return SYMMETRIC
        parts = []
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                parts.append(self.expr(child, ctrl))
        return join(*parts)

    def comprehension(self, node: Union[ast.ListComp, ast.SetComp, ast.GeneratorExp,
                                        ast.DictComp], ctrl: Tuple[Gate, ...]) -> Taint:
        saved = dict(self.env)
        inner = ctrl
        parts = []
        for gen in node.generators:
            source = self.expr(gen.iter, inner)
            inner = inner + (self.gate("for", gen.iter, gen.iter, source),)
            self.assign(gen.target, source, inner, ast.Pass(lineno=node.lineno))
            for cond in gen.ifs:
                test = self.expr(cond, inner)
                inner = inner + (self.gate("if", cond, cond, test),)
                parts.append(test)  # which items it keeps: ``[r for r in new if r.rank == me]``
            parts.append(source)
        elements = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        parts += [self.expr(e, inner) for e in elements]
        self.env = saved
        return join(*parts)

    def name(self, node: ast.Name) -> Taint:
        found = self.env.get(node.id)
        if found is not None:
            return found
        outer = self.facts.outer_name(self.fn, node.id)
        if outer is not None:
            return outer
        if self.config.matches("symmetric_names", node.id):
            return SYMMETRIC
        if self.is_rank_name(node.id):
            return rank(node.id, "rank identity", node.lineno)
        return SYMMETRIC

    def is_rank_name(self, identifier: str) -> bool:
        return is_rank_name(identifier, self.config)

    def attribute(self, node: ast.Attribute, ctrl: Tuple[Gate, ...]) -> Taint:
        cache = self.facts.static_cache
        key = id(node)
        if key not in cache:
            cache[key] = static_attribute(node, self.fn, self.config)
        fixed = cache[key]
        if fixed is not None:
            return fixed
        if node.attr in _SHAPE_ATTRIBUTES and self.shaped(node.value):
            return SYMMETRIC
        name = self.self_attribute(node)
        base = self.expr(node.value, ctrl) if name is None else SYMMETRIC
        if self.is_rank_name(node.attr) and not only_synced(base):
            return rank(dotted_name(node) or node.attr, "rank identity", node.lineno)
        if name is not None:
            self.attribute_reads.add(name.split(".")[0])
            return self.facts.attribute(self.fn, name)
        return base

    def shaped(self, node: ast.expr) -> bool:
        """``node`` is still the parameter the function hands to a shape-bound collective (or
        that tensor after an in-place collective, which keeps its shape)."""
        if not (isinstance(node, ast.Name) and node.id in self.facts.shaped_params(self.fn)):
            return False
        own = param(self.key, node.id)
        value = self.env.get(node.id, SYMMETRIC)
        return own <= value and all(s in own or s.kind == SYNCED for s in value)

    def call(self, node: ast.Call, ctrl: Tuple[Gate, ...]) -> Taint:
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr in _SHAPE_METHODS
                and self.shaped(func.value)) or (
                    isinstance(func, ast.Name) and func.id == "isinstance" and node.args
                    and self.shaped(node.args[0])):
            target = self.facts.program.target(node, self.fn)
            if target.collective is None and not target.functions:
                return join(*(self.expr(arg, ctrl) for arg in node.args[1:]))
        receiver = SYMMETRIC
        if isinstance(func, ast.Attribute):
            receiver = self.expr(func.value, ctrl)
        elif not isinstance(func, ast.Name):
            receiver = self.expr(func, ctrl)
        args: List[Taint] = []
        spread = SYMMETRIC
        for arg in node.args:
            value = self.expr(arg, ctrl)
            if isinstance(arg, ast.Starred):
                spread = join(spread, value)
            else:
                args.append(value)
        keywords: Dict[str, Taint] = {}
        for kw in node.keywords:
            value = self.expr(kw.value, ctrl)
            if kw.arg is None:
                spread = join(spread, value)
            else:
                keywords[kw.arg] = value
        target = self.facts.program.target(node, self.fn)
        copied = shape_copy(node)
        if copied in self.bound and target.collective is None and not target.functions:
            # ``torch.zeros_like(flags)`` after ``flags[rank] = 1``: the zeros are alike on every
            # rank where ``flags`` was bound alike, whatever was written into it since.
            args[0] = self.bound[copied]
        self.calls[id(node)] = CallRecord(node, target, ctrl, args, keywords, spread)
        inputs = join(*args, *keywords.values(), spread)
        if target.collective is not None:
            op = target.collective
            if op.result == "symmetric":
                result = synced(op.display, node.lineno)
            elif op.result == "role":
                result = rank(op.display, "differs by rank: each rank receives its own part"
                              if _PARTS.search(op.op) else
                              "differs by rank: only the root receives it",
                              node.lineno)
            else:
                result = local(op.display, "point-to-point receive", node.lineno)
            outputs = received_into(op.op) if op.in_place else ()
            for index in outputs:
                if index < len(node.args):
                    self.sync_argument(node.args[index], result)
            for kw in node.keywords if outputs else ():
                # ``tensor=``/``buf=`` is the output only of ops that receive into their first
                # argument (``all_reduce(tensor=t)``), the input of ``all_gather(..., tensor=t)``
                if kw.arg in OUTPUT_KEYWORDS or (kw.arg in ("tensor", "buf") and outputs == (0,)):
                    self.sync_argument(kw.value, result)
            return result
        if target.functions:
            return self.analysed_call(node, target, args, keywords, spread)
        if isinstance(func, ast.Attribute) and func.attr in _MUTATORS:
            self.mutate(func.value, inputs, ctrl, node.lineno)
        return join(self.external_call(node, receiver), inputs)

    def sync_argument(self, arg: ast.expr, result: Taint) -> None:
        if isinstance(arg, ast.Name):
            self.env[arg.id] = result
            if arg.id in self.fn.params:
                self.synced_params.add(arg.id)

    def analysed_call(self, node: ast.Call, target: CallTarget, args: List[Taint],
                      keywords: Dict[str, Taint], spread: Taint) -> Taint:
        results = []
        for callee in target.functions:
            bindings = bind(callee, target.bound, node, args, keywords, spread)
            returned = substitute(self.facts.returns(callee), self.facts.key(callee), bindings)
            results.append(collapse(returned, f"{callee.qualname}()", "returns", node.lineno))
            synced_names = self.facts.syncs(callee)
            if synced_names:
                for name, arg in bound_nodes(callee, target.bound, node).items():
                    if name in synced_names:
                        self.sync_argument(arg, synced("via " + callee.qualname, node.lineno))
        return join(*results)

    def external_call(self, node: ast.Call, receiver: Taint) -> Taint:
        """A call outside the analysed files: clocks, environment, probes, object state."""
        cache = self.facts.static_cache
        key = id(node)
        if key not in cache:
            cache[key] = static_call(node, self.fn, self.facts)
        fixed = cache[key]
        return receiver if fixed is None else fixed

