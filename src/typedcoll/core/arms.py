"""Role branches: one rooted collective written once in each arm of an ``if``.

Code that branches on its role often issues the root's side and the receivers' side of one
collective from two lines::

    if rank == src:
        comm.bcast(obj, root=src)           # the root's arm
        return obj
    else:
        return comm.bcast(None, root=src)   # the receivers' arm

Their call sites differ, so the envelopes disagree on identity. This module reads, from the source
every rank runs, whether a call is such a branch's: the k-th call of its name (``bcast``) in one
arm of an ``if``/``else`` (or of a conditional expression, or of an ``if`` whose body always leaves
the block — return, raise, continue, break — against the statements after it) whose test splits
ranks by role alone (``role_test``: ``rank == src``, ``is_driver_worker``; an ``if ready:`` or ``if
rank == 0 and ready:`` the root took the other way of by a flag of its own would hand its receivers
the root's other call), where the other arm has a k-th call of that name too. Where at most one of
the two arms chooses among its calls, ordinals are counted along one path through each arm: the
calls before this one that can run before it, so calls in two arms of an ``if`` nested in the arm
(or in an arm that always leaves of an earlier ``if`` in the same block) do not count each other,
and the longest run must be as long in both arms. SGLang's ``broadcast_pyobj`` sends a size alone
when the data is empty, else a size and the data, while its receivers read the size and return
early on 0: the root's two size calls are both the first of their path and pair with the receivers'
one. Where both arms choose (``if cached: body / else: header, body`` on both sides, ``cached`` a
rank's own), a rank on one path would pair its header with a peer's body: there ordinals are
counted in the source, with as many calls in each arm, as written; and where one arm chooses, each
of its paths must end where the other arm can (its last call, or an exit between two of its calls),
so receivers that skip a header by a flag of their own pair nothing. A root that skips its arm's
first call under a condition of its own reaches its second with ordinal 2, and the receivers' first
(ordinal 1) still differs; arms whose longest runs differ (a call only the receivers make) pair
nothing. A call may sit in several nested ``if`` statements that pair it (a role branch under a
setting every rank shares, or a receivers' arm split further by ``elif``): each is a candidate, the
innermost first. The verdict takes the root's innermost, so two role branches under a condition of
the rank's own (``(b(x) if r == 0 else b(None)) if ready else (b(y) if r == 0 else b(None))``, the
root ready and its receivers not) raise: each names its own. ``branch_of(code, lasti)`` gives the
candidates (each: file, the ``if``'s line and column, k, name: two conditional expressions on one
line are two branches; and the arm this call is in); the verdict (``verdict.disagreement``,
``mismatch.split_branch``) accepts a rooted collective whose envelopes differ only in their sites
when every rank names the root's innermost branch and the root alone is in its arm. Only rooted
ops: two votes written in two arms (``allreduce`` of a timeout, ``allreduce`` of a batch size) are
different calls, and a rank in the wrong arm must still raise.

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
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .plumbing import register_internal
from .sites import CodeTable, Position, callee_name, line_of, position_of, source_name
from .mismatch import Branch
from .role_test import tests_a_role

_MAX_SOURCE = 4 * 1024 * 1024  # bytes of source parsed for one file, at most
_EXITS = (ast.Return, ast.Raise, ast.Continue, ast.Break)
# A call's branch is looked for up to the function that holds it (a lambda is an expression of
# its arm: ``step(lambda: comm.bcast(x))`` is that arm's call).
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)
Hit = Tuple[int, int, int, str, int]  # the if's line and column, k, name, arm
LineName = Tuple[int, str]  # where code keeps no column positions: a call's line and name
MAX_CANDIDATES = 8  # enclosing branches kept per call, the innermost first


Refusal = Tuple[int, str]  # a role branch that pairs nothing of a call: its line, and why
# filename -> ({position of a call -> its Hits, innermost first}, the same by line and name,
# {position -> the innermost role branch that does not pair it}); None: source not read
Calls = Tuple[Dict[Position, List[Hit]], Dict[LineName, List[Hit]], Dict[Position, Refusal]]
_FILES: Dict[str, Optional[Calls]] = {}
# (code, lasti) -> (its role branch, what a DesyncError says of a branch that pairs it with
# nothing): both read from the one parse of the file, once per call site
_BRANCHES = CodeTable()
_NEITHER: Tuple[Optional[Branch], Optional[str]] = (None, None)
_LOCK = threading.Lock()


def branch_of(code: Optional[CodeType], lasti: int) -> Optional[Branch]:
    """The role branch of the call at bytecode offset ``lasti`` of ``code`` (None: none)."""
    return _read(code, lasti)[0]


def unpaired_of(code: Optional[CodeType], lasti: int) -> Optional[str]:
    """Where the call at ``lasti`` of ``code`` is in an arm of a role branch whose arms do not
    pair their calls of its name, what a DesyncError says of that branch (else None): its
    calls then pair nothing, and a ``name=`` would pair a call one arm lacks with the next."""
    return _read(code, lasti)[1]


def _read(code: Optional[CodeType], lasti: int) -> Tuple[Optional[Branch], Optional[str]]:
    if code is None:
        return _NEITHER
    found = _BRANCHES.get(code, lasti)
    if found is not None:
        return found  # type: ignore[no-any-return]
    # One reader at a time: in-process ranks are threads, and a file is parsed once.
    with _LOCK:
        try:
            position = position_of(code, lasti)
            # without column positions: the line and the name called (``branch_calls``)
            name = callee_name(code, lasti) if position is None else None
            calls = _calls_of(code.co_filename) if position or name else None
        except Exception:  # never raise in a cold path a rank's peers wait in; not remembered
            return _NEITHER
        hits = refusal = None
        if calls is not None:
            hits = calls[0].get(position) if position is not None else \
                calls[1].get((line_of(code, lasti), name or ""))
            refusal = calls[2].get(position) if position else None
        branch = text = None
        where = source_name(code.co_filename)
        if hits:
            keyed = [(f"{where}:{h[0]}:{h[1]} {h[3]} #{h[2] + 1}", h[4]) for h in hits]
            branch = Branch(keyed[0][0], keyed[0][1], tuple(keyed[1:]))
        if refusal is not None:
            text = f"role branch at {where}:{refusal[0]}, whose arms {refusal[1]}"
        return _BRANCHES.put(code, lasti, (branch, text))  # type: ignore[no-any-return]


def _calls_of(filename: str) -> Optional[Calls]:
    if filename not in _FILES:
        if len(_FILES) > 256:
            _FILES.clear()
        source = _source(filename)
        by_line: Dict[LineName, List[Hit]] = {}
        refused: Dict[Position, Refusal] = {}
        spans = branch_calls(source, by_line, refused) \
            if source and len(source) <= _MAX_SOURCE else None
        _FILES[filename] = (spans, by_line, refused) if spans is not None else None
    return _FILES[filename]


def _source(filename: str) -> str:
    """The file's text, read from disk (linecache's shared cache may be emptied by another
    thread as it is read), else as linecache finds it (a module in a zip, say)."""
    try:
        with tokenize.open(filename) as f:
            return f.read(_MAX_SOURCE + 1)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return "".join(linecache.getlines(filename))


def branch_calls(source: str, by_line: Optional[Dict[LineName, List[Hit]]] = None,
                 refused: Optional[Dict[Position, Refusal]] = None
                 ) -> Optional[Dict[Position, List[Hit]]]:
    """Every call of ``source`` that is a role branch's: its position -> its candidate branches,
    the innermost first, each (line and column of the ``if``, k, name, arm). None where the
    source does not parse. ``by_line`` gets them by line and name called, for code without
    column positions (``-X no_debug_ranges``), where a line's calls of that name
    are all one branch's alike. ``refused`` gets the calls no role branch pairs that are in
    the arm of one whose arms do not pair their calls of that name (the innermost)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parents: Dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found: Dict[Position, List[Hit]] = {}
    named: Dict[LineName, List[List[Hit]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node)
            refusals: List[Refusal] = []
            hits = _enclosing_branches(node, name, parents, refusals) if name is not None else []
            if name is not None:
                named.setdefault((node.lineno, name), []).append(hits)
            if refused is not None and refusals and not hits and node.end_lineno is not None \
                    and node.end_col_offset is not None:
                refused[(node.lineno, node.end_lineno, node.col_offset, node.end_col_offset)] = \
                    refusals[0]
                moved = _method_call_position(node)
                if moved is not None:
                    refused[moved] = refusals[0]
            if hits and node.end_lineno is not None and node.end_col_offset is not None:
                found[(node.lineno, node.end_lineno, node.col_offset, node.end_col_offset)] = hits
                moved = _method_call_position(node)
                if moved is not None:
                    found[moved] = hits
    if by_line is not None:
        by_line.update((key, each[0]) for key, each in named.items()
                       if each[0] and all(hits == each[0] for hits in each))
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


def _enclosing_branches(call: ast.Call, name: str, parents: Dict[ast.AST, ast.AST],
                        refusals: Optional[List[Refusal]] = None) -> List[Hit]:
    """The enclosing ``if`` statements (inside the call's function) whose arms pair this call, the
    innermost first (at most MAX_CANDIDATES: a farther one can only be a false alarm's cause);
    ``refusals`` gets those whose arms do not, the innermost first."""
    hits: List[Hit] = []
    node: ast.AST = call
    while node in parents and not isinstance(node, _SCOPES) and len(hits) < MAX_CANDIDATES:
        parent = parents[node]
        for branch, arm, mine, other in _arms_around(node, parent, parents):
            if not tests_a_role(getattr(branch, "test", None)):
                continue
            ours, theirs = _named_calls(mine, name), _named_calls(other, name)
            hit = _pair(call, ours, theirs, mine, other, parents)
            if hit is not None:
                hits.append((branch.lineno, branch.col_offset, hit, name, arm))
            elif refusals is not None and ours and theirs:  # else: other names (wrappers)
                counts = (len(ours), len(theirs)) if arm == 0 else (len(theirs), len(ours))
                refusals.append((branch.lineno, _refusal(name, *counts)))
        node = parent
    return hits


def _refusal(name: str, first: int, second: int) -> str:
    """Why a role branch pairs nothing of its arms' calls of ``name`` (as counted in each)."""
    if first != second:
        return (f"make {first} and {second} {name} calls (one makes a call the other lacks), so "
                f"they pair none")
    return f"make their {name} calls under conditions of their own, so they pair none"


def _pair(call: ast.Call, mine: List[ast.Call], other: List[ast.Call],
          mine_arm: Sequence[ast.AST], other_arm: Sequence[ast.AST],
          parents: Dict[ast.AST, ast.AST]) -> Optional[int]:
    """``call``'s ordinal k where the other arm has a k-th call too, else None.

    Along paths where at most one arm branches between its calls (the root's data or no data,
    against receivers that read one size and stop early); in source order, with as many calls
    in each arm, where both do: two arms that each choose among their calls by a condition of
    their own (``if cached: body else: header, body`` on both sides) would pair a rank's header
    with its peer's body, so there the k-th call of each arm pairs, as written."""
    ours, theirs = _ordinals(mine, parents), _ordinals(other, parents)
    in_source = next((i for i, c in enumerate(mine) if c is call), None)
    if in_source is None:
        return None
    we_branch = _branches_between(ours)
    if we_branch == _branches_between(theirs):  # neither arm chooses, or both do
        return in_source if len(mine) == len(other) else None
    # One arm chooses among its calls: each of its paths must end where the other, straight
    # arm can end too (its last call, or an exit between two of its calls: receivers that
    # read a size and return on 0); else a receiver whose own flag skipped a header would take
    # the root's header as its body.
    branching, straight, straight_arm = (ours, other, other_arm) if we_branch \
        else (theirs, mine, mine_arm)
    ends = {len(straight)} | _stops(straight, straight_arm, parents)
    if any(length not in ends for length in _path_lengths(branching, parents)):
        return None
    k = next((i for c, i in ours if c is call), None)
    ks = {i for _, i in theirs}
    return k if k is not None and k in ks and max(i for _, i in ours) == max(ks) else None


def _branches_between(ordinals: List[Tuple[ast.Call, int]]) -> bool:
    return any(i != j for j, (_, i) in enumerate(ordinals))


def _path_lengths(ordinals: List[Tuple[ast.Call, int]],
                  parents: Dict[ast.AST, ast.AST]) -> List[int]:
    """How many calls each path through an arm makes: a call no later call can follow ends
    one, after its ordinal's count of calls."""
    calls = [c for c, _ in ordinals]
    return [i + 1 for n, (c, i) in enumerate(ordinals)
            if all(_exclusive(c, later, parents) for later in calls[n + 1:])]


def _stops(calls: List[ast.Call], arm: Sequence[ast.AST],
           parents: Dict[ast.AST, ast.AST]) -> Set[int]:
    """The counts k (0 < k < len(calls)) after which a straight arm can stop: a return or
    raise between its k-th and (k+1)-th call, or a break or continue of a loop around the
    whole branch (an exit that holds the next call, ``return bcast(None)``, is after it)."""
    exits = _exits(arm, parents)
    stops: Set[int] = set()
    for k in range(1, len(calls)):
        before, after = calls[k - 1], calls[k]
        lo = (before.end_lineno or before.lineno, before.end_col_offset or 0)
        hi = (after.lineno, after.col_offset)
        if any(lo <= (e.lineno, e.col_offset) < hi and not _under(after, e, parents)
               for e in exits):
            stops.add(k)
    return stops


def _exits(arm: Sequence[ast.AST], parents: Dict[ast.AST, ast.AST]) -> List[ast.stmt]:
    """Returns and raises in the arm, and breaks and continues of loops around it (not in
    nested functions or classes)."""
    tops = {id(node) for node in arm}
    found: List[ast.stmt] = []
    stack: List[ast.AST] = list(arm)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Return, ast.Raise)):
            found.append(node)
        elif isinstance(node, (ast.Break, ast.Continue)) and not _loop_in_arm(node, tops, parents):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _loop_in_arm(node: ast.AST, tops: Set[int], parents: Dict[ast.AST, ast.AST]) -> bool:
    """Whether the loop a break or continue belongs to lies inside the arm."""
    while node in parents:
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            return True
        if id(node) in tops:
            return False
        node = parents[node]
    return False


def _under(node: ast.AST, top: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` is ``top`` or inside it."""
    while node is not top and node in parents:
        node = parents[node]
    return node is top


def _ordinals(calls: List[ast.Call], parents: Dict[ast.AST, ast.AST]
              ) -> List[Tuple[ast.Call, int]]:
    """Each call with its ordinal along a path: the earlier calls that can run before it."""
    return [(c, sum(not _exclusive(e, c, parents) for e in calls[:i]))
            for i, c in enumerate(calls)]


def _exclusive(earlier: ast.AST, later: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    """No run reaches both: they sit in two arms of one ``if`` (or conditional expression), or
    ``earlier`` in an arm that always leaves (return, raise, continue, break) of an ``if``
    that comes before ``later`` in the same block. Only the same block: a loop's ``else``, a
    ``finally`` or an ``except`` still runs after such an exit."""
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
        side = [next((a for a, b in enumerate(bodies)
                      if (x in b if isinstance(b, list) else x is b)), None)
                for x in (mine, below)]
        if None not in side and side[0] != side[1]:
            return True
    for field in ("body", "orelse", "finalbody"):
        block = getattr(node, field, None)
        if isinstance(block, list) and mine in block and below in block:
            if i < 2 or not isinstance(mine, ast.If) or block.index(mine) > block.index(below):
                return False
            return any(chain[i - 2] in arm and _leaves(arm) for arm in (mine.body, mine.orelse))
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


def _leaves(body: Sequence[ast.stmt], in_with: bool = False) -> bool:
    """Whether ``body`` always leaves its block: it ends in a return, raise, continue or break,
    or in a ``with`` whose body does so other than by a raise (a context manager may swallow
    that), or in an ``if`` whose arms both do."""
    if not body:
        return False
    last = body[-1]
    if isinstance(last, (ast.With, ast.AsyncWith)):
        return _leaves(last.body, True)
    if isinstance(last, ast.If):
        return bool(last.orelse) and _leaves(last.body, in_with) and _leaves(last.orelse, in_with)
    return isinstance(last, _EXITS) and not (in_with and isinstance(last, ast.Raise))


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
