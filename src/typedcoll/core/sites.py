"""How a call site is named: its line, its column and its file, worked out from a code object
and a bytecode offset (``f_lasti``, an int read on hot paths) only when shown or first
fingerprinted, and kept in :class:`CodeTable` caches.

Sites read ``file.py:LINE``, the file named by its module (``core.identity`` says why).
"""

from __future__ import annotations

import dis
import hashlib
import os
import sys
from itertools import islice
from types import CodeType
from typing import Any, Callable, Dict, List, Optional, Tuple

from .plumbing import register_internal

Position = Tuple[int, int, int, int]  # line, end line, column, end column of an instruction


class CodeTable:
    """What was worked out for a bytecode offset of a code object, keyed by the code object's
    address: hashing a code object hashes its whole bytecode (microseconds for a long
    function), on every call. Each entry holds its code object, so an address in the table is
    never reused by another while the entry lives."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: Dict[Tuple[int, int], Tuple[Any, Any]] = {}

    def get(self, code: Optional[object], lasti: int, default: Any = None) -> Any:
        entry = self.entries.get((id(code), lasti))
        return entry[1] if entry is not None and entry[0] is code else default

    def put(self, code: Optional[object], lasti: int, value: Any) -> Any:
        if len(self.entries) > 65536:
            self.entries.clear()
        self.entries[(id(code), lasti)] = (code, value)
        return value


_LINES = CodeTable()
_POSITIONS = CodeTable()
_CALLS_ON_LINE = CodeTable()
_INSTRUCTIONS = CodeTable()  # a code's (-1) -> its instructions (instructions_of)
# 3.11's PRECALL is left out: it comes just before its CALL, so counts as that CALL
_CALL_OPS = frozenset(op for name, op in dis.opmap.items()
                      if name in ("CALL", "CALL_KW", "CALL_FUNCTION_EX"))
_PRECALL = dis.opmap.get("PRECALL", -1)
_ENDS_RUN = frozenset({"RETURN_VALUE", "RETURN_CONST", "RERAISE", "RAISE_VARARGS",
                       "JUMP_FORWARD", "JUMP_BACKWARD", "JUMP",
                       "JUMP_BACKWARD_NO_INTERRUPT", "JUMP_NO_INTERRUPT"})
_UNREAD_OPS = frozenset({"NOP", "PUSH_EXC_INFO", "CACHE", "EXTENDED_ARG", "RESUME"})
_JUMP_OPS = frozenset(dis.hasjrel + dis.hasjabs)
_CALLEE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_FAST",
                           "LOAD_DEREF", "LOAD_CLOSURE", "LOAD_FAST_CHECK"})
_UNSET = object()
_SOURCE_NAMES: Dict[str, str] = {}  # co_filename -> how sites name it
_CODE_SOURCES = CodeTable()  # code exec made from a string's (-1) -> its name and digest
_ANONYMOUS_SOURCES = frozenset({"<string>", "<unknown>"})  # what exec and compile name it


def line_of(code: CodeType, lasti: int) -> int:
    """The source line of bytecode offset ``lasti`` in ``code``."""
    line: Optional[int] = _LINES.get(code, lasti)
    if line is None:
        line = code.co_firstlineno
        for start, end, number in code.co_lines():
            if start <= lasti < end:
                line = number if number is not None else line
                break
        _LINES.put(code, lasti, line)
    return line


def position_of(code: CodeType, lasti: int) -> Optional[Position]:
    """The source span of the instruction at ``lasti`` (a call: the whole call expression),
    columns in UTF-8 bytes as the interpreter and ``ast`` count them; None where the
    interpreter keeps no columns (before 3.11, or ``-X no_debug_ranges``)."""
    known = _POSITIONS.get(code, lasti, _UNSET)
    if known is not _UNSET:
        return known  # type: ignore[no-any-return]
    positions = getattr(code, "co_positions", None)
    # One entry per 2-byte code unit, caches included: a call's caches share its span.
    span = next(islice(positions(), lasti // 2, None), None) if positions is not None else None
    found: Optional[Position] = None
    if span is not None and None not in span:
        found = span
    return _POSITIONS.put(code, lasti, found)  # type: ignore[no-any-return]


def column_of(code: Optional[CodeType], lasti: int) -> Optional[int]:
    """The column where the call at ``lasti`` starts (0-based), None where none is known."""
    position = position_of(code, lasti) if code is not None else None
    return position[2] if position is not None else None


def site_key(code: CodeType, lasti: int) -> str:
    """What a site's fingerprint holds: ``file.py:LINE:COL``; where the code keeps no column
    positions, ``file.py:LINE`` and which of the line's calls it is (``#2``: the third in
    bytecode order), so that two calls written on one line stay two calls there too."""
    column = column_of(code, lasti)
    site = format_column(format_site(code, lasti), column)
    return site if column is not None else f"{site}#{_calls_on_line(code, lasti)[0]}"


def format_call_site(code: Optional[CodeType], lasti: int) -> str:
    """A call's site as envelopes name it: :func:`format_site`, and where the code keeps no
    column positions and its line holds more than one call, which of them it is (messages
    show the column instead where one is known)."""
    site = format_site(code, lasti)
    if code is None or column_of(code, lasti) is not None:
        return site
    index, count = _calls_on_line(code, lasti)
    return site if count < 2 else f"{site} (call {index + 1} of {count} on its line)"


def _calls_on_line(code: CodeType, lasti: int) -> Tuple[int, int]:
    """Which of its line's calls the call at ``lasti`` is, from 0 in bytecode order, and how
    many the line holds (:func:`calls_by_line`); (0, 1) for an offset that holds no call."""
    table: Optional[Dict[int, Tuple[int, int]]] = _CALLS_ON_LINE.get(code, -1)
    if table is None:
        table = _CALLS_ON_LINE.put(code, -1, calls_by_line(instructions_of(code)))
    raw = code.co_code
    if 0 <= lasti < len(raw) and raw[lasti] == _PRECALL:  # 3.11: the CALL after it
        at = min((offset for offset in table if offset > lasti), default=lasti)
    else:  # the call, or one of the inline caches that follow it
        at = max((offset for offset in table if offset <= lasti), default=lasti)
    return table.get(at, (0, 1))


def calls_by_line(instructions: List[dis.Instruction]) -> Dict[int, Tuple[int, int]]:
    """Each call's offset -> which of its line's calls it is and how many the line holds, for
    code without column positions, where that is what tells apart two calls of one line. A
    call reads as the instructions of its line that lead to it since the last jump target,
    exception handler or end of a path (jumps without their targets): the copies the compiler
    makes of one call (a ``finally`` block's, a ``with`` block's exit on each way out) read
    alike and count once."""
    lines: Dict[int, List[Tuple[Any, ...]]] = {}
    found: Dict[int, Tuple[int, Tuple[Any, ...]]] = {}
    line, run = None, []  # type: Tuple[Optional[int], List[Tuple[Any, ...]]]
    ended = False  # the instruction before ends its run: no instruction follows it there
    for ins in instructions:
        at = ins.positions.lineno if ins.positions is not None else None
        at = line if at is None else at
        if at != line or ins.is_jump_target or ins.opname == "PUSH_EXC_INFO" or ended:
            line, run = at, []
        ended = ins.opname in _ENDS_RUN
        if ins.opname in _UNREAD_OPS:
            continue
        run.append((ins.opname,) if ins.opcode in _JUMP_OPS else (ins.opname, repr(ins.argval)))
        if ins.opcode in _CALL_OPS and line is not None:
            reading = tuple(run)
            seen = lines.setdefault(line, [])
            if reading not in seen:
                seen.append(reading)
            found[ins.offset] = (line, reading)
    return {offset: (lines[line].index(reading), len(lines[line]))
            for offset, (line, reading) in found.items()}


def callee_by_stack(before: List[dis.Instruction]) -> Optional[dis.Instruction]:
    """The load that pushed the callee of the call ``before[-1]`` (its name is the load's
    ``argval``), for code compiled without column positions (``-X no_debug_ranges``): walking
    back from the call, the one before which the instructions in between push exactly what
    the call takes (its arguments; the keywords' names; ``*args`` and ``**kwargs``). A load
    pushes the callee with its object or a NULL, so those follow it directly. None where a
    jump lies in between (a conditional argument) or the count is not known."""
    at = len(before) - 1
    if before[at].opname == "CALL" and at and before[at - 1].opname == "PRECALL":
        at -= 1  # 3.11: the arguments end at PRECALL, which carries the same count
    taken = _TAKES.get(before[at].opname)
    if taken is None:
        return None
    count, pushed = taken(before[at].arg or 0), 0
    for ins in reversed(before[:at]):
        if pushed == count and ins.opname in _CALLEE_LOADS:
            return ins  # type: ignore[no-any-return]
        if pushed == count and ins.opname == "PUSH_NULL":
            continue  # 3.13 pushes the NULL after the callee it goes with
        if ins.opcode in _JUMP_OPS:
            return None
        try:
            pushed += dis.stack_effect(
                ins.opcode, ins.arg if ins.opcode >= dis.HAVE_ARGUMENT else None)
        except ValueError:
            return None
        if pushed > count:  # a prefix of the arguments' code never pops below its base
            return None
    return None


# What a call takes off the stack above its callee, by its oparg: the arguments, with the
# keywords' names as one more (3.13's CALL_KW), or *args and, where
# the low bit is set, **kwargs.
_TAKES: Dict[str, Callable[[int], int]] = {
    "CALL": lambda n: n, "PRECALL": lambda n: n, "CALL_KW": lambda n: n + 1,
    "CALL_FUNCTION_EX": lambda flags: 1 + (flags & 1)}


def callee_name(code: CodeType, lasti: int) -> Optional[str]:
    """The name the call at ``lasti`` calls (``bcast`` of ``comm.bcast(x)``), read from the
    stack (:func:`callee_by_stack`); None where it cannot be told."""
    before = [ins for ins in instructions_of(code) if ins.offset <= lasti]
    callee = callee_by_stack(before) if before else None
    return callee.argval if callee is not None and isinstance(callee.argval, str) else None


def instructions_of(code: CodeType) -> List[dis.Instruction]:
    """``code``'s instructions (caches left out), read once per code object."""
    instructions: Optional[List[dis.Instruction]] = _INSTRUCTIONS.get(code, -1)
    if instructions is None:
        instructions = _INSTRUCTIONS.put(code, -1, list(dis.get_instructions(code)))
    return instructions


def _compiles_columns() -> bool:
    """Whether this interpreter compiles column positions: not before 3.11, nor under
    ``-X no_debug_ranges`` / ``PYTHONNODEBUGRANGES``. Ranks must agree on it, since a call's
    identity holds its column where one is known (checked when a communicator is created)."""
    positions = getattr(compile("f()", "<typedcoll>", "eval"), "co_positions", None)
    return positions is not None and any(span[2] is not None for span in positions())


COLUMNS = _compiles_columns()
NO_COLUMNS = ("no column positions (-X no_debug_ranges, PYTHONNODEBUGRANGES, or code compiled "
              "so)")


def format_column(site: str, column: Optional[int]) -> str:
    """``file.py:LINE:COL``, the column counted from 1 as editors do; the site alone where no
    column is known."""
    return site if column is None else f"{site}:{column + 1}"


def format_site(code: Optional[CodeType], lasti: int) -> str:
    """``file.py:LINE``, the file as :func:`code_source` names it."""
    if code is None:
        return "?"
    return f"{code_source(code)}:{line_of(code, lasti)}"


def code_source(code: CodeType) -> str:
    """:func:`source_name` of the file ``code`` was compiled from. Code ``exec`` made from a
    string (``<string>``) adds a digest of the code itself (``<string>#9f86d081``): two
    functions made from one template with different constants are two places, not one line of
    one file. Other names in brackets (a notebook's ``<cell-7>``) name their source already."""
    name = source_name(code.co_filename)
    if name not in _ANONYMOUS_SOURCES:
        return name
    tagged: Optional[str] = _CODE_SOURCES.get(code, -1)
    if tagged is None:
        digest = hashlib.blake2b(_code_text(code).encode(), digest_size=4).hexdigest()
        tagged = str(_CODE_SOURCES.put(code, -1, f"{name}#{digest}"))
    return tagged


def _code_text(code: CodeType) -> str:
    """What ``code`` does, the same in every process of one Python version (a set's order,
    which hash randomisation moves, sorted)."""
    consts = [_code_text(c) if isinstance(c, CodeType) else
              repr(sorted(map(repr, c))) if isinstance(c, frozenset) else repr(c)
              for c in code.co_consts]
    return "|".join([code.co_name, code.co_code.hex(), " ".join(code.co_names), *consts])


def source_name(filename: str) -> str:
    """How sites name the file ``filename``: ``pkg/mod.py`` for the module ``pkg.mod`` loaded
    from it (``pkg/__init__.py`` for a package), its basename for the main script, and for
    a file no module names, or one loaded under a name of its own, the path that importing it
    would take, else its basename and a digest of its bytes (:func:`_unimported_name`).

    A name of the module rather than of the path: ranks agree on it wherever each installed
    the code, yet two files of one basename in two packages differ.
    """
    name = _SOURCE_NAMES.get(filename)
    if name is None:
        if len(_SOURCE_NAMES) > 65536:
            _SOURCE_NAMES.clear()
        name = _SOURCE_NAMES[filename] = _name_of_source(filename)
    return name


def _name_of_source(filename: str) -> str:
    base = os.path.basename(filename)
    names = [name for name, module in list(sys.modules.items())
             if name != "__main__" and _file_of(module) == filename]
    if names:
        # A file imported under two names (``pkg.mod`` and, through another path entry,
        # ``mod``) may be so on one rank only, by the time it asks: the most qualified name is
        # the one every rank that imported it as part of its package shares.
        parts = min(names, key=lambda name: (-name.count("."), name)).split(".")
        stem = os.path.splitext(base)[0]
        if stem == "__init__":
            return "/".join(parts + [base])
        if stem == parts[-1]:
            return "/".join(parts[:-1] + [base])
    # A module named apart from its file (a plugin loaded by path as ``plugin_0``; loaders
    # build such names from a hash or a counter, which ranks need not share) is named by where
    # its file is, as one no module names: two plugins' ``hook.py`` stay two files.
    return _unimported_name(filename, base)


def _unimported_name(filename: str, base: str) -> str:
    """A file no module names (the main script, a file loaded by path), named as importing it
    would: from the outermost package holding it (``pkg/engine.py``, so a driver that runs it
    as its script and workers that import it agree), else from the import path entry holding
    it (``plugins_a/hooks.py`` beside ``plugins_b/hooks.py``, loaded by path from the script's
    folder). The main script outside a package is its basename. Never by its absolute path:
    ranks install code in different places."""
    if not os.path.isabs(filename):
        return base  # ``<string>``, ``<stdin>``: no file (``code_source`` digests exec's code)
    parts = [base]
    folder = os.path.dirname(filename)
    while os.path.isfile(os.path.join(folder, "__init__.py")):
        parts.insert(0, os.path.basename(folder))
        if os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    if len(parts) > 1:
        return "/".join(parts)
    if _file_of(sys.modules.get("__main__")) == filename:
        return base  # however each rank launched it: `python x.py`, `python -m mpi4py x.py`
    found = [os.path.relpath(filename, os.path.abspath(entry or os.curdir))
             for entry in list(sys.path) if isinstance(entry, str)]
    inside = [name.replace(os.sep, "/") for name in found if not name.startswith(os.pardir)]
    if inside:
        return min(inside, key=lambda name: (name.count("/"), name))
    return base + _file_digest(filename)


def _file_digest(filename: str) -> str:
    """``#`` and a digest of the file's bytes, for a file outside every import path entry:
    two plugins' ``hook.py`` loaded by path from two places, which differ in their code or
    their constants, stay two files wherever each rank keeps them. Empty where the file cannot
    be read (gone since it was loaded): its basename alone then."""
    try:
        with open(filename, "rb") as source:
            return "#" + hashlib.blake2b(source.read(), digest_size=4).hexdigest()
    except OSError:
        return ""


def _file_of(module: Any) -> Any:
    """A module's ``__file__``, read from its namespace: a lazy module's ``__getattr__`` must
    not run (it may import, or raise) when a site is named."""
    try:
        return vars(module).get("__file__")
    except Exception:  # not a module, or a namespace that refuses to be read
        return None



register_internal(__file__)
