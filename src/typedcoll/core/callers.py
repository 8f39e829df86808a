"""The callers of a call made outside its function's loops, written in a role branch, or picked
by its function: what tells the uses of a helper, a role wrapper or a wrapper that picks a
route apart.

An engine's ``broadcast_object`` (or ``broadcast_pyobj``) writes the root's side and the
receivers' side of one broadcast in the two arms of ``if rank == src`` (``core.arms``). Its call
sites are its own two lines, the same whatever it is called for. Called from two lines of its
caller (the work requests, then the control requests), its two executions would be one call, and
a rank that skipped the first would hand its peers the second's payload without an error. Such a
wrapper decides which side of the call a rank takes, never which call it makes, as a thin wrapper
decides nothing (``core.identity``). So a rooted call whose site is in a role branch's arm
carries its callers, as a call through a thin wrapper carries its caller's line. So does any
call that its function picks between others and returns (vLLM's
``GroupCoordinator.all_reduce`` returns the custom op's result or its out-of-place route's, by a
flag): its sites tell the routes apart, but each route is the same
line for every use, and the timeout vote and the batch-size vote through it would be one call.
And so does every call outside its function's loops and comprehensions (``loops.loop_spans``):
a helper that makes its collective on a line of its own (``flags = comm.allgather(flag)``,
``return any(flags)``, or after a loop that sums its counts) is the same line for every use.
Carrying the callers only makes an identity finer, so it never pairs two calls that were apart;
its price is a thin wrapper's (one helper reached from two lines for one collective is two
calls). A call inside a loop (a worker's or a driver's) carries none: it runs many times for
one caller, and its lines are its own; unless no path from it gets back to it, as from a retry
loop's ``return comm.allgather(obj)`` (``_returned_at``): once per call, as outside.

  1. ``callers_of``: the call site of the function that holds the role branch, found as the
     call's own site is (``site_walk.site_from`` from that function's caller: plumbing,
     transparent functions and thin wrappers passed over). A function's calls of itself are
     callers like any other: a tree walk that votes at each node and recurses from two lines
     (the draft child, then the target child) tells its nodes apart by the lines and depth that
     reached them, so a rank without a draft child raises at its target's vote where it would
     take its peers' draft vote, and ranks that recurse to different depths for one call are
     two calls (give it a ``name=``). So are calls of itself in a role branch's arms (``if rank
     < mid: return bisect(lo, mid)`` / ``return bisect(mid, hi)``): an arm may recurse twice,
     or stop early by its data, as any function may. A rooted call's levels still pair by role
     (step 3), eight of them. A coroutine is its caller's
     callee only while that caller awaits it or steps it by hand with its own ``send``,
     ``throw`` or ``close`` (``awaited``): one stepped by the event loop, or
     started eagerly inside ``create_task`` (Python 3.12's eager tasks), is its own caller, so
     the walk ends there. Where that site is such a call too (vLLM's
     ``broadcast_tensor_dict`` calls ``broadcast_object`` in both arms of its own), its
     caller's as well: MAX_LEVELS of them one by one, those past them as one marker level
     that digests their sites (``too_deep``: ranks whose chains differ past MAX_LEVELS are two
     calls still) and never pairs by role. A comprehension's frame is its
     function's (before Python 3.12 it has one of its own). Module code is nobody's callee.
  2. ``fingerprint``: the identity is the site's fingerprint and each caller's, digested
     together: a call from another line of the caller is another call, on every rank.
  3. The verdict (``mismatch.split_levels``) pairs a root and its receivers level by level: at
     each level every rank names one site, or the ranks split there by a role branch with the
     root alone in its arm (rooted calls alone: any other call pairs only where every level
     names one site). A driver and its workers that call one such wrapper from two
     methods are two calls, as two lines are; so are two arms of a caller's role branch that
     put the root with other ranks (``if rank == last: bo(None)`` / ``else: bo(x)``): nothing
     tells them from a rank that leaves out one call of two by its role.

The C path walks the same frames with its own ``user_site`` and asks ``role_site`` and
``combined`` here, so both paths send the same identity for the same stack.
"""

from __future__ import annotations

import dis
import os
from types import CodeType, FrameType
from typing import Dict, List, Optional, Tuple

from ..codecs.digest import digest8
from .arms import branch_of
from .identity import site_fingerprint
from .plumbing import register_internal
from .site_walk import Via, site_from, via_name
from .sites import CodeTable, callee_by_stack, column_of, format_call_site, instructions_of
from .mismatch import TOO_DEEP_SITE, Caller
from .loops import in_spans, loop_spans

MAX_LEVELS = 8  # callers kept: a role wrapper called in a role branch of a role wrapper, ...
Level = Tuple[Optional[CodeType], int, Optional[Via]]  # a caller's code, lasti and via
# Callers past MAX_LEVELS are one level (too_deep): a digest of their sites, so ranks whose
# chains differ only there are two calls; named "(more callers: DIGEST)", it never pairs by role
# (mismatch.split_levels).
_OPTIMIZED = 0x01  # a function's code (not a module's or a class body's)
# A comprehension runs in a frame of its own before Python 3.12; its role branch (arms.py reads
# through it) is its function's, so its function's caller is the next level.
COMPREHENSIONS = frozenset({"<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>"})

ROLE, PICKED, AWAITS = 1, 2, 4  # role_site's answers, as bits
_ASYNC = 0x80 | 0x100 | 0x200  # CO_COROUTINE, CO_ITERABLE_COROUTINE, CO_ASYNC_GENERATOR
# The instructions a frame stands at while the coroutine it awaits runs: SEND as it steps it,
# YIELD_VALUE (RESUME from 3.13) while an exception is thrown into it through the frame. The
# inline caches after an instruction are where 3.12 reports a SEND to be.
_STEPS_AWAITED = frozenset(dis.opmap[name] for name in ("SEND", "YIELD_VALUE"))
_RESUME, _CACHE = dis.opmap["RESUME"], dis.opmap.get("CACHE", 0)
# A coroutine stepped by hand steps for the frame that calls these (``_steps_by_hand``)
_STEPPERS = frozenset({"send", "throw", "close"})
_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
_ASYNCIO_DIR = os.path.join(os.path.dirname(dis.__file__), "asyncio", "")
_STEPS = CodeTable()  # a code's instruction -> AWAITS where it steps a coroutine for its frame
_CALLS = frozenset(op for name, op in dis.opmap.items()
                   if name in ("PRECALL", "CALL", "CALL_KW", "CALL_FUNCTION_EX"))
# A function's code -> the spans of its loops and inlined comprehensions (loops.loop_spans):
# its calls outside them are made for its caller.
_PICKED = CodeTable()
_PICKED_AT = CodeTable()  # a code's call -> whether its first copy runs once per call
# What leaves the function on a path after a call (a raise: unless a handler in the loop
# catches it, which only makes the identity finer than the call's runs need).
_RETURNS = frozenset({"RETURN_VALUE", "RETURN_CONST", "RAISE_VARARGS", "RERAISE"})
_ALWAYS_JUMPS = frozenset({"JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT",
                           "JUMP", "JUMP_NO_INTERRUPT"})
# A generator's return ends it for whichever line resumed it last (``next(gen)``, or the ``for``
# that drains it), which its data decides: its calls in loops stay the generator's own.
_GENERATORS = 0x20 | 0x200  # CO_GENERATOR, CO_ASYNC_GENERATOR
_UNREAD = object()

_COMBINED: Dict[bytes, bytes] = {}


def role_site(code: Optional[CodeType], lasti: int) -> int:
    """What the call at ``lasti`` of the function ``code`` is made for: ROLE where it is a role
    branch's (``arms.branch_of``, which keeps what it read per call site), PICKED where the call
    is in no loop or comprehension of its function (``loops.loop_spans``: a helper's, or one
    that its function picks among calls and returns) or no path from it gets back to it
    (``_returned_at``: a retry loop's, outside generators), both, or 0. Its caller then tells
    its executions apart (ROLE for rooted calls alone). AWAITS where the instruction at
    ``lasti`` awaits what it called (``awaited``), module code's too: a notebook cell's
    top-level ``await``. The C path asks it too, once per call site."""
    if code is None:
        return 0
    kind: Optional[int] = _STEPS.get(code, lasti)
    if kind is None:
        raw = code.co_code
        kind = _STEPS.put(code, lasti, AWAITS if _awaits_at(raw, lasti) or (
            _calls_at(raw, lasti) and _steps_by_hand(code, lasti)) else 0)
    if not code.co_flags & _OPTIMIZED:
        return kind
    kind |= ROLE if branch_of(code, lasti) is not None else 0
    picked: Optional[bool] = _PICKED_AT.get(code, lasti)
    if picked is None:
        picked = _PICKED_AT.put(code, lasti, _picked(code, _first_copy(code, lasti)))
    return kind | PICKED if picked else kind


def _picked(code: CodeType, lasti: int) -> bool:
    """Whether the call at ``lasti`` runs at most once per call of its function: it is in no
    loop of it, or no path from it gets back to it (a retry loop's, outside generators)."""
    spans = _PICKED.get(code, 0, _UNREAD)
    if spans is _UNREAD:
        spans = _PICKED.put(code, 0, loop_spans(code))
    return spans is not None and (not in_spans(spans, lasti) or (
        not code.co_flags & _GENERATORS and _returned_at(code, lasti)))


def _first_copy(code: CodeType, lasti: int) -> int:
    """The offset of the first copy the compiler made of the call at ``lasti``, which answers
    for every copy. A ``finally`` block is compiled once for each way out of its ``try`` (the
    end of the block, a ``return`` or ``break`` in it) and once for an exception, its handler
    placed after the code that runs normally and ending in a re-raise; a ``while`` loop's test
    before the loop and at its end. One line and column, one site: its copies must agree on
    whether it carries its callers, or a rank that leaves its ``try`` by an exception
    (``finally: comm.allreduce(failed)`` in a loop) makes another call than its peers. The
    first copy is the code that runs normally (the handler's is after it), so the exception's
    copy answers as that one does."""
    index = _index_at(code, lasti)
    instructions = instructions_of(code)
    this = instructions[index] if index is not None else None
    if this is None or this.positions is None or None in this.positions:
        return lasti  # no columns to tell a copy from another call of the line
    return next((ins.offset for ins in instructions
                 if ins.opname == this.opname and ins.positions == this.positions), lasti)


def _returned_at(code: CodeType, lasti: int) -> bool:
    """Whether no path from the call at ``lasti`` gets back to it (``return
    comm.allgather(obj)``, ``break`` to code after the loop): inside a loop too, that call runs
    once per call of the function where it completes, as a retry loop's does (``for attempt in
    range(3): try: return comm.allgather(obj) except ConnectionError: pass``), so its caller
    tells its uses apart."""
    index = _index_at(code, lasti)
    return index is not None and _returns(instructions_of(code), index + 1)


def _returns(instructions: List[dis.Instruction], after: int) -> bool:
    """Whether no path from instruction ``after`` (the one after a call) jumps back to the
    call or before it, so the call runs once per call of the function: ``return
    any(comm.allgather(flag))``, ``flags = ...`` then ``break`` to a loop over the flags and a
    return after the loop, a log line under a flag between. (A handler that an exception after
    the call reaches and that loops back is not followed: it can only make the identity finer
    than the call's runs need, never coarser.)"""
    call = instructions[after - 1].offset
    index = {ins.offset: i for i, ins in enumerate(instructions)}
    todo, seen = [after], set()
    while todo:
        i = todo.pop()
        while i not in seen and i < len(instructions):
            seen.add(i)
            ins = instructions[i]
            if ins.opname in _RETURNS:
                break
            if ins.opname == "GET_ANEXT":
                return False  # an ``async for``: it leaves by a handler this walk does not read
            if "JUMP" in ins.opname or ins.opname in ("FOR_ITER", "SEND"):
                target = index.get(ins.argval) if isinstance(ins.argval, int) else None
                if target is None or ins.argval <= call:
                    return False  # back to the call's loop, or where it cannot be read
                todo.append(target)
                if ins.opname in _ALWAYS_JUMPS:
                    break
            i += 1
    return True


def _index_at(code: CodeType, lasti: int) -> Optional[int]:
    """The index in ``instructions_of(code)`` of the instruction that holds byte ``lasti``."""
    at = _instruction_at(code.co_code, lasti)
    return next((i for i, ins in enumerate(instructions_of(code)) if ins.offset == at), None)


def _instruction_at(raw: bytes, lasti: int) -> int:
    """The offset of the instruction that holds byte ``lasti`` of ``raw`` (a code's co_code):
    ``lasti`` itself, or the instruction whose inline caches hold it."""
    while 0 < lasti < len(raw) and raw[lasti] == _CACHE:
        lasti -= 2
    return lasti


def _awaits_at(raw: bytes, lasti: int) -> bool:
    """Whether the instruction that holds byte ``lasti`` of ``raw`` (a code's co_code) is one a
    frame stands at while the coroutine it awaits runs."""
    lasti = _instruction_at(raw, lasti)
    if not 0 <= lasti < len(raw) - 1:
        return False
    # RESUME's low two bits say after what it resumes: 0 is the function's start
    return raw[lasti] in _STEPS_AWAITED or (raw[lasti] == _RESUME and raw[lasti + 1] & 3 != 0)


def _calls_at(raw: bytes, lasti: int) -> bool:
    """Whether the instruction that holds byte ``lasti`` of ``raw`` is a call (``_steps_by_hand``
    reads whose): 3.11 runs a call of a C method (``coro.send``) in its PRECALL once
    specialized, so a frame stands there."""
    lasti = _instruction_at(raw, lasti)
    return 0 <= lasti < len(raw) and raw[lasti] in _CALLS


def _steps_by_hand(code: CodeType, lasti: int) -> bool:
    """Whether the instruction at ``lasti`` is a call of a coroutine's own ``send``, ``throw`` or
    ``close`` (``coro.send(None)``, ``self.gen.throw(exc)``), outside asyncio, whose steps of a
    task are the event loop's. The callee is the attribute load that starts where the call
    starts and ends last before the call's end (``coro.send`` of ``coro.send(x)``)."""
    if code.co_filename.startswith(_ASYNCIO_DIR):
        return False
    before = [i for i in instructions_of(code) if i.offset <= lasti]
    if not before or before[-1].opcode not in _CALLS:
        return False
    start, end = _span(before[-1])
    if start is None or end is None:  # no column positions: read the stack instead
        callee = callee_by_stack(before)
    else:
        loads = [i for i in before[:-1] if _span(i)[0] == start and (_span(i)[1] or end) < end]
        callee = max(loads, key=lambda i: _span(i)[1] or end, default=None)
    return callee is not None and callee.opname in _LOADS and callee.argval in _STEPPERS


def _span(ins: dis.Instruction) -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, int]]]:
    """Where an instruction's source starts and ends, as (line, column); None where unknown."""
    at = ins.positions
    if at is None or None in (at.lineno, at.col_offset, at.end_lineno, at.end_col_offset):
        return None, None
    return (at.lineno or 0, at.col_offset or 0), (at.end_lineno or 0, at.end_col_offset or 0)


def awaited(frame: FrameType, site: FrameType) -> bool:
    """Whether each coroutine from ``frame`` up to ``site`` (a frame above it) runs for the frame
    above it: awaited by it, or stepped by it by hand (``coro.send(None)`` in a synchronous
    driver, from one line on every rank). One stepped by anything else (the event loop,
    garbage collection's ``close``) is its own caller: an eager task's first step runs inside
    ``create_task`` and its later steps in the event loop, so which frame stepped it to the call
    is timing, and ranks would name different callers for one call."""
    at: Optional[FrameType] = frame
    while at is not None and at is not site:
        back = at.f_back
        if at.f_code.co_flags & _ASYNC and (
                back is None or not role_site(back.f_code, back.f_lasti) & AWAITS):
            return False
        at = back
    return True


def made_for_caller(kind: int, rooted: bool) -> bool:
    """Whether a call of ``role_site``'s ``kind`` carries its callers."""
    return bool(kind & PICKED or (rooted and kind & ROLE))


def callers_of(frame: Optional[FrameType], rooted: bool = True) -> Tuple[Level, ...]:
    """Step 1: the callers that tell apart the executions of the call at ``frame`` (the call's
    site frame), innermost first; none where the call is neither a role branch's (``rooted``
    calls) nor one its function picks."""
    levels: List[Level] = []
    deeper: List[bytes] = []  # the site fingerprints of the callers past MAX_LEVELS
    while frame is not None and made_for_caller(role_site(frame.f_code, frame.f_lasti), rooted):
        while frame.f_code.co_name in COMPREHENSIONS and frame.f_back is not None:
            frame = frame.f_back
        site, via = site_from(frame.f_back)
        if site is None or not awaited(frame, site):
            break
        if len(levels) < MAX_LEVELS:
            levels.append((site.f_code, site.f_lasti, via))
        else:
            deeper.append(site_fingerprint(site.f_code, site.f_lasti, via))
        frame = site
    if deeper:
        levels.append(too_deep(b"".join(deeper)))
    return tuple(levels)


def too_deep(joined: bytes) -> Level:
    """The level standing for the callers past MAX_LEVELS, their site fingerprints ``joined``:
    one marker whose lasti is their digest, so chains that differ there are two calls."""
    return (None, int.from_bytes(combined(joined)[:4], "little") & 0x7FFFFFFF, None)


def fingerprint(site: bytes, levels: Tuple[Level, ...]) -> bytes:
    """Step 2: the identity of a call at the site of fingerprint ``site`` made for ``levels``."""
    if not levels:
        return site
    return combined(site + b"".join(site_fingerprint(code, lasti, via)
                                    for code, lasti, via in levels))


def combined(joined: bytes) -> bytes:
    """The fingerprint of the site's fingerprint and its callers', joined: 8 bytes that agree
    across processes (the C path sends what this returns)."""
    fp = _COMBINED.get(joined)
    if fp is None:
        if len(_COMBINED) > 65536:
            _COMBINED.clear()
        fp = _COMBINED[joined] = digest8("callers:" + joined.hex())
    return fp


def describe(levels: Tuple[Level, ...]) -> Tuple[Caller, ...]:
    """The callers as envelopes name them, for messages and the verdict."""
    return tuple(Caller(site=format_call_site(code, lasti), column=column_of(code, lasti),
                        via=via_name(via), branch=branch_of(code, lasti))
                 if code is not None else Caller(TOO_DEEP_SITE.format(lasti))
                 for code, lasti, via in levels)


register_internal(__file__)
