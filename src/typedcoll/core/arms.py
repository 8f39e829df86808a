"""Role branches: one rooted collective written once in each arm of an ``if``.

Code that branches on its role often issues the root's side and the receivers' side of one
collective from two lines::

    if rank == src:
        comm.bcast(obj, root=src)           # the root's arm
        return obj
    else:
        return comm.bcast(None, root=src)   # the receivers' arm

Their call sites differ, so the envelopes disagree on identity. This module reads, from the
source every rank runs, whether a call is such a branch's: the k-th call of its name (``bcast``)
in one arm of an ``if``/``else`` (or of a conditional expression, or of an ``if`` whose body
always leaves the block — return, raise, continue, break — against the statements after it),
where the other arm has a k-th call of that name too and the longest run of such calls is as
long in both arms. Ordinals are counted in the source along one path through the arm: the calls
before this one that can run before it, so calls in two arms of an ``if`` nested in the arm (or
in the body of an ``if`` that leaves, against the statements after it) do not count each other.
SGLang's ``broadcast_pyobj`` sends a size alone when the data is empty, else a size and the
data, while its receivers read the size and return early on 0: the root's two size calls are
both the first of their path and pair with the receivers' one. A root that skips its arm's first
call under a condition of its own reaches its second with ordinal 2, and the receivers' first
(ordinal 1) still differs; arms whose longest runs differ (a call only the receivers make) pair
nothing. A call may sit in several nested ``if`` statements that pair it (a role branch under a
setting every rank shares, or a receivers' arm split further by ``elif``): each is a candidate,
the innermost first. ``branch_of(code, lasti)`` gives them (each: file, the ``if``'s line and
column, k, name: two conditional expressions on one line are two branches; and the arm this
call is in); the verdict (``verdict.disagreement``, ``mismatch.split_branch``) accepts a rooted
collective whose envelopes differ only in their sites when every rank names the root's
innermost branch and the root alone is in its arm. Only rooted ops: two votes written in two
arms (``allreduce`` of a timeout, ``allreduce`` of a batch size) are different calls, and a
rank in the wrong arm must still raise.

Nothing here runs on the steady path: a branch is read when envelopes are compared. Where the
source cannot be read (no file, a file too large) no call is a branch's, so the sites are
compared as they are, as before.
"""

from __future__ import annotations

import ast
import linecache
import threading
import tokenize
from types import CodeType
from typing import Dict, List, Optional, Sequence, Tuple

from .identity import CodeTable, Position, position_of, register_internal, source_name
from .mismatch import Branch

_MAX_SOURCE = 4 * 1024 * 1024  # bytes of source parsed for one file, at most
_EXITS = (ast.Return, ast.Raise, ast.Continue, ast.Break)
# A call's branch is looked for up to the function that holds it (a lambda is an expression of
# its arm: ``step(lambda: comm.bcast(x))`` is that arm's call).
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)
Hit = Tuple[int, int, int, str, int]  # the if's line and column, k, name, arm
MAX_CANDIDATES = 4  # enclosing branches kept per call, the innermost first


# filename -> {position of a call -> its Hits, innermost first}; None: source not read
_FILES: Dict[str, Optional[Dict[Position, List[Hit]]]] = {}
_BRANCHES = CodeTable()
_UNREAD = object()
_LOCK = threading.Lock()


def branch_of(code: Optional[CodeType], lasti: int) -> Optional[Branch]:
    """The role branch of the call at bytecode offset ``lasti`` of ``code`` (None: none)."""
    if code is None:
        return None
    found = _BRANCHES.get(code, lasti, _UNREAD)
    if found is not _UNREAD:
        return found  # type: ignore[no-any-return]
    # One reader at a time: in-process ranks are threads, and a file is parsed once.
    with _LOCK:
        try:
            position = position_of(code, lasti)
            calls = _calls_of(code.co_filename) if position is not None else None
        except Exception:  # never raise in a cold path a rank's peers wait in; not remembered
            return None
        hits = calls.get(position) if calls is not None and position is not None else None
        branch = None
        if hits:
            name = source_name(code.co_filename)
            keyed = [(f"{name}:{h[0]}:{h[1]} {h[3]} #{h[2] + 1}", h[4]) for h in hits]
            branch = Branch(keyed[0][0], keyed[0][1], tuple(keyed[1:]))
        return _BRANCHES.put(code, lasti, branch)  # type: ignore[no-any-return]


def _calls_of(filename: str) -> Optional[Dict[Position, List[Hit]]]:
    if filename not in _FILES:
        if len(_FILES) > 256:
            _FILES.clear()
        source = _source(filename)
        _FILES[filename] = (branch_calls(source) if source and len(source) <= _MAX_SOURCE
                            else None)
    return _FILES[filename]


def _source(filename: str) -> str:
    """The file's text, read from disk (linecache's shared cache may be emptied by another
    thread as it is read), else as linecache finds it (a module in a zip, say)."""
    try:
        with tokenize.open(filename) as f:
            return f.read(_MAX_SOURCE + 1)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return "".join(linecache.getlines(filename))


def branch_calls(source: str) -> Optional[Dict[Position, List[Hit]]]:
    """Every call of ``source`` that is a role branch's: its position -> its candidate branches,
    the innermost first, each (line and column of the ``if``, k, name, arm). None where the
    source does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parents: Dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found: Dict[Position, List[Hit]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node)
            hits = _enclosing_branches(node, name, parents) if name is not None else []
            if hits and node.end_lineno is not None and node.end_col_offset is not None:
                found[(node.lineno, node.end_lineno, node.col_offset, node.end_col_offset)] = hits
                moved = _method_call_position(node)
                if moved is not None:
                    found[moved] = hits
    return found


def _method_call_position(call: ast.Call) -> Optional[Position]:
    """Where the interpreter places a method call whose name is on a later line than its
    object (``(comm\n .bcast(x))``): from the name on, so that tracebacks point at it. None
    for any other call. Both positions are kept for such a call: with ``*`` or ``**``
    arguments the interpreter keeps the call's own span."""
    func = call.func
    if not isinstance(func, ast.Attribute) or func.end_lineno in (None, call.lineno) \
            or func.end_col_offset is None or len(func.attr) > func.end_col_offset:
        return None
    line, col = func.end_lineno, func.end_col_offset - len(func.attr)
    end_line = max(line, call.end_lineno or call.lineno)
    end_col = call.end_col_offset or 0
    return (line, end_line, col, max(col, end_col) if line == end_line else end_col)


def _name(call: ast.Call) -> Optional[str]:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _enclosing_branches(call: ast.Call, name: str,
                        parents: Dict[ast.AST, ast.AST]) -> List[Hit]:
    """The enclosing ``if`` statements (inside the call's function) whose arms pair this call, the
    innermost first."""
    hits: List[Hit] = []
    node: ast.AST = call
    while node in parents and not isinstance(node, _SCOPES) and len(hits) < MAX_CANDIDATES:
        parent = parents[node]
        for branch, arm, mine, other in _arms_around(node, parent, parents):
            ordinals = _ordinals(_named_calls(mine, name), parents)
            k = next((i for c, i in ordinals if c is call), None)
            theirs = {i for _, i in _ordinals(_named_calls(other, name), parents)}
            if k is not None and k in theirs and \
                    max(i for _, i in ordinals) == max(theirs):
                hits.append((branch.lineno, branch.col_offset, k, name, arm))
        node = parent
    return hits[:MAX_CANDIDATES]


def _ordinals(calls: List[ast.Call], parents: Dict[ast.AST, ast.AST]
              ) -> List[Tuple[ast.Call, int]]:
    """Each call with its ordinal along a path: the earlier calls that can run before it."""
    return [(c, sum(not _exclusive(e, c, parents) for e in calls[:i]))
            for i, c in enumerate(calls)]


def _exclusive(earlier: ast.AST, later: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    """No run reaches both: they sit in two arms of one ``if`` (or conditional expression),
    or ``earlier`` in the body of an ``if`` that leaves and ``later`` after that ``if``."""
    chain = [earlier]
    while chain[-1] in parents:
        chain.append(parents[chain[-1]])
    ancestors = {id(a): i for i, a in enumerate(chain)}
    node, below = later, later
    while id(node) not in ancestors and node in parents:
        below, node = node, parents[node]
    i = ancestors.get(id(node))
    if i is None or i == 0:
        return False
    mine = chain[i - 1]  # the common ancestor's child on the earlier call's side
    if isinstance(node, (ast.If, ast.IfExp)):
        bodies = (node.body, node.orelse)
        in_body = [mine in b if isinstance(b, list) else mine is b for b in bodies]
        in_other = [below in b if isinstance(b, list) else below is b for b in bodies]
        return (in_body[0] and in_other[1]) or (in_body[1] and in_other[0])
    if isinstance(mine, ast.If) and i >= 2:  # ``earlier`` in an arm of ``mine`` that leaves
        return any(chain[i - 2] in block and _leaves(block) for block in (mine.body, mine.orelse))
    return False


def _arms_around(node: ast.AST, parent: ast.AST, parents: Dict[ast.AST, ast.AST]
                 ) -> List[Tuple[ast.expr | ast.stmt, int, Sequence[ast.AST], Sequence[ast.AST]]]:
    """The branches ``node`` is an arm's part of, as its ``parent`` holds it: (the ``if``,
    which arm, this arm, the other arm)."""
    out: List[Tuple[ast.expr | ast.stmt, int, Sequence[ast.AST], Sequence[ast.AST]]] = []
    if isinstance(parent, ast.IfExp) and node is not parent.test:
        arm = 0 if node is parent.body else 1
        out.append((parent, arm, [node], [parent.orelse if arm == 0 else parent.body]))
    if isinstance(parent, ast.If) and node is not parent.test:
        if node in parent.body:
            if parent.orelse:
                out.append((parent, 0, parent.body, parent.orelse))
            elif _leaves(parent.body):
                out.append((parent, 0, parent.body, _after(parent, parents)))
        elif node in parent.orelse:
            out.append((parent, 1, parent.orelse, parent.body))
    # A statement after an ``if`` whose body always leaves: the statements after it are the
    # other arm of that ``if``, the nearest such ``if`` first.
    for field in ("body", "orelse", "finalbody"):
        block = getattr(parent, field, None)
        if isinstance(block, list) and node in block:
            i = block.index(node)
            for earlier in reversed(block[:i]):
                if isinstance(earlier, ast.If) and not earlier.orelse and _leaves(earlier.body):
                    out.append((earlier, 1, block[block.index(earlier) + 1:], earlier.body))
    return out


def _after(node: ast.stmt, parents: Dict[ast.AST, ast.AST]) -> Sequence[ast.AST]:
    """The statements after ``node`` in the block that holds it."""
    holder = parents.get(node)
    for field in ("body", "orelse", "finalbody"):
        block = getattr(holder, field, None)
        if isinstance(block, list) and node in block:
            return block[block.index(node) + 1:]
    return ()


def _leaves(body: Sequence[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[-1], _EXITS)


def _named_calls(nodes: Sequence[ast.AST], name: str) -> List[ast.Call]:
    """Calls of ``name`` in ``nodes``, in source order, not looking into nested functions or
    classes (lambdas are looked into)."""
    found: List[ast.Call] = []
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Call) and _name(node) == name:
            found.append(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    found.sort(key=lambda c: (c.lineno, c.col_offset))
    return found


register_internal(__file__)
