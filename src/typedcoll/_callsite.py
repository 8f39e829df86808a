"""Call sites: the first frame of the user's code that issued a collective.

Modules whose frames are plumbing (the protocol, the communicator, the flush) register their file
here; the call site is the first frame on the stack outside them. Executor *models* built on
typedcoll do not register, so their own lines are reported, which is what a reader wants.
"""

from __future__ import annotations

import hashlib
import os
import sys
from types import CodeType, FrameType
from typing import Dict, Optional, Set, Tuple

_INTERNAL_FILES: Set[str] = set()
_SITE_FP: Dict[Tuple[CodeType, int], bytes] = {}
_LINES: Dict[Tuple[CodeType, int], int] = {}


def register_internal(filename: str) -> None:
    """Frames from ``filename`` are skipped when looking for the user's call site."""
    _INTERNAL_FILES.add(filename)


def user_frame(depth: int = 2) -> Optional[FrameType]:
    """The first frame outside registered modules, starting ``depth`` frames up."""
    frame: Optional[FrameType] = sys._getframe(depth)
    internal = _INTERNAL_FILES
    while frame is not None and frame.f_code.co_filename in internal:
        frame = frame.f_back
    return frame


def line_of(code: CodeType, lasti: int) -> int:
    """The source line of bytecode offset ``lasti`` in ``code``.

    Hot paths record ``frame.f_lasti`` (an int read) rather than ``frame.f_lineno`` (a walk of
    the line table, ~300 instructions per call); the line is worked out only when shown.
    """
    key = (code, lasti)
    line = _LINES.get(key)
    if line is None:
        line = code.co_firstlineno
        for start, end, number in code.co_lines():
            if start <= lasti < end:
                line = number if number is not None else line
                break
        _LINES[key] = line
    return line


def format_site(code: Optional[CodeType], lasti: int) -> str:
    """``file.py:LINE`` (basename: the same script launched from different paths agrees)."""
    if code is None:
        return "?"
    return f"{os.path.basename(code.co_filename)}:{line_of(code, lasti)}"


def site_fingerprint(code: Optional[CodeType], lasti: int) -> bytes:
    """8 bytes identifying a call site across processes (for ops that pin their call site)."""
    key = (code, lasti)
    fp = _SITE_FP.get(key)  # type: ignore[arg-type]
    if fp is None:
        fp = hashlib.blake2b(format_site(code, lasti).encode(), digest_size=8).digest()
        _SITE_FP[key] = fp  # type: ignore[index]
    return fp


register_internal(__file__)
