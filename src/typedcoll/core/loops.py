"""Where a function loops, read from its bytecode (``core.callers``: which calls carry
their callers).

A call outside its function's loops runs at most once per call of the function, so the line that
called it tells its uses apart; a call inside a loop (a worker's, a driver's, a retry that changes
its arguments) runs many times from one caller, and carries none, unless no path from it gets
back to it (``callers._returned_at``: a retry loop's ``return comm.allgather(obj)``). What
compiles to a jump back but is no loop of the function's: a comprehension (before 3.12 a frame
of its own; from 3.12 inlined, and its spans answered, since calls in it run in a loop all the
same), a coroutine's ``await`` and a generator's ``yield from``, and 3.12+'s jump back from an
exception handler placed after the code (:func:`loop_spans`).
"""

from __future__ import annotations

import dis
from types import CodeType
from typing import FrozenSet, List, Optional, Tuple

SUSPENDS = 0x20 | 0x80 | 0x100 | 0x200  # generator, coroutine, async generator
COROUTINE, GENERATOR = 0x80, 0x20  # an ``async def``; a ``def`` that yields
ASYNC_GENERATOR = 0x200  # an ``async def`` that yields
ITERABLE_COROUTINE = 0x100  # a generator ``types.coroutine`` made awaitable: its yield from awaits
RESUMED = COROUTINE | GENERATOR | ASYNC_GENERATOR | ITERABLE_COROUTINE  # run by who resumes them
_NEWLOCALS = 0x02  # a function's code, not a module's or a class body's
ENDS = frozenset({"RETURN_VALUE", "RETURN_CONST", "RAISE_VARARGS", "RERAISE"})
_NO_JUMPS: FrozenSet[int] = frozenset()


def in_spans(spans: List[Tuple[int, int]], offset: int) -> bool:
    """Whether ``offset`` lies in one of ``spans`` (:func:`loop_spans`)."""
    return any(first <= offset <= last for first, last in spans)


def loop_spans(code: CodeType) -> Optional[List[Tuple[int, int]]]:
    """None where ``code`` is not a function (a module or a class body) or a jump of it cannot
    be read; else the (first, last) offsets of its loops (a worker's, a driver's, a retry that
    changes its arguments) and of the comprehensions inlined into it, whose calls run in a
    loop all the same. Functions inside a function are not its loops: before 3.12 a
    comprehension runs in a frame of its own (a frame with a loop), and from 3.12 one is inlined
    (``return any([f for f in flags])``), read here as a loop, so a vote helper and a call in a
    comprehension read alike on every version. Nor are a coroutine's awaits (an async engine's
    vote helper) or a generator's ``yield from``: each compiles to a jump back, but runs the
    awaited object once. A generator's calls outside its loops (a ``contextlib.contextmanager``
    that votes on entry, an async one for an ``asynccontextmanager``) carry their callers as a
    function's do: those of the frame that resumed it. A span runs from a loop's first
    instruction to its jump back, so a handler placed after the code that jumps back into a loop
    (a retry's ``except E: continue``) covers the code between: its calls carry none."""
    if not a_plain_function(code, nested_allowed=True, suspends_allowed=RESUMED):
        return None
    suspends = code.co_flags & RESUMED
    instructions = list(dis.get_instructions(code))
    inlined = _inlined_comprehensions(instructions)
    awaiting = _await_jumps(instructions) if suspends else _NO_JUMPS
    back = [ins for ins in instructions if "JUMP" in ins.opname and ins.offset not in awaiting
            and not (isinstance(ins.argval, int) and (ins.argval > ins.offset or
                                                      in_spans(inlined, ins.argval)))]
    if any(not isinstance(ins.argval, int) for ins in back):
        return None
    # A loop runs from the target of its jump back to the jump: a call there runs many times
    # from one caller; one before or after it (a helper that sums in a loop, then votes) once.
    loops = [(ins.argval, ins.offset) for ins in back if _on_a_cycle(code, instructions, [ins])]
    return inlined + loops


def _on_a_cycle(code: CodeType, instructions: List[dis.Instruction],
                back: List[dis.Instruction]) -> bool:
    """Whether one of the jumps ``back`` closes a loop: its target leads to it again, a raise
    into a handler counted as a way on. 3.12 and later place an exception handler after the
    function's code and jump back from it to the code after its ``with`` or ``try`` block
    (3.12: a ``with`` of two context managers; 3.13: any ``with``, an ``except`` that goes on):
    such a jump runs at most once per pass, as the block does; a retry that goes back into
    the ``try`` (``except E: continue``) is a loop."""
    entries = getattr(dis.Bytecode(code), "exception_entries", [])
    following = {ins.offset: nxt.offset for ins, nxt in zip(instructions, instructions[1:])}

    def successors(ins: dis.Instruction) -> List[int]:
        out = [e.target for e in entries if e.start <= ins.offset < e.end]
        jumps = "JUMP" in ins.opname or ins.opname in ("FOR_ITER", "SEND")
        if jumps and isinstance(ins.argval, int):
            out.append(ins.argval)
        onward = not (ins.opname in ENDS or (jumps and not ins.opname.startswith(
            ("POP_JUMP", "JUMP_IF")) and ins.opname not in ("FOR_ITER", "SEND")))
        if onward and ins.offset in following:
            out.append(following[ins.offset])
        return out

    by_offset = {ins.offset: ins for ins in instructions}
    for jump in back:
        seen, todo = set(), [jump.argval]
        while todo:
            offset = todo.pop()
            if offset == jump.offset:
                return True
            if offset in seen or offset not in by_offset:
                continue
            seen.add(offset)
            todo.extend(successors(by_offset[offset]))
    return False


def _await_jumps(instructions: List[dis.Instruction]) -> FrozenSet[int]:
    """The offsets of the jumps back that an ``await`` compiles to, none of them a loop of the
    coroutine's (an async engine's vote helper has them; an ``async for`` has a loop besides):
    back to its SEND after each value the awaited object yields, and (3.12+) back to the
    await's end after a CLEANUP_THROW."""
    sends = {ins.offset for ins in instructions if ins.opname == "SEND"}
    return frozenset(ins.offset for before, ins in zip([None, *instructions], instructions)
                     if "JUMP" in ins.opname and (ins.argval in sends or (
                         before is not None and before.opname == "CLEANUP_THROW")))


def _inlined_comprehensions(instructions: List[dis.Instruction]) -> List[Tuple[int, int]]:
    """The (first, last) offsets of each loop of a comprehension inlined into its function
    (3.12+): its first loop starts at the FOR_ITER after LOAD_FAST_AND_CLEAR saves its variables
    (the iterable is evaluated before), and loops starting inside it are its own too."""
    spans: List[Tuple[int, int]] = []
    saved = False
    for ins in instructions:
        if ins.opname == "LOAD_FAST_AND_CLEAR":
            saved = True
        elif ins.opname == "FOR_ITER" and isinstance(ins.argval, int):
            if saved or in_spans(spans, ins.offset):
                spans.append((ins.offset, ins.argval))
            saved = False
    return spans


def a_plain_function(code: CodeType, nested_allowed: bool = False,
                      suspends_allowed: int = 0) -> bool:
    """A ``def`` or ``lambda``: not a comprehension, module or class body, nor a generator or
    coroutine of a kind not in ``suspends_allowed`` (its code flags), and (unless
    ``nested_allowed``) with no function of its own inside (before 3.12 a comprehension is one:
    a loop)."""
    suspends = SUSPENDS & ~suspends_allowed
    return not ((code.co_name.startswith("<") and code.co_name != "<lambda>") or
                code.co_flags & suspends or not code.co_flags & _NEWLOCALS or
                (not nested_allowed and
                 any(isinstance(const, CodeType) for const in code.co_consts)))
