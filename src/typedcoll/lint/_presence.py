"""Whether a value is None, tracked apart from the value itself.

``if self.mq_broadcaster is not None:`` asks only whether the attribute is set. Its value may
differ by rank (a writer on one rank, readers on the others, each built for its own device) and
still be set on every rank, so every rank takes the same side. Each local and ``self`` attribute
therefore also carries the taint of its None-ness, under its name with :data:`SUFFIX` appended,
through the same flow-sensitive locals and per-attribute writes as its value. A store whose
None-ness is fixed (``None``, a literal, a constructor call) is set or unset alike on every rank,
and a gate that only asks whether the target is set adds nothing to it: after
``if self.x is not None: self.x = None`` or ``if self.x is None: self.x = Pool()``, the
attribute is None, or set, whichever way each rank went.
"""

from __future__ import annotations

import ast
from typing import Dict, List, Optional, Set, Tuple, Union

from ._callgraph import Function
from ._facts import AttrWrite, Facts, Gate
from ._values import SYMMETRIC, Taint, join

SUFFIX = "?"  # not a Python identifier's character: no clash with a real name

# Expressions that are never None, or always are, wherever they are evaluated.
_FIXED = (ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.ListComp, ast.SetComp,
          ast.DictComp, ast.GeneratorExp, ast.JoinedStr, ast.BinOp, ast.Compare, ast.Lambda)


def key(name: str) -> str:
    return name + SUFFIX


def asked(test: ast.expr) -> Optional[ast.expr]:
    """X, where ``test`` is ``X is None`` or ``X is not None`` (None-ness alone decides it)."""
    if (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], (ast.Is, ast.IsNot))
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value is None):
        return test.left
    return None


def asks_if_set(gate: Gate, target: ast.expr) -> bool:
    """``gate`` is ``if X:``, ``if not X:`` or ``if X is (not) None:`` for ``target`` X."""
    test = gate.test
    if gate.kind != "if" or not isinstance(test, ast.expr):
        return False
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test = test.operand
    test = asked(test) or test
    return ast.unparse(test) == ast.unparse(target)  # the target is a Store, the test a Load


def fixed(node: Optional[ast.expr]) -> bool:
    """``node``'s None-ness is the same on every rank: a literal, or a call of a class by the
    naming convention (``MessageQueue(...)``: a constructor returns no None)."""
    if isinstance(node, _FIXED):
        return True
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else (
            func.id if isinstance(func, ast.Name) else "")
        return name[:1].isupper() and not name.isupper()
    return False


class PresenceTracking:
    """The None-ness half of one function's values, mixed into its value analysis."""

    fn: Function
    facts: Facts
    env: Dict[str, Taint]
    writes: List[AttrWrite]
    attribute_reads: Set[str]

    def implicit(self, ctrl: Tuple[Gate, ...], value: Taint, roles: bool = True,
                 exits: bool = False) -> Taint:
        raise NotImplementedError

    def self_attribute(self, node: ast.Attribute) -> Optional[str]:
        raise NotImplementedError

    def not_asking(self, ctrl: Tuple[Gate, ...], target: ast.expr) -> Tuple[Gate, ...]:
        return tuple(g for g in ctrl if not asks_if_set(g, target))

    def store_presence(self, target: Union[ast.Name, ast.Attribute], value: Taint,
                       ctrl: Tuple[Gate, ...], stmt: ast.stmt,
                       value_node: Optional[ast.expr]) -> None:
        """Whether ``target`` is None now (:mod:`_presence`): alike on every rank after a store
        of a fixed None-ness under gates that only ask whether it was set."""
        if fixed(value_node):
            held = self.implicit(self.not_asking(ctrl, target), SYMMETRIC)
        else:
            known = self.presence_of(value_node) if value_node is not None else None
            held = value if known is None else join(known, self.implicit(ctrl, known))
        if isinstance(target, ast.Name):
            self.env[key(target.id)] = held
            return
        name = self.self_attribute(target)
        if name is not None and "." not in name:
            self.writes.append(AttrWrite(key(name), held, stmt.lineno, False))

    def presence_of(self, node: ast.expr) -> Optional[Taint]:
        """The None-ness of a local or ``self`` attribute, where it is tracked."""
        if isinstance(node, ast.Name):
            return self.env.get(key(node.id))
        name = self.self_attribute(node) if isinstance(node, ast.Attribute) else None
        if name is None or "." in name:
            return None
        self.attribute_reads.add(key(name))
        return self.facts.presence(self.fn, name)
