"""What ``self`` attributes hold: configuration set up once, or state each rank changes.

An attribute is symmetric when only set-up code assigns it (``__init__``, the configured set-up
methods such as ``init_*``/``setup*``, and methods only set-up code calls), from symmetric values,
or when every other assignment stores a collective's result or is teardown code's (``destroy*``,
``cleanup*``, ``close``, ``shutdown*``..., and methods only such code calls) storing a symmetric
value: a teardown runs on every rank, as set-up does, and the None it leaves is everyone's. A
teardown that analysed code other than a teardown calls under a divergent gate (``if item is
None: self.close()``) is not one every rank runs: its stores are per-rank state. Any other
assignment, or a change in place (``append``, ``x[k] = v``, ``self.x.y = v``), makes it per-rank
state, and that one write is what a finding names. An attribute ``__init__`` fills with a queue is
rank-local from the start: other threads fill it. Classes related by inheritance (mixins included)
share their attributes.
"""

from __future__ import annotations

import ast
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ._callgraph import Function, Program
from ._config import Config
from ._facts import AttrWrite
from ._presence import SUFFIX
from ._values import SYMMETRIC, Taint, divergent, join, local, only_synced

AttrKey = Tuple[int, str]
# value: a plain container or scalar; queue: filled by other threads; object: anything else
_PLAIN_CALLS = frozenset({"dict", "list", "set", "tuple", "defaultdict", "OrderedDict", "Counter",
                          "frozenset", "int", "float", "str", "bool"})


def _setter_of(fn: Function) -> Optional[str]:
    """The property a ``@name.setter`` method sets."""
    for decorator in fn.decorators:
        if decorator.endswith(".setter"):
            return decorator.rsplit(".", 1)[0]
    return None


def _self_assignments(fn: Function) -> Iterable[Tuple[str, ast.expr]]:
    """``self.name = value`` statements in ``fn``'s own body (targets and values)."""
    if fn.self_name is None:  # no ``self`` to assign to (a module's code, a plain function)
        return
    for node in ast.walk(fn.node):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id == fn.self_name):
                    yield target.attr, node.value


class AttributeModel:
    """Families, set-up context, initial kinds and, each round, the taint of every attribute."""

    def __init__(self, program: Program, config: Config,
                 callers: Dict[Function, List[Tuple[Function, Optional[ast.Call]]]]) -> None:
        self.program = program
        self.config = config
        self.families = self._class_families()
        self.setters = {fn: name for fn in program.functions
                        if fn.cls is not None and (name := _setter_of(fn)) is not None}
        self._add_setter_callers(callers)
        self.setup = self._setup_context(callers)
        self.teardown = self._teardown_context(callers)
        self.uniform_teardown = set(self.teardown)  # narrowed each round by the analysis
        self.lockstep: Set[Function] = set()  # functions every rank calls alike (each round)
        self.kinds = self._initial_kinds()
        self.taints: Dict[AttrKey, Taint] = {}

    def family(self, fn: Function) -> int:
        return self.families.get(id(fn.cls), 0) if fn.cls is not None else 0

    def is_setup_root(self, fn: Function) -> bool:
        return (fn.cls is not None and fn.parent is None and fn.self_name is not None
                and self.config.matches("init_methods", fn.name))

    def read(self, fn: Function, name: str) -> Taint:
        family, head = self.family(fn), name.split(".")[0]
        found = self.taints.get((family, name), SYMMETRIC)
        return found if name == head else join(found, self.taints.get((family, head), SYMMETRIC))

    # -- structure --------------------------------------------------------------------------
    def _class_families(self) -> Dict[int, int]:
        parent: Dict[int, int] = {}

        def find(key: int) -> int:
            while parent.setdefault(key, key) != key:
                parent[key] = parent[parent[key]]
                key = parent[key]
            return key

        classes = [c for group in self.program.classes_by_name.values() for c in group]
        for cls in classes:
            for base in cls.bases:
                for other in self.program.classes_by_name.get(base.rsplit(".", 1)[-1], []):
                    parent[find(id(other))] = find(id(cls))
        return {id(cls): find(id(cls)) for cls in classes}

    def _add_setter_callers(self, callers: Dict[Function, List[Tuple[Function, Optional[
            ast.Call]]]]) -> None:
        """``self.prop = v`` runs the ``prop`` setter: record the assigning function as a caller,
        so a setter used only by set-up code is set-up code too."""
        by_name: Dict[Tuple[int, str], List[Function]] = {}
        for setter, name in self.setters.items():
            by_name.setdefault((self.family(setter), name), []).append(setter)
        if not by_name:
            return
        for fn in self.program.functions:
            for name, _ in _self_assignments(fn):
                for setter in by_name.get((self.family(fn), name), []):
                    callers.setdefault(setter, []).append((fn, None))

    def _setup_context(self, callers: Dict[Function, List[Tuple[Function, Optional[ast.Call]]]]
                       ) -> Set[Function]:
        setup = {fn for fn in self.program.functions if self.is_setup_root(fn)}
        changed = True
        while changed:
            changed = False
            for fn in self.program.functions:
                found = callers.get(fn)
                if fn in setup or fn.cls is None or not found:
                    continue
                if all(caller in setup for caller, _ in found):
                    setup.add(fn)
                    changed = True
        return setup

    def _teardown_context(self, callers: Dict[Function, List[Tuple[Function, Optional[
            ast.Call]]]]) -> Set[Function]:
        teardown = {fn for fn in self.program.functions
                    if fn.cls is not None and fn.parent is None and fn.self_name is not None
                    and self.config.matches("teardown_methods", fn.name)}
        changed = True
        while changed:
            changed = False
            for fn in self.program.functions:
                found = callers.get(fn)
                if fn in teardown or fn in self.setup or fn.cls is None or not found:
                    continue
                if all(caller in teardown or caller in self.setup for caller, _ in found):
                    teardown.add(fn)
                    changed = True
        return teardown

    def _initial_kinds(self) -> Dict[AttrKey, Set[str]]:
        kinds: Dict[AttrKey, Set[str]] = {}
        for fn in self.program.functions:
            if fn in self.setup and fn.self_name is not None:
                for name, value in _self_assignments(fn):
                    kinds.setdefault((self.family(fn), name), set()).add(self._kind(value))
        return kinds

    def _kind(self, value: ast.expr) -> str:
        if isinstance(value, (ast.Constant, ast.List, ast.Dict, ast.Set, ast.Tuple, ast.ListComp,
                              ast.DictComp, ast.SetComp, ast.JoinedStr, ast.BinOp)):
            return "value"
        if isinstance(value, ast.Call):
            func = value.func
            name = func.attr if isinstance(func, ast.Attribute) else (
                func.id if isinstance(func, ast.Name) else "")
            if self.config.matches("queue_types", name):
                return "queue"
            if name in _PLAIN_CALLS:
                return "value"
        return "object"

    # -- each round -------------------------------------------------------------------------
    def update(self, writes: Iterable[Tuple[Function, AttrWrite, Taint]]) -> None:
        """Recompute every attribute from this round's writes (value taints already expanded)."""
        values: Dict[AttrKey, Taint] = {}
        per_rank: Dict[AttrKey, Taint] = {}
        for key, kinds in self.kinds.items():
            if "queue" in kinds:
                per_rank[key] = local(f"self.{key[1]}", "queue other threads fill", 0)
        for fn, write, value in writes:
            key = (self.family(fn), write.name)
            # A stored collective result is the same on every rank, and so is a symmetric value
            # stored by a function whose every call pairs with a collective on the other ranks.
            # Anywhere else, a container changed in place keeps its history, which is per rank
            # even when each change is symmetric (who calls ``clear()`` when is unknown).
            if fn in self.setup or only_synced(value) or not divergent(value) and (
                    fn in self.lockstep or not write.mutation and fn in self.uniform_teardown):
                values[key] = join(values.get(key, SYMMETRIC), value)
            elif key not in per_rank:
                verb = "changed" if write.mutation else "assigned"
                per_rank[key] = local(f"self.{write.name.rstrip(SUFFIX)}",
                                      f"per-rank state, {verb} in {fn.qualname}", write.line)
        values.update(per_rank)
        self.taints = values

    def setter_values(self, writes: Iterable[Tuple[Function, AttrWrite, Taint]]
                      ) -> Dict[Function, Taint]:
        """What each setter's value parameter receives: the values assigned to its property."""
        wanted = {(self.family(fn), name): fn for fn, name in self.setters.items()}
        out: Dict[Function, Taint] = {}
        for fn, write, value in writes:
            setter = wanted.get((self.family(fn), write.name))
            if setter is not None and fn is not setter:
                out[setter] = join(out.get(setter, SYMMETRIC), value)
        return out
