"""Which frames are typedcoll's plumbing: passed over when a collective looks for its call site.

typedcoll's own modules register themselves here (``register_internal(__file__)`` at their end),
and :func:`transparent` marks a user's wrapper (a function, every layer a decorator wraps, or a
whole module). ``core.site_walk`` reads both sets; the C path is handed them (``core.fast``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
from types import CodeType
from typing import Any, Callable, List, Set, TypeVar, Union

_F = TypeVar("_F", bound=Callable[..., Any])

# Files whose frames are plumbing: typedcoll's own modules, and modules marked transparent.
SKIP_FILES: Set[str] = set()
# Functions marked transparent, by code object (their frames are skipped wherever they live).
SKIP_CODES: Set[CodeType] = set()


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
# leave and another to leave by an exception: as callers (a generator's calls outside its loops
# carry them) they would part the exit vote of a rank whose block raised from its peers', so
# the ``with`` line calls the generator, on every way out alike.
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


register_internal(__file__)
