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
``utils.py`` of two packages stay two sites; the main script and code of no module by its
basename. A site's fingerprint holds the column where its call starts as well, so two
collectives written on one line (``a() if ready else b()``) are two calls; messages show the
column only where two sites of one line meet (``mismatch.describe``). Hot paths record the code
object and bytecode offset (``f_lasti``, an int read); line and column are worked out only when
shown or first fingerprinted.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
from itertools import islice
from types import CodeType, FrameType
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple, TypeVar, \
    Union

from ..codecs.digest import digest8
from .thin import forwards, hand_on_calls, pass_through_calls

_F = TypeVar("_F", bound=Callable[..., Any])
Position = Tuple[int, int, int, int]  # line, end line, column, end column of an instruction

# Files whose frames are plumbing: typedcoll's own modules, and modules marked transparent.
SKIP_FILES: Set[str] = set()
# Functions marked transparent, by code object (their frames are skipped wherever they live).
SKIP_CODES: Set[CodeType] = set()


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


_SITE_FP = CodeTable()
_VIA_FP = CodeTable()  # site -> the fingerprints of its calls through thin wrappers
_LINES = CodeTable()
_POSITIONS = CodeTable()
_VIA_NAMES = CodeTable()  # a thin wrapper's code, or a ThinChain -> via_name's text
_UNSET = object()
_NAME_FP: Dict[str, bytes] = {}
_SOURCE_NAMES: Dict[str, str] = {}  # co_filename -> how sites name it
MAX_NAME = 256


def register_internal(filename: str) -> None:
    """Frames from ``filename`` are skipped when looking for the caller's site."""
    SKIP_FILES.add(filename)


# The standard library's starters of a thread's or a process's target (Thread.run, a thread
# pool's worker, Process.run) decide nothing about which collective runs: their frames are
# plumbing, so a thin target is its own site ("at worker.py:12"), never "at threading.py:982".
_STDLIB = os.path.dirname(getattr(threading, "__file__", None) or "")
if _STDLIB:  # a frozen standard library has no files to skip
    for _starter in ("threading.py", os.path.join("concurrent", "futures", "thread.py"),
                     os.path.join("multiprocessing", "process.py")):
        register_internal(os.path.join(_STDLIB, _starter))
# contextlib's generator context managers resume the generator from one line to enter, one to
# leave and another to leave by an exception: as callers (a generator without a loop carries
# its own) they would part the exit vote of a rank whose block raised from its peers', so the
# ``with`` line calls the generator, on every way out alike.
if getattr(contextlib, "__file__", None):
    register_internal(contextlib.__file__)


def transparent(target: Union[_F, types.ModuleType, str]) -> Union[_F, types.ModuleType, str]:
    """Mark a wrapper as transparent: the call site of a collective it issues is its caller's.

    Use it on functions and methods that forward to typedcoll (a ``vote(x)`` helper that logs
    on a line of its own, one that picks among calls), so that two votes issued through one
    helper from two lines keep two identities. A thin wrapper (:func:`is_forwarder`: its calls
    on one line, all made or none, as an engine's ``tp_allgather``, with or without a size-1
    shortcut) is passed over without it. ``target`` may also be a module, or
    a module's name (``transparent(__name__)``), to mark every function in it. Returns
    ``target``, so it works as a decorator.
    """
    if isinstance(target, str):
        module = sys.modules.get(target)
        if module is None:
            raise ValueError(f"expected the name of an imported module, got {target!r}")
        target_module: types.ModuleType = module
    elif isinstance(target, types.ModuleType):
        target_module = target
    else:
        codes = _codes_of(target)
        if not codes:
            raise TypeError(f"expected a function, method, module or module name, got "
                            f"{target!r}")
        SKIP_CODES.update(codes)
        return target
    filename = getattr(target_module, "__file__", None)
    if not filename:
        raise ValueError(f"expected a module loaded from a file, got {target_module!r}")
    register_internal(filename)
    return target


def _codes_of(target: Any) -> List[CodeType]:
    """The code objects whose frames a call of ``target`` runs: every layer of it.

    A decorator made with ``functools.wraps`` (a timer, a tracing range) runs a frame of its own
    around the function it wraps, at the same line for every function it wraps: marking only
    the innermost function would leave that frame as the call site of every collective issued
    through the wrapper, giving them all one identity. So each layer is marked.
    """
    codes: List[CodeType] = []
    for _ in range(32):
        if isinstance(target, (staticmethod, classmethod, types.MethodType)):
            target = target.__func__
            continue
        code = getattr(target, "__code__", None)
        if isinstance(code, CodeType):
            codes.append(code)
        if not hasattr(target, "__wrapped__"):
            break
        target = target.__wrapped__
    return codes


_FORWARDING = CodeTable()


Forwarding = Union[bool, FrozenSet[int], Tuple[FrozenSet[int]]]


def forwarding(code: CodeType) -> Forwarding:
    """True where ``code`` is a thin wrapper (``core.thin``: it never loops or catches, makes
    its calls on one line and makes all of them or none); else the offsets of its pass-through
    calls (``thin.pass_through_calls``: the call it returns or that hands on its ``*args,
    **kwargs``; ``thin.hand_on_calls``: that hands them on as they came, in a loop too), where
    it is thin at those calls alone, or False. A decorator's wrapper that hands them on to the
    function it wraps is the 1-tuple of those offsets: passed over there, and left out of the
    wrappers passed (``thin.hand_on_calls``' second answer). Read from its bytecode once per
    code object; the C path asks it too."""
    found: Optional[Forwarding] = _FORWARDING.get(code, 0)
    if found is None:
        handed, to_closure = hand_on_calls(code)
        found = _FORWARDING.put(code, 0, (handed,) if handed and to_closure else (
            forwards(code) or (pass_through_calls(code) | handed) or False))
    return found


def is_forwarder(code: CodeType) -> bool:
    """Whether ``code`` is a thin wrapper (:func:`forwarding`), a decorator's among them."""
    found = forwarding(code)
    return found is True or (isinstance(found, tuple) and forwards(code))


def call_site(depth: int = 2) -> Tuple[Optional[FrameType], Optional[Via]]:
    """The call site's frame, ``depth`` frames up, and the thin wrapper it called (``via``,
    None where there is none): :func:`site_from` that frame."""
    return site_from(sys._getframe(depth))


class ThinChain:
    """Two or more thin wrappers one call went through, outermost first: a call's ``via`` where
    it passed more than one (:func:`site_from`). Interned by :func:`thin_chain`, so one chain is
    one object, as a wrapper's code object is."""

    __slots__ = ("codes",)

    def __init__(self, codes: Tuple[CodeType, ...]) -> None:
        self.codes = codes

    def __repr__(self) -> str:
        return f"ThinChain({via_name(self)})"


Via = Union[CodeType, ThinChain]  # the thin wrapper, or wrappers, a call went through
CHAIN_MAX = 8  # thin wrappers a chain keeps: the innermost seven and the outermost
_CHAINS: Dict[Tuple[int, ...], ThinChain] = {}


def thin_chain(codes: Tuple[CodeType, ...]) -> ThinChain:
    """The one :class:`ThinChain` of ``codes`` (outermost first). The C path asks it too."""
    key = tuple(map(id, codes))
    chain = _CHAINS.get(key)
    if chain is None:  # each entry holds its code objects: an address is never reused in it
        if len(_CHAINS) > 4096:
            _CHAINS.clear()  # a chain made again is named, so fingerprinted, as before
        chain = _CHAINS[key] = ThinChain(codes)
    return chain


def _via_of(passed: List[CodeType]) -> Optional[Via]:
    """``via`` for the thin wrappers passed on the way to a site, innermost first."""
    if len(passed) < 2:
        return passed[0] if passed else None
    return thin_chain(tuple(reversed(passed)))


def site_from(frame: Optional[FrameType]) -> Tuple[Optional[FrameType], Optional[Via]]:
    """The call site at or above ``frame``, and the thin wrapper, or wrappers, it called.

    The site is the first frame outside typedcoll and transparent modules that is not a thin
    wrapper, a function marked transparent nor a function at its pass-through call
    (:func:`forwarding`); ``via`` the frames passed on the way: the one wrapper's code, or a
    :class:`ThinChain` of them all where there were several. Every one counts: two wrappers over
    one shared wrapper (``vote_batch_size`` and ``vote_timeout`` both returning
    ``self._all_gather(x)``), reached from one dispatch line, are two calls, and a decorator's
    wrapper over two functions is two calls too. A function marked transparent is one of them,
    as a thin wrapper is: the mark reaches the functions a decorator wraps (``__wrapped__``),
    and leaving them out would make two votes under a marked retry decorator one call. A
    decorator's wrapper that hands its arguments on to the function it wraps is passed over and
    left out (``thin.hand_on_calls``): that function is the next frame, and a timer applied on
    one rank alone must not part it from its peers. Beyond
    ``CHAIN_MAX`` wrappers the innermost seven and the outermost are kept. Where every frame
    above is plumbing or passed over (a thread's target, a test's program), the outermost of them
    is the site and the others are ``via``. The C path's ``user_site`` is this walk.
    """
    files, codes = SKIP_FILES, SKIP_CODES
    wrapper: Optional[CodeType] = None  # the innermost kept
    passed: Optional[List[CodeType]] = None  # all those kept, innermost first, where two or more
    outer: Optional[FrameType] = None
    kept = False  # whether outer is the last kept
    while frame is not None:
        code = frame.f_code
        marked = bool(codes) and code in codes  # passed over as a thin wrapper is, and kept
        if marked or code.co_filename not in files:
            thin = True if marked else forwarding(code)
            if thin.__class__ is tuple:  # a decorator's wrapper: passed over, not kept
                if frame.f_lasti not in thin[0]:
                    return frame, (wrapper if passed is None else _via_of(passed))
                outer, kept = frame, False
                frame = frame.f_back
                continue
            if thin is not True and not (thin and frame.f_lasti in thin):
                return frame, (wrapper if passed is None else _via_of(passed))
            if wrapper is None:
                wrapper = code
            elif passed is None:
                passed = [wrapper, code]
            elif len(passed) < CHAIN_MAX:
                passed.append(code)
            else:
                passed[-1] = code
            outer, kept = frame, True
        frame = frame.f_back
    every = passed if passed is not None else [wrapper] if wrapper is not None else []
    return outer, _via_of(every[:-1] if kept else every)


def user_frame(depth: int = 2) -> Optional[FrameType]:
    """The call site's frame (:func:`call_site`), ``depth`` frames up."""
    return call_site(depth + 1)[0]


def via_name(via: Optional[Via]) -> Optional[str]:
    """How envelopes and messages name the thin wrapper a call went through:
    ``Dist.tp_allgather (pkg/dist.py:40)``, its qualified name and where its ``def`` starts.
    Ranks compare this text (a role branch pairs calls through one wrapper only), so it names
    the module too: two wrappers of one qualified name in two modules are two wrappers. A
    lambda is named by where its body starts, column included (``<lambda> (m.py:7:30)``):
    two lambdas of one line are two wrappers. A :class:`ThinChain` is its wrappers' names,
    outermost first, joined by `` through ``. Worked out once per code object or chain: a
    device envelope names its wrapper on every call."""
    if via is None:
        return None
    name: Optional[str] = _VIA_NAMES.get(via, 0)
    if name is not None:
        return name
    if isinstance(via, ThinChain):
        return str(_VIA_NAMES.put(via, 0, " through ".join(str(via_name(c)) for c in via.codes)))
    qualname = getattr(via, "co_qualname", via.co_name)
    line, column = (_lambda_body(via) if via.co_name == "<lambda>"
                    else (via.co_firstlineno, None))
    where = format_column(f"{source_name(via.co_filename)}:{line}", column)
    return str(_VIA_NAMES.put(via, 0, f"{qualname} ({where})"))


def _lambda_body(code: CodeType) -> Tuple[int, Optional[int]]:
    """The line and 0-based column where a lambda's body starts, from its first instruction
    placed past column 0 (the prologue's are placed at the line's start); its first line and
    no column where none is."""
    positions = getattr(code, "co_positions", None)
    for line, _, column, _ in positions() if positions is not None else ():
        if line is not None and column:
            return line, column
    return code.co_firstlineno, None


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


def site_fingerprint(code: Optional[CodeType], lasti: int, via: Optional[Via] = None) -> bytes:
    """The identity of an unnamed call: 8 bytes that agree across processes for one site (its
    line and the column where the call starts) and, where the call went through a thin
    wrapper, that wrapper (:func:`via_name`: its name, module and first line)."""
    fp: Optional[bytes] = _SITE_FP.get(code, lasti)
    if fp is None:
        site = format_column(format_site(code, lasti), column_of(code, lasti))
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
