"""typedcoll.testing: run an SPMD function on N ranks as threads of this process.

``run(n, fn, *args, timeout=30)`` calls ``fn(comm, *args)`` on every rank, each with a
:class:`~typedcoll.TypedComm` over an in-memory transport that pairs collectives by position
exactly as MPI does, with the same protocol and the same errors; no MPI needed. It returns the
results in rank order; if any rank raised, it raises an ``ExceptionGroup`` of every rank's
exception (each annotated with its rank). A rank that never reaches a collective its peers are
in makes them raise :class:`~typedcoll.CollectiveTimeout` after ``timeout`` seconds.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, List, Optional

from .._comm import TypedComm
from ..core.channel import Channel
from ..transports.memory import World

if sys.version_info >= (3, 11):
    _ExceptionGroup = ExceptionGroup  # noqa: F821
else:  # pragma: no cover - Python 3.10
    from exceptiongroup import ExceptionGroup as _ExceptionGroup

__all__ = ["run"]


def run(n: int, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = 30.0,
        name: str = "WORLD") -> List[Any]:
    """``[fn(comm_0, *args), ..., fn(comm_{n-1}, *args)]``, each rank a thread of this process.

    ``timeout`` is every communicator's collective timeout (None: wait forever, which a rank
    that skips a collective turns into a hang).
    """
    world = World(n)
    transports = world.transports()
    results: List[Any] = [None] * n
    errors: List[Optional[BaseException]] = [None] * n

    def rank_main(r: int) -> None:
        try:
            from .._comm import _created
            comm = TypedComm.__new__(TypedComm)
            comm._p = _created(Channel(transports[r], name), timeout, None)
            results[r] = fn(comm, *args)
        except BaseException as exc:  # reported below, with every other rank's
            errors[r] = exc

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank-{r}", daemon=True)
               for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        for r, e in failed:
            if hasattr(e, "add_note"):
                e.add_note(f"(rank {r} of {n})")
        raise _ExceptionGroup(f"{len(failed)} of {n} ranks raised",
                              [e for _, e in failed])  # type: ignore[type-var]
    return results
