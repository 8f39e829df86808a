"""The walk up the stack to a call's site, and the thin wrappers it passes on the way (``via``).

Whether a frame is passed over is read from its code (``core.thin``: a thin wrapper, or a
function at its pass-through call) and from the plumbing marks (``core.plumbing``); why a thin
wrapper's caller is the site and the wrapper part of the identity is ``core.identity``'s story.
The C path's ``user_site`` is :func:`site_from`, and asks :func:`forwarding` and
:func:`thin_chain` (``core.fast`` hands them over).
"""

from __future__ import annotations

import sys
from types import CodeType, FrameType
from typing import Dict, FrozenSet, List, Optional, Tuple, Union

from .plumbing import SKIP_CODES, SKIP_FILES, register_internal
from .sites import CodeTable, code_source, format_column
from .thin import forwards, hand_on_calls, pass_through_calls

_VIA_NAMES = CodeTable()  # a thin wrapper's code, or a ThinChain -> via_name's text
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
    where = format_column(f"{code_source(via)}:{line}", column)
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


register_internal(__file__)
