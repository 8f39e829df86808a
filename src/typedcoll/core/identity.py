"""Call identity: which call a collective is, so that calls identical on the wire are told apart.

A collective's identity is its ``name=`` when the caller gives one, else its call site: the first
frame on the stack that is neither typedcoll's own plumbing nor a function marked
:func:`transparent`. The identity's fingerprint rides in every envelope and every rank compares
it, so a rank that skipped one vote and entered the next (same op, same schema, same shape) still
disagrees with its peers: the sites differ.

Thin wrappers. A ``def`` that never loops or catches, makes its calls on one line and makes all of
them or none (:func:`is_forwarder`: an engine's ``def tp_allgather(self, obj): return
self.tp_comm.allgather(obj)``, with or without a size-1 shortcut) tells its executions apart by
nothing: its line is the same for every purpose it serves. Taken as the site, it would make a
skipped batch-size vote and the timeout vote after it one call, and they would return each other's
payloads without an error. So the site of a call through a thin wrapper is its caller's line, and
its identity is that line *together with* the wrapper (``via``; every wrapper passed, where the
call went through several): never coarser than the wrapper's own line, so two wrappers reached from
one shared line (a decorator's frame, a loop over a dispatch table) stay two calls, and so do two
wrappers over one shared wrapper. A wrapper making two collectives on its line makes both or
neither, in one order on every rank (unless one rank raises between them); one that lets a branch
pick among its calls keeps its own sites (and carries its callers: ``core.callers``), as does one
calling on two lines (a function of several statements keeps its lines in messages). Any function
is passed over at its pass-through call, the one that hands on its arguments (a decorator's
``func(*args, **kwargs)``) or whose result it returns, whatever it does around it (a log line, a
timer, a ``with`` block, a ``try``): at that call it decides nothing (``thin.pass_through_calls``),
and as the site it would make every call through it one call from one line. A call that hands on
the function's own ``*args`` and ``**kwargs`` whole is passed over in a loop or a ``try`` too (a
retry decorator, one adding ``attempt=i``, ``call_with_retry(fn, *args, **kwargs)``:
``thin.hand_on_calls``). The cost is that one wrapper called from two lines is two calls, as a
collective written on two lines is; a wrapper meant to be one call wherever it is called from gives
its call a ``name=``.

Sites are ``file.py:LINE``, the file named without the directories it was loaded from, so the
same program launched from different paths (or installed under different prefixes) agrees: a
module's file by its dotted name (``pkg/utils.py``, ``pkg/__init__.py``), so that two
``utils.py`` of two packages stay two sites; the main script by its basename; code of no
module by the import path entry that holds its file, else by its basename and a digest of the
file (``sites.source_name``). A site's fingerprint holds the column where its call starts as
well, so two collectives written on one line (``a() if ready else b()``) are two calls;
messages show the column only where two sites of one line meet (``mismatch.describe``). Hot
paths record the code object and bytecode offset (``f_lasti``, an int read); line and column
are worked out only when shown or first fingerprinted.

Where each part lives: which frames are plumbing and :func:`transparent` in ``core.plumbing``;
the walk to the site and its thin wrappers (``via``) in ``core.site_walk``; how a site is named
(line, column, file) in ``core.sites``; here, the fingerprints ranks compare and the texts
naming an identity. Every public name this module held is importable from it still (``__all__``).
"""

from __future__ import annotations

from types import CodeType
from typing import Any, Dict, Optional, Tuple

from ..codecs.digest import digest8
from .plumbing import SKIP_CODES, SKIP_FILES, register_internal, transparent
from .site_walk import CHAIN_MAX, Forwarding, ThinChain, Via, call_site, forwarding, \
    is_forwarder, site_from, thin_chain, user_frame, via_name
from .sites import COLUMNS, NO_COLUMNS, CodeTable, Position, column_of, format_column, \
    format_site, line_of, position_of, site_key, source_name

__all__ = [
    "CHAIN_MAX", "COLUMNS", "MAX_NAME", "NO_COLUMNS", "SKIP_CODES", "SKIP_FILES", "CodeTable",
    "Forwarding", "Position", "ThinChain", "Via", "call_site", "check_name", "column_of",
    "describe_identity", "format_column", "format_site", "forwarding", "is_forwarder",
    "line_of", "name_fingerprint", "ordinal", "position_of", "register_internal", "site_from",
    "site_fingerprint", "source_name", "thin_chain", "transparent", "user_frame", "via_name",
]

_SITE_FP = CodeTable()
_VIA_FP = CodeTable()  # site -> the fingerprints of its calls through thin wrappers
_NAME_FP: Dict[str, bytes] = {}
MAX_NAME = 256


def site_fingerprint(code: Optional[CodeType], lasti: int, via: Optional[Via] = None) -> bytes:
    """The identity of an unnamed call: 8 bytes that agree across processes for one site (its
    line and the column where the call starts) and, where the call went through a thin
    wrapper, that wrapper (:func:`via_name`: its name, module and first line)."""
    fp: Optional[bytes] = _SITE_FP.get(code, lasti)
    if fp is None:
        # no code: the level that digests the callers past those kept (callers.too_deep)
        site = site_key(code, lasti) if code is not None else f"{format_site(code, lasti)}{lasti}"
        fp = _SITE_FP.put(code, lasti, digest8("site:" + site))
    if via is None:
        return fp
    # {id(via): (via, fingerprint)} per site: the entry holds the wrapper's code object, so
    # its address is never reused while the entry lives.
    through: Optional[Dict[int, Tuple[Via, bytes]]] = _VIA_FP.get(code, lasti)
    entry = through.get(id(via)) if through is not None else None
    if entry is not None and entry[0] is via:
        return entry[1]
    if through is None or len(through) > 64:
        through = _VIA_FP.put(code, lasti, {})
    combined = digest8(f"site:{fp.hex()} via:{via_name(via)}")
    through[id(via)] = (via, combined)
    return combined


def check_name(name: Any) -> Optional[str]:
    """The error text for a bad ``name=`` (None when it is fine)."""
    if name is None or (type(name) is str and 0 < len(name) <= MAX_NAME):
        return None
    return (f"TypeError: expected name to be None or a str of 1 to {MAX_NAME} characters, got "
            f"{name!r}"[:300])


def name_fingerprint(name: str) -> bytes:
    """The identity of a named call: the same from any line, on any rank."""
    fp = _NAME_FP.get(name)
    if fp is None:
        if len(_NAME_FP) > 65536:
            _NAME_FP.clear()
        fp = _NAME_FP[name] = digest8("name:" + name)
    return fp


def describe_identity(name: Optional[str], site: str) -> str:
    """How an identity reads in messages: the site, and the name where one was given."""
    return site if name is None else f"{site} name={name!r}"


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th": how many times a call ran, in messages."""
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


register_internal(__file__)
