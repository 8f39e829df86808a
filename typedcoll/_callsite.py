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


def format_site(code: Optional[CodeType], lineno: int) -> str:
    """``file.py:LINE`` (basename: the same script launched from different paths agrees)."""
    if code is None:
        return "?"
    return f"{os.path.basename(code.co_filename)}:{lineno}"


def site_fingerprint(code: Optional[CodeType], lineno: int) -> bytes:
    """8 bytes identifying a call site across processes (for ops that pin their call site)."""
    key = (code, lineno)
    fp = _SITE_FP.get(key)  # type: ignore[arg-type]
    if fp is None:
        fp = hashlib.blake2b(format_site(code, lineno).encode(), digest_size=8).digest()
        _SITE_FP[key] = fp  # type: ignore[index]
    return fp


register_internal(__file__)
