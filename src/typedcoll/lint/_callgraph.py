"""The analysed files as a program: functions, classes, imports, calls resolved, and which
functions reach a collective.

Resolution is by name, within the files given: a plain name to a nested function (a lambda, a
collective's bound method or a ``functools.partial`` bound to a local name is one; bound to a
``self`` attribute, a method) or module-level function (or a class, meaning its ``__init__``),
``self.m`` / ``cls.m`` to the method of the class or of its analysed bases, ``super().m`` to the
bases, ``C.m`` and ``module.f`` directly, ``torch.ops.ns.op`` to the function registered as that
op (``_custom_ops``); ``with C(...)`` also to ``C``'s ``__enter__`` and ``__exit__``. Any other
``obj.m`` resolves to the analysed methods named ``m`` when few classes define one and the name
is not a common method of builtin types (``get``, ``append``...), since the receiver's type is
unknown.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple, TypeGuard, Union

from ._collectives import CollectiveOp, CollectiveTable, dotted_name
from ._custom_ops import custom_op_namespace, ops_named, registered_ops
from ._definitions import FunctionNode, alias_def, aliases, body_nodes, lambda_def, params_of
from ._reach import Reach, call_reach, reachability
from ._source import SourceFile


# Receivers are untyped: resolving these by name would tie every dict.get to some analysed get().
_BUILTIN_METHOD_NAMES = frozenset(
    name for kind in (dict, list, set, str, bytes, tuple, frozenset, int, float, object)
    for name in dir(kind)) | frozenset({
        "put", "wait", "result", "item", "tolist", "to", "cpu", "cuda", "numpy", "size", "view",
        "reshape", "run", "start", "stop", "submit", "close", "open", "read", "write", "send",
        "recv", "flush", "shutdown", "reset", "step", "forward", "__call__", "info", "debug",
        "warning", "error", "exception",
    })
_MAX_BY_NAME_CANDIDATES = 3


@dataclass(eq=False)
class Function:
    """A function, method, nested function, or a module's top-level code (``<module>``)."""

    qualname: str
    node: Union[FunctionNode, ast.Module]
    module: "Module"
    cls: Optional["ClassInfo"] = None
    parent: Optional["Function"] = None
    params: List[str] = field(default_factory=list)
    self_name: Optional[str] = None
    decorators: Tuple[str, ...] = ()
    nested: Dict[str, "Function"] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    @property
    def is_property(self) -> bool:
        return any(d.endswith("property") for d in self.decorators)

    def __repr__(self) -> str:
        return f"<Function {self.qualname}>"


@dataclass(eq=False)
class ClassInfo:
    name: str
    module: "Module"
    node: ast.ClassDef
    bases: List[str]
    methods: Dict[str, Function] = field(default_factory=dict)


@dataclass(eq=False)
class Module:
    source: SourceFile
    name: str
    imports: Dict[str, str] = field(default_factory=dict)
    functions: Dict[str, Function] = field(default_factory=dict)
    classes: Dict[str, ClassInfo] = field(default_factory=dict)
    top: Optional[Function] = None


@dataclass(frozen=True)
class CallTarget:
    """What a call is: a collective, and/or analysed functions it may run (``bound``: self
    passed)."""

    collective: Optional[CollectiveOp]
    functions: Tuple[Function, ...]
    bound: bool
    # ``with Cls(...)``: the class's __enter__ and __exit__, which run after the constructor, on
    # whichever ranks take the statement
    entered: Tuple[Function, ...] = ()


def _module_name(path: str) -> str:
    parts = os.path.normpath(os.path.splitext(path)[0]).split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(p for p in parts if p and p not in (".", ".."))


def _imported_from(module: str, path: str, node: ast.ImportFrom) -> Optional[str]:
    """The module ``from ... import`` names, relative imports (``from .utils``, ``from .``)
    made absolute against the importing module's package as far as its path tells."""
    if not node.level:
        return node.module
    package = module.split(".") if module else []
    if os.path.splitext(os.path.basename(path))[0] != "__init__":
        package = package[:-1]  # a module's package; a package's __init__ is its own
    if node.level - 1 > len(package):  # above the paths given: the name as written
        return node.module
    package = package[:len(package) - (node.level - 1)] if node.level > 1 else package
    parts = package + (node.module.split(".") if node.module else [])
    return ".".join(parts) if parts else None


def same_module(module: str, target: str) -> bool:
    """Whether analysed ``module`` is the module ``target`` names: equal, or one a dotted
    suffix of the other (the paths given may start below or above the import root). A name
    that only ends alike (``all_reduce_utils`` for ``utils``) is another module."""
    return (module == target or module.endswith("." + target)
            or target.endswith("." + module))


def is_try(node: ast.AST) -> TypeGuard[ast.Try]:
    """``try`` and, from Python 3.11, ``try``/``except*`` (the same fields)."""
    return isinstance(node, ast.Try) or type(node).__name__ == "TryStar"


class Program:
    """Index of the analysed files, call resolution, and reachability of collectives."""

    def __init__(self, sources: List[SourceFile], table: CollectiveTable) -> None:
        self.table = table
        self.modules: List[Module] = []
        self.functions: List[Function] = []
        self.classes_by_name: Dict[str, List[ClassInfo]] = {}
        self.methods_by_name: Dict[str, List[Function]] = {}
        self.functions_by_name: Dict[str, List[Function]] = {}
        for source in sources:
            self._index_module(source)
        self.custom_ops = registered_ops(self.functions, self._call_nodes,
                                         lambda name, fn: self._resolve_name(name, fn)[0])
        self._targets: Dict[int, CallTarget] = {}
        self._context_calls = {id(item.context_expr) for fn in self.functions
                               for node in body_nodes(fn.node)
                               if isinstance(node, (ast.With, ast.AsyncWith))
                               for item in node.items}
        self.calls: Dict[Function, List[Tuple[ast.Call, CallTarget]]] = {}
        for fn in self.functions:
            self.calls[fn] = [(c, self.target(c, fn)) for c in self._call_nodes(fn)]
        self.reach = reachability(self.functions, self.calls, self.is_rank_safe)

    # -- indexing ---------------------------------------------------------------------------
    def _index_module(self, source: SourceFile) -> None:
        module = Module(source, _module_name(source.path))
        self.modules.append(module)
        for node in ast.walk(source.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    module.imports[local] = alias.name if alias.asname else local
            elif isinstance(node, ast.ImportFrom):
                base = _imported_from(module.name, source.path, node)
                for alias in node.names:
                    if base is not None:
                        module.imports[alias.asname or alias.name] = f"{base}.{alias.name}"
        module.top = Function("<module>", source.tree, module)
        self.functions.append(module.top)
        self._index_body(source.tree.body, module, None, None, "")

    def _index_body(self, body: List[ast.stmt], module: Module, cls: Optional[ClassInfo],
                    parent: Optional[Function], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._index_function(node, module, cls, parent, prefix)
            elif isinstance(node, ast.ClassDef) and parent is None:
                info = ClassInfo(node.name, module, node,
                                 [d for d in map(dotted_name, node.bases) if d])
                self.classes_by_name.setdefault(node.name, []).append(info)
                if cls is None:
                    module.classes[node.name] = info
                self._index_body(node.body, module, info, None, f"{prefix}{node.name}.")
                # ``self._vote = comm.allreduce``: ``self._vote(n)`` calls a method of that name
                for method in list(info.methods.values()):
                    for name, value, where in aliases(method.node, method.self_name, False,
                                                      self._collective(method)):
                        if name not in info.methods:
                            self._index_function(alias_def(name, value, where, True), module,
                                                 info, None, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.AsyncWith)) and parent is None:
                # definitions under `if TYPE_CHECKING:` / `try: import` fallbacks
                for block in _blocks(node):
                    self._index_body(block, module, cls, parent, prefix)

    def _index_function(self, node: FunctionNode, module: Module, cls: Optional[ClassInfo],
                        parent: Optional[Function], prefix: str) -> None:
        decorators = tuple(d for d in (dotted_name(x.func if isinstance(x, ast.Call) else x)
                                       for x in node.decorator_list) if d)
        params, self_name = params_of(node, cls is not None and parent is None, decorators)
        fn = Function(prefix + node.name, node, module, cls if parent is None else parent.cls,
                      parent, params, self_name, decorators)
        if parent is not None:
            fn.self_name = parent.self_name
            parent.nested[node.name] = fn
        elif cls is not None:
            cls.methods.setdefault(node.name, fn)
            self.methods_by_name.setdefault(node.name, []).append(fn)
        else:
            module.functions[node.name] = fn
            self.functions_by_name.setdefault(node.name, []).append(fn)
        self.functions.append(fn)
        inner = [n for n in body_nodes(node) if isinstance(n, (ast.FunctionDef,
                                                                ast.AsyncFunctionDef))]
        inner += [lambda_def(n.targets[0].id, n.value) for n in body_nodes(node)
                  if isinstance(n, ast.Assign) and isinstance(n.value, ast.Lambda)
                  and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)]
        inner += [alias_def(name, value, where, False)
                  for name, value, where in aliases(node, fn.self_name, True, self._collective(fn))]
        for child in inner:
            self._index_function(child, module, None, fn, f"{fn.qualname}.")

    def _collective(self, fn: Function) -> Callable[[ast.expr], bool]:
        """Whether a call of a callable written as in ``fn`` is a collective's."""
        return lambda func: self.table.classify(ast.Call(func=func, args=[], keywords=[]),
                                                fn.module.imports) is not None

    # -- resolution -------------------------------------------------------------------------
    def _call_nodes(self, fn: Function) -> List[ast.Call]:
        calls = [n for n in body_nodes(fn.node) if isinstance(n, ast.Call)]
        calls.sort(key=lambda c: (c.lineno, c.col_offset))
        return calls

    def target(self, call: ast.Call, fn: Function) -> CallTarget:
        key = id(call)
        hit = self._targets.get(key)
        if hit is None:
            collective = self.table.classify(call, fn.module.imports)
            functions: Tuple[Function, ...] = ()
            bound = False
            if collective is None or collective.by_wrapper or collective.by_method_name:
                # a configured wrapper defined in the analysed files is followed, not trusted
                functions, bound = self._resolve(call.func, fn)
                if collective is not None and collective.by_method_name and not all(
                        self._issues_collective(f) for f in functions):
                    functions = ()  # a guess, or a method that delegates: the name decides
                if functions:
                    collective = None
            hit = CallTarget(collective, functions, bound, self._entered(call, fn))
            self._targets[key] = hit
        return hit

    def _entered(self, call: ast.Call, fn: Function) -> Tuple[Function, ...]:
        """The context-manager methods ``with Cls(...)`` runs, for an analysed class ``Cls``."""
        if id(call) not in self._context_calls or not isinstance(call.func, ast.Name):
            return ()
        cls = self._class_named(call.func.id, fn)
        if cls is None:
            return ()
        found = (self.class_method(cls, name)
                 for name in ("__enter__", "__aenter__", "__exit__", "__aexit__"))
        return tuple(f for f in found if f is not None)

    def _issues_collective(self, fn: Function) -> bool:
        """``fn``'s own body calls something named like a collective."""
        return any(self.table.classify(call, fn.module.imports) is not None
                   for call in self._call_nodes(fn))

    def class_method(self, cls: ClassInfo, name: str,
                     seen: Optional[Set[int]] = None) -> Optional[Function]:
        seen = set() if seen is None else seen
        if id(cls) in seen:
            return None
        seen.add(id(cls))
        found = cls.methods.get(name)
        if found is not None:
            return found
        for base in cls.bases:
            for candidate in self.classes_by_name.get(base.rsplit(".", 1)[-1], []):
                found = self.class_method(candidate, name, seen)
                if found is not None:
                    return found
        return None

    def _by_name(self, name: str, fn: Function, on_self: bool) -> Tuple[Function, ...]:
        """Analysed methods an ``obj.name()`` call may run, the receiver's type being unknown.

        Dunder and builtin-type method names are left out, and so, for a receiver other than
        ``self``, are the caller's own class's methods: ``self.queue.enqueue(r)`` inside
        ``enqueue`` delegates to another type, it does not recurse.
        """
        if (not self.table.config.resolve_methods_by_name or name in _BUILTIN_METHOD_NAMES
                or (name.startswith("__") and name.endswith("__"))):
            return ()
        candidates = self.methods_by_name.get(name, [])
        if not on_self:
            candidates = [c for c in candidates if c.cls is None or c.cls is not fn.cls]
        if not candidates or len(candidates) > _MAX_BY_NAME_CANDIDATES:
            return ()
        return tuple(candidates)

    def _resolve_name(self, name: str, fn: Function) -> Tuple[Tuple[Function, ...], bool]:
        scope: Optional[Function] = fn
        while scope is not None:
            if name in scope.nested:
                return (scope.nested[name],), False
            scope = scope.parent
        module = fn.module
        if name in module.functions:
            return (module.functions[name],), False
        imported = module.imports.get(name)
        if name not in module.classes and imported is not None:
            owner = imported.rsplit(".", 1)[0]
            for candidate in self.functions_by_name.get(name, []):
                if same_module(candidate.module.name, owner):
                    return (candidate,), False
        cls = self._class_named(name, fn)
        if cls is not None:
            init = self.class_method(cls, "__init__")
            return ((init,), True) if init is not None else ((), False)
        return (), False

    def _class_named(self, name: str, fn: Function) -> Optional[ClassInfo]:
        """The analysed class ``name`` means in ``fn``'s module: its own, or one it imports."""
        module = fn.module
        cls = module.classes.get(name)
        imported = module.imports.get(name)
        if cls is None and imported is not None:
            owner = imported.rsplit(".", 1)[0]
            for info in self.classes_by_name.get(name, []):
                if same_module(info.module.name, owner):
                    cls = info
        return cls

    def _resolve(self, func: ast.expr, fn: Function) -> Tuple[Tuple[Function, ...], bool]:
        if isinstance(func, ast.Name):
            return self._resolve_name(func.id, fn)
        if not isinstance(func, ast.Attribute):
            return (), False
        receiver, name = func.value, func.attr
        namespace = custom_op_namespace(receiver, fn.module.imports)
        if namespace is not None:
            return ops_named(self.custom_ops, namespace, name), False
        if isinstance(receiver, ast.Name) and fn.cls is not None and receiver.id == fn.self_name:
            found = self.class_method(fn.cls, name)
            return ((found,), True) if found is not None else (self._by_name(name, fn, True), True)
        if (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name)
                and receiver.func.id == "super" and fn.cls is not None):
            for base in fn.cls.bases:
                for info in self.classes_by_name.get(base.rsplit(".", 1)[-1], []):
                    found = self.class_method(info, name)
                    if found is not None:
                        return (found,), True
            return (), False
        if isinstance(receiver, ast.Name):
            for info in self.classes_by_name.get(receiver.id, []):
                if info.module is fn.module or receiver.id in fn.module.imports:
                    found = self.class_method(info, name)
                    if found is not None:
                        static = "staticmethod" in found.decorators
                        return (found,), not static
            target = fn.module.imports.get(receiver.id)
            if target is not None:
                for candidate in self.functions_by_name.get(name, []):
                    if same_module(candidate.module.name, target):
                        return (candidate,), False
                return (), False
        return self._by_name(name, fn, False), True

    # -- reachability ---------------------------------------------------------------------------
    def is_rank_safe(self, fn: Function) -> bool:
        config = self.table.config
        return bool(config.rank_safe_functions) and (
            config.matches("rank_safe_functions", fn.name)
            or config.matches("rank_safe_functions", fn.qualname))

    def call_reach(self, target: CallTarget, reach: Optional[Dict[Function, Reach]] = None
                   ) -> Optional[Reach]:
        """What a call reaches: the collective it is, or its first callee's reach."""
        return call_reach(target, self.reach if reach is None else reach, self.is_rank_safe)


def _blocks(node: ast.stmt) -> Iterator[List[ast.stmt]]:
    for name in ("body", "orelse", "finalbody"):
        block = getattr(node, name, None)
        if block:
            yield block
    for handler in getattr(node, "handlers", []):
        yield handler.body
