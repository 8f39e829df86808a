"""How a call site is named: its line, its column and its file, worked out from a code object
and a bytecode offset (``f_lasti``, an int read on hot paths) only when shown or first
fingerprinted, and kept in :class:`CodeTable` caches.

Sites read ``file.py:LINE``, the file named by its module (``core.identity`` says why).
"""

from __future__ import annotations

import os
import sys
from itertools import islice
from types import CodeType
from typing import Any, Dict, Optional, Tuple

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
_UNSET = object()
_SOURCE_NAMES: Dict[str, str] = {}  # co_filename -> how sites name it


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
    """``file.py:LINE``, the file as :func:`source_name` names it."""
    if code is None:
        return "?"
    return f"{source_name(code.co_filename)}:{line_of(code, lasti)}"


def source_name(filename: str) -> str:
    """How sites name the file ``filename``: ``pkg/mod.py`` for the module ``pkg.mod`` loaded
    from it (``pkg/__init__.py`` for a package), its basename for the main script and for
    anything no module names (or several do, under different names).

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
    if not names:
        return base
    # A file imported under two names (``pkg.mod`` and, through another path entry, ``mod``)
    # may be so on one rank only, by the time it asks: the most qualified name is the one every
    # rank that imported it as part of its package shares.
    parts = min(names, key=lambda name: (-name.count("."), name)).split(".")
    stem = os.path.splitext(base)[0]
    if stem == "__init__":
        return "/".join(parts + [base])
    if stem == parts[-1]:
        return "/".join(parts[:-1] + [base])
    return base


def _file_of(module: Any) -> Any:
    """A module's ``__file__``, read from its namespace: a lazy module's ``__getattr__`` must
    not run (it may import, or raise) when a site is named."""
    try:
        return vars(module).get("__file__")
    except Exception:  # not a module, or a namespace that refuses to be read
        return None



register_internal(__file__)
