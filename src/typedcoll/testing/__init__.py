"""typedcoll.testing: run an SPMD function on N ranks as threads of this process.

``run(n, fn, *args, timeout=30)`` calls ``fn(comm, *args)`` on every rank, each with a
:class:`~typedcoll.TypedComm` over an in-memory transport that pairs collectives by position
exactly as MPI does, with the same protocol and the same errors; no MPI needed. It returns the
results in rank order; if any rank raised, it raises an ``ExceptionGroup`` of every rank's
exception (each noted with its rank), in rank order.

A rank that never reaches a collective its peers are in makes them raise
:class:`~typedcoll.CollectiveTimeout` after ``timeout`` seconds, naming the absent ranks
(``missing``) and where each of them is (their threads' stacks are in this process). A rank that
never returns at all (stuck in its own code) is reported once the others are done and another
``timeout`` has passed; its thread is left behind, as Python threads cannot be stopped.

Drop-in surfaces run the same way: ``fn`` may wrap the communicator it is given
(``typedcoll.compat.mpi4py(comm)``, ``typedcoll.compat.torch(comm)``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .._comm import TypedComm, _created
from ..core.channel import Channel
from ..core.plumbing import SKIP_FILES, register_internal
from ..core.sites import format_site
from ..core.mismatch import compact_ranks
from ..transports.memory import World

__all__ = ["observe", "run"]


def run(n: int, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = 30.0,
        name: str = "WORLD") -> List[Any]:
    """``[fn(comm_0, *args), ..., fn(comm_{n-1}, *args)]``, each rank a thread of this process.

    ``timeout`` bounds every collective (it is every communicator's ``timeout``; None: wait
    forever, which a rank that skips a collective turns into a hang) and how long ranks may
    keep running after the others returned. ``name`` is the communicators' name in messages.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"expected n to be an int of at least 1, got {n!r}")
    world = World(n)
    transports = world.transports()
    results: List[Any] = [None] * n
    errors: List[Optional[BaseException]] = [None] * n
    threads: List[threading.Thread] = []

    def rank_main(r: int) -> None:
        try:
            comm = TypedComm.__new__(TypedComm)
            comm._p = _created(Channel(transports[r], name), timeout, None)
            comm._p.hang_reporter = _Reporter(threads, comm._p.hang_reporter)
            results[r] = fn(comm, *args)
        except BaseException as exc:  # reported below, with every other rank's
            errors[r] = exc

    threads.extend(threading.Thread(target=rank_main, args=(r,), name=f"rank-{r}", daemon=True)
                   for r in range(n))
    for t in threads:
        t.start()
    stuck = _join(threads, timeout)
    for r in stuck:
        errors[r] = TimeoutError(
            f"rank {r} of {n} did not return within {timeout:g} s of the other ranks finishing; "
            f"it is {_whereabouts(threads[r])} (its thread is left running)")
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        for r, e in failed:
            _note(e, f"(rank {r} of {n})")
        raise ExceptionGroup(f"{len(failed)} of {n} ranks raised",
                              [e for _, e in failed])  # type: ignore[type-var]
    return results


# A rank that timed out asks its peers where they are before it raises; on a loaded machine that
# takes seconds, and only a rank stuck in its own code should be reported as such.
_REPORT_GRACE = 3.0


def observe(original: Callable[..., Any], after: Callable[..., None],
            before: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
    """A stand-in for one of typedcoll's own functions, for a test that spies on it (which path
    served a call): it calls ``original`` with the arguments it is given and returns its
    result, handing ``after`` what ``before`` returned (None without one), that result and the
    arguments. Its frame is typedcoll's plumbing, so the calls it serves keep their identities;
    a spy of the test's own, marked transparent, would be one of the wrappers a call passed,
    on the ranks whose call went through it alone."""
    def observed(*args: Any, **kwargs: Any) -> Any:
        token = before(*args, **kwargs) if before is not None else None
        out = original(*args, **kwargs)
        after(token, out, *args, **kwargs)
        return out
    return observed


def _join(threads: List[threading.Thread], timeout: Optional[float]) -> List[int]:
    """Wait for every rank; once one has finished, the others get ``timeout`` more seconds, and
    the time a timed-out rank takes to gather its hang report (``_REPORT_GRACE``).

    Returns the ranks still running after that. Ranks waiting in a collective time out on their
    own; this only catches a rank stuck in its own code.
    """
    if timeout is None:
        for t in threads:
            t.join()
        return []
    first_done: Optional[float] = None
    while True:
        alive = [r for r, t in enumerate(threads) if t.is_alive()]
        if not alive:
            return []
        if first_done is None and len(alive) < len(threads):
            first_done = time.monotonic()
        if first_done is not None and time.monotonic() - first_done > timeout + _REPORT_GRACE:
            return alive
        threads[alive[0]].join(0.05)


def _note(exc: BaseException, text: str) -> None:
    exc.add_note(text)


class _Reporter:
    """A hang report from inside the process: which ranks never reached the collective (the
    in-memory rendezvous knows who arrived) and where each of them is (its thread's stack)."""

    def __init__(self, threads: List[threading.Thread], inner: Any) -> None:
        self.threads = threads
        self.inner = inner  # a reporter the diagnostics attached, if any

    def __call__(self, p: Any, call: Any) -> Tuple[Optional[Tuple[int, ...]], str]:
        transport = p.transport
        arrived = _arrived(transport)
        missing = tuple(r for r in range(p.size) if r not in arrived)
        places: Dict[str, List[int]] = {}  # ranks at the same place on one line
        for r in missing:
            where = _whereabouts(self.threads[transport.members[r]])
            places.setdefault(where, []).append(r)
        lines = [f"  {compact_ranks(ranks)}: {where}" for where, ranks in places.items()]
        text = ""
        if missing:
            text = "ranks that never arrived, and where they are:\n" + "\n".join(lines)
        if self.inner is not None:
            try:
                _, more = self.inner(p, call)
                text = "\n".join(filter(None, [text, more]))
            except Exception:  # the in-process report stands on its own
                pass
        return (missing or None), text


def _whereabouts(thread: threading.Thread) -> str:
    """``at prog.py:12 in step (inside typedcoll: recv)``, or that it has finished."""
    if not thread.is_alive():
        return "finished (returned or raised)"
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "running (no stack available)"
    inside: Optional[str] = None
    while frame is not None and _plumbing(frame.f_code.co_filename):
        if frame.f_code.co_filename.startswith(_PACKAGE):
            inside = frame.f_code.co_name
        frame = frame.f_back
    if frame is None:
        return "inside typedcoll"
    where = f"at {format_site(frame.f_code, frame.f_lasti)} in {frame.f_code.co_name}"
    return where + (f" (inside typedcoll: {inside})" if inside else " (outside typedcoll)")


def _plumbing(filename: str) -> bool:
    """Frames of typedcoll itself and of the standard library (threading, time) under it."""
    return filename in SKIP_FILES or filename.startswith((_PACKAGE, _STDLIB))


_STDLIB = os.path.dirname(threading.__file__) + os.sep
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _arrived(transport: Any) -> Set[int]:
    """The ranks that reached this rank's latest backend operation (its rendezvous)."""
    world = transport.world
    with world.lock:
        parts = world.pending.get((transport.context, transport._number - 1))
        return set(parts) if parts else set()


register_internal(__file__)
