"""Whether a function is a thin wrapper, read from its bytecode (``site_walk.is_forwarder``).

A thin wrapper's calls, when it makes any, run together: every execution makes all of them or
none, and they sit on one line. Branches before them are guards (``if self.world_size == 1:
return obj``) and branches after them act on the result: either way no rank can take one of
the wrapper's collectives and not another, and the wrapper's line tells its executions nothing
its caller's does not, so the call is its caller's (``identity`` explains why that matters).
A branch that picks which call runs (``a() if x else b()``, ``if not ready(): return``) keeps
the wrapper's own sites, as do calls on two lines: a function of several statements (a
script's ``main()``, a worker's loop body) keeps its lines in messages, hang reports and dumps.

The reading walks every path through the function's bytecode (it has no loops, so there are
few) and collects the calls each path makes, a call being its source position: the compiler
may copy one call into both arms of a branch (``f(x=1 if a else 2)`` on 3.12), and the copies
are one call of the source. Building the exception that a ``raise`` or an ``assert x, msg``
raises is no call of the wrapper's.

A function that does more is thin at its pass-through call (:func:`pass_through_calls`): the
call that hands on its own arguments unpacked (a decorator's ``func(*args, **kwargs)``) or
whose result it returns (``return self.comm.allgather(obj)`` after a log line), read as above
but for those calls alone, with a ``with`` block or a ``try`` allowed around them. Whatever
else it does (a log line under a debug flag, a timer, a guard that returns first, a tracing
range, ``torch.no_grad()``'s context) decides nothing about which collective runs beneath that
call; any other call it makes (a collective on a line of its own) keeps its site there.

A call that hands on the function's own ``*args`` and ``**kwargs`` whole, whatever the function
adds of its own (:func:`hand_on_calls`), is passed over in a loop or a ``try`` as well (an
``async def``'s at the await of its statement: ``await fn(*args, **kwargs)``, ``await
asyncio.wait_for(fn(*args, **kwargs), t)``): a retry decorator's wrapper repeats its
caller's call, and its one line would make every use of the function one call.

Any other function keeps its sites. Its calls outside its loops and comprehensions
(``loops.loop_spans``: a helper's, or one that picks among calls and returns the one it picked;
an await is no loop) carry its callers (``core.callers``).
"""

from __future__ import annotations

import dis
from collections import Counter
from types import CodeType
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

from .loops import COROUTINE, ENDS, a_plain_function
from .sites import calls_by_line

_MAX_PATHS = 256  # more paths than this: not thin (no wrapper has them)
_REFUSED = ("FOR_ITER", "SEND", "YIELD", "SETUP_", "WITH")  # loops, generators, with blocks
_VARARGS, _VARKEYWORDS = 0x04, 0x08  # takes *args; takes **kwargs
_STARRED = _VARARGS | _VARKEYWORDS
_NO_CALLS: FrozenSet[int] = frozenset()
_FORWARD_JUMPS = ("JUMP_FORWARD", "JUMP", "JUMP_NO_INTERRUPT")

Position = Tuple[Optional[int], Optional[int], Optional[int], Optional[int]]


def forwards(code: CodeType) -> bool:
    """Whether ``code`` is a thin wrapper: a ``def`` or ``lambda`` (not a comprehension,
    generator, module or class body) that never loops or handles an exception, makes its calls
    on one line and makes all of them or none."""
    if getattr(code, "co_exceptiontable", b"") or not a_plain_function(code):
        return False  # a try or with block (3.11+)
    instructions = list(dis.get_instructions(code))
    if any(mark in ins.opname for ins in instructions for mark in _REFUSED):
        return False
    calls = _calls(instructions)
    if calls is None:
        return False
    lines = {position[0] for position in calls.values()}
    if len(lines) != 1 or None in lines:  # first, as it is cheap: most functions stop here
        return False
    made = _calls_per_path(instructions, calls)
    if made is None:
        return False
    every: Set[Position] = set(calls.values())
    return all(not path or path == every for path in made)


def pass_through_calls(code: CodeType) -> FrozenSet[int]:
    """The offsets of the calls at which ``code`` is thin though it does more than make them
    (the module's docstring), or none. Its pass-through calls are those that hand on its own
    arguments unpacked (``func(*args, **kwargs)``) and those whose result it returns
    (``return self.comm.allgather(obj)`` after a log line; ``out = func(...)``, a timer,
    ``return out``). It never loops, and those calls sit on one line and are all made or none
    on every path, a path that makes none making only calls every path makes; a ``with``
    block or a ``try`` may hold them (every rank raises alike out of a collective, so no rank
    alone takes a handler around one). Read once per code object: the walk over its paths
    stops at 256 of them (a long function with many branches is then no pass-through)."""
    if not a_plain_function(code):
        return _NO_CALLS
    instructions = list(dis.get_instructions(code))
    if any(ins.opname in ("FOR_ITER", "SEND") or "YIELD" in ins.opname or
           ins.opname.startswith("SETUP_") for ins in instructions):
        return _NO_CALLS  # a loop, a generator; before 3.11 any try or with block
    calls = _calls(instructions)
    if calls is None:
        return _NO_CALLS
    chosen = _returned(instructions, calls)
    if code.co_flags & _STARRED:
        chosen |= {ins.offset for ins in instructions if ins.opname == "CALL_FUNCTION_EX"}
    passing = {offset: position for offset, position in calls.items() if offset in chosen}
    lines = {position[0] for position in passing.values()}
    if len(lines) != 1 or None in lines:
        return _NO_CALLS
    made = _calls_per_path(instructions, calls)
    if made is None:
        return _NO_CALLS
    every: Set[Position] = set(passing.values())
    # A path that makes none of them makes no call of its own either, only calls every path
    # makes (a guard's test): else its call may be the collective in their place, and
    # receivers that call in one arm would not pair with a root whose call is its caller's.
    common = frozenset.intersection(*made) if made else frozenset()
    if not all(path >= every or (not path & every and path <= common) for path in made):
        return _NO_CALLS
    # A frame inside a call reports the offset of the call or, where the call has inline
    # caches (3.11+), of its last cache entry: every code unit up to the next instruction.
    # Python 3.11 runs a call of a C callable (``Context.run``) in its PRECALL once warm, so a
    # frame stands there on a rank that ran the function eight times and at the CALL on one
    # that did not: from the PRECALL on.
    after = {ins.offset: nxt.offset for ins, nxt in zip(instructions, instructions[1:])}
    before = {nxt.offset: ins.offset for ins, nxt in zip(instructions, instructions[1:])
              if ins.opname == "PRECALL"}
    return frozenset(unit for offset in passing
                     for unit in range(before.get(offset, offset), after.get(offset, offset + 2),
                                       2))


def hand_on_calls(code: CodeType) -> Tuple[FrozenSet[int], bool]:
    """The offsets of the calls that hand on ``code``'s own arguments as they came, its
    ``*args`` and ``**kwargs`` unpacked whole (``fn(*args, **kwargs)``, ``fn(self, *args,
    **kwargs)``, ``fn(*args, attempt=i, **kwargs)``), in a loop or a ``try`` too: a retry
    decorator's wrapper, a ``call_with_retry(fn, *args, **kwargs)``. However often it makes such
    a call, the call repeats its caller's: the caller's arguments are all there, so the
    wrapper's line tells its uses nothing its caller's line does not, and as their site it
    would make every use one call (a skipped use would take the next use's payload). What the
    wrapper adds (an attempt number, a timeout) is its own, the same for every use. Only where
    the source holds one such call, and its callee is not a local the wrapper chose (``for h in
    handlers: h(*args)`` would make two callees' uses one call): two (``f(*a) if x else
    g(*a)``, a call made twice) keep the wrapper's own sites.

    And whether each such callee is a function ``code`` closes over (a decorator's
    ``wrapper(*args, **kwargs)`` calling ``func(*args, **kwargs)``): what such a frame runs is
    the function it wraps, whose own frame is the next one a call passes, and its line is the
    same for every function it wraps. So a call's identity leaves it out of the wrappers passed
    (``site_walk.site_from``): a timer or a tracer applied on one rank alone would else part that
    rank's calls from its peers'."""
    if not code.co_flags & _VARARGS or not a_plain_function(code, nested_allowed=True,
                                                             suspends_allowed=COROUTINE):
        return _NO_CALLS, False  # no *args to hand on; a comprehension, generator, module
    params = code.co_argcount + code.co_kwonlyargcount
    star = code.co_varnames[params]
    double = code.co_varnames[params + 1] if code.co_flags & _VARKEYWORDS else None
    own = set(code.co_varnames[:params + 1 + (double is not None)])
    instructions = [ins for ins in dis.get_instructions(code) if ins.opname != "CACHE"]
    if any(own.intersection(_names(ins)) for ins in instructions
           if ins.opname.startswith("STORE_FAST") or ins.opname == "DELETE_FAST"):
        return _NO_CALLS, False  # it reassigns an argument: it may not hand on its caller's
    found: Dict[int, Position] = {}
    by_line: Dict[int, Tuple[int, int]] = {}
    closure = True
    for i, ins in enumerate(instructions):
        callee = _hands_on(instructions, i, own, star, double) \
            if ins.opname == "CALL_FUNCTION_EX" and (double is None or ins.arg and ins.arg & 1) \
            else None
        if callee is not None:
            closure = closure and callee.opname == "LOAD_DEREF" and \
                callee.argval in code.co_freevars
            found[ins.offset] = _where(ins, instructions, by_line)
    if len(set(found.values())) != 1:
        return _NO_CALLS, False  # two (a branch picking one, a call made twice): its own sites
    after = {ins.offset: nxt.offset for ins, nxt in zip(instructions, instructions[1:])}
    # An async one awaits what it handed on (``return await fn(*args, **kwargs)``, or under a
    # timeout: ``await asyncio.wait_for(fn(*args, **kwargs), t)``): its frame then stands at
    # that statement's await, whose SEND runs the callee.
    index = {ins.offset: i for i, ins in enumerate(instructions)}
    stops = [at for offset in found
             for at in (offset, _awaited_at(instructions, index[offset])) if at is not None]
    return frozenset(unit for at in stops for unit in range(at, after.get(at, at + 2), 2)), closure


def _awaited_at(instructions: List[dis.Instruction], at: int) -> Optional[int]:
    """The offset of the first await's SEND after the call at ``instructions[at]`` in its
    expression (no store, jump or discarded value between them), where one awaits it."""
    for ins in instructions[at + 1:]:
        if ins.opname == "SEND":
            return ins.offset
        if ins.opname.startswith(_EXPRESSION_ENDS) or "JUMP" in ins.opname:
            return None
    return None


_EXPRESSION_ENDS = ("STORE_", "POP_TOP", "RETURN_", "DELETE_", "RAISE_", "RERAISE", "YIELD_")


# What may build a call that hands on its function's arguments: loading the callee (a global,
# a closure's function, a parameter, an attribute of one), packing the parameters, and the
# plain expressions of what the wrapper adds (``attempt=i``, ``timeout=self.timeout * 2``);
# never a call, a jump or a store inside it.
_HANDING_ON = frozenset({
    "LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_LOAD_FAST", "LOAD_DEREF", "LOAD_GLOBAL",
    "LOAD_ATTR", "LOAD_METHOD", "PUSH_NULL", "BUILD_LIST", "BUILD_TUPLE", "LIST_EXTEND",
    "LIST_TO_TUPLE", "CALL_INTRINSIC_1", "BUILD_MAP", "DICT_MERGE", "LOAD_CONST",
    "LOAD_SMALL_INT", "BUILD_CONST_KEY_MAP", "BINARY_OP", "BINARY_SUBSCR", "COMPARE_OP",
    "UNARY_NEGATIVE", "UNARY_NOT", "UNARY_INVERT", "TO_BOOL", "COPY_FREE_VARS"})
# Operators by prefix: before 3.11 each arithmetic operator has its own opcode (BINARY_ADD,
# INPLACE_ADD); from 3.11 the prefix also takes BINARY_SUBSCR and BINARY_SLICE, plain reads too.
_OPERATOR_PREFIXES = ("BINARY_", "INPLACE_")


def _hands_on(instructions: List[dis.Instruction], at: int, own: Set[str], star: str,
              double: Optional[str]) -> Optional[dis.Instruction]:
    """Where the CALL_FUNCTION_EX at ``instructions[at]`` hands on the function's own ``*args``
    (``star``) and ``**kwargs`` (``double``), each unpacked once, to a callee that is not a
    local the function made, the instruction that loads that callee; else None. Read backwards
    to where the expression starts (one value on the stack)."""
    depth = dis.stack_effect(instructions[at].opcode, instructions[at].arg)
    loaded: List[str] = []
    callee: Optional[dis.Instruction] = None  # the expression's first load, read last
    for ins in reversed(instructions[:at]):
        if ins.opname not in _HANDING_ON and not ins.opname.startswith(_OPERATOR_PREFIXES):
            return None
        if ins.opname.startswith("LOAD_"):
            callee = ins
        if ins.opname.startswith("LOAD_FAST"):
            loaded.extend(_names(ins))
        depth += dis.stack_effect(ins.opcode, ins.arg) if ins.arg is not None \
            else dis.stack_effect(ins.opcode)
        if depth == 1:
            if callee is None or callee.opname.startswith("LOAD_FAST") \
                    and not own.issuperset(_names(callee)[:1]):
                return None  # a local the wrapper chose (a loop over handlers): its decision
            handed = loaded.count(star) == 1 and (double is None or loaded.count(double) == 1)
            return callee if handed else None
        if ins.is_jump_target:
            return None  # two ways into the expression: ``(f if c else g)(*args)``
    return None


def _names(ins: dis.Instruction) -> Tuple[str, ...]:
    """The local names an instruction loads or stores (3.13's ``LOAD_FAST_LOAD_FAST``, and
    ``STORE_FAST_STORE_FAST``, name two)."""
    return ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)


def _returned(instructions: List[dis.Instruction], calls: Dict[int, Position]) -> Set[int]:
    """The calls whose result the function returns: returned at once, or stored in a local
    that nothing else stores and that is returned."""
    stores = Counter(ins.argval for ins in instructions if ins.opname == "STORE_FAST")
    returned_locals = {ins.argval for ins, after in zip(instructions, instructions[1:])
                       if ins.opname.startswith("LOAD_FAST") and after.opname == "RETURN_VALUE"}
    by_offset = {ins.offset: ins for ins in instructions}
    out: Set[int] = set()
    for ins, after in zip(instructions, instructions[1:]):
        if after.opname in _FORWARD_JUMPS and isinstance(after.argval, int):
            # before 3.12 a conditional expression's first arm jumps to the one return
            after = by_offset.get(after.argval, after)
        if ins.offset in calls and (after.opname == "RETURN_VALUE" or (
                after.opname == "STORE_FAST" and stores[after.argval] == 1 and
                after.argval in returned_locals)):
            out.add(ins.offset)
    return out


def _calls(instructions: List[dis.Instruction]) -> Optional[Dict[int, Position]]:
    """Offset -> source position of each call that counts; None where a jump goes backwards."""
    calls: Dict[int, Position] = {}
    by_line: Dict[int, Tuple[int, int]] = {}
    raising = False  # between LOAD_ASSERTION_ERROR and its RAISE_VARARGS
    previous = None
    for ins in instructions:
        name = ins.opname
        if name == "LOAD_ASSERTION_ERROR":
            raising = True
        elif name == "RAISE_VARARGS":
            raising = False
            if previous is not None and previous.offset in calls:
                del calls[previous.offset]  # ``raise ValueError(out)``
        elif "JUMP" in name:
            if not isinstance(ins.argval, int) or ins.argval <= ins.offset:
                return None  # a loop
        elif name.startswith("CALL") and not name.startswith("CALL_INTRINSIC") and not raising:
            calls[ins.offset] = _where(ins, instructions, by_line)
        previous = ins
    return calls


def _where(ins: dis.Instruction, instructions: List[dis.Instruction],
           by_line: Dict[int, Tuple[int, int]]) -> Position:
    """Where a call is written: its source span; where the code keeps no column positions
    (``-X no_debug_ranges``), its line and which of the line's calls it is
    (``sites.calls_by_line``, filled into ``by_line`` on first use), so that two calls written
    on one line (``a() if ready else b()``) stay two calls, as their sites do."""
    p = ins.positions
    if p is None or p.col_offset is None:
        if not by_line:
            by_line.update(calls_by_line(instructions))
        index = by_line.get(ins.offset, (None, 0))[0]
        return (p.lineno if p is not None else None, None, None, index)
    return (p.lineno, p.end_lineno, p.col_offset, p.end_col_offset)


def _calls_per_path(instructions: List[dis.Instruction],
                    calls: Dict[int, Position]) -> Optional[List[FrozenSet[Position]]]:
    """The calls each path from the entry to a return or a raise makes (None: too many)."""
    index = {ins.offset: i for i, ins in enumerate(instructions)}
    made: List[FrozenSet[Position]] = []
    pending: List[Tuple[int, FrozenSet[Position]]] = [(0, frozenset())]
    while pending:
        if len(made) + len(pending) > _MAX_PATHS:
            return None
        i, seen = pending.pop()
        while i < len(instructions):
            ins = instructions[i]
            if ins.offset in calls:
                seen = seen | {calls[ins.offset]}
            if ins.opname in ENDS:
                break
            if "JUMP" in ins.opname:
                target = index.get(ins.argval)
                if target is None:
                    return None
                if "IF" in ins.opname:  # conditional: both ways
                    pending.append((target, seen))
                else:
                    i = target
                    continue
            i += 1
        made.append(seen)
    return made
