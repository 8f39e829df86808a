"""A wrapper's pass-through call is passed over however warm the interpreter is (core/thin.py).

Python 3.11 specializes a call after a function's first runs: a call of a C callable
(``contextvars.Context.run``, a builtin) then runs in its PRECALL, and a frame inside it stands
there rather than at its CALL. A rank that ran the wrapper eight times and one that had not
named two sites for one call. In-process ranks, over the C fast path (timeout None) and the
Python steps (timeout 10).
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any, List, Optional

import pytest

import typedcoll as tc
from typedcoll.core.identity import forwarding

from test_core_review import TIMEOUTS, one_desync, outcomes

log = logging.getLogger(__name__)


def in_context(fn: Any, x: Any) -> Any:
    """An engine's wrapper that runs a call in a request's context, after a log line: passed
    over at the call whose result it returns."""
    log.debug("running %s in the request's context", fn)
    return contextvars.copy_context().run(fn, x)


def test_a_frame_inside_a_warm_pass_through_call_stands_in_its_pass_through_set() -> None:
    seen: List[int] = []

    def where(x: Any) -> Any:
        seen.append(sys._getframe(1).f_lasti)
        return x

    for i in range(32):  # warm: 3.11 specializes after 8 runs
        in_context(where, i)
    passed = forwarding(in_context.__code__)
    assert isinstance(passed, frozenset) and set(seen) <= passed, (sorted(seen), passed)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_warm_pass_through_call_is_passed_over_as_a_cold_one(timeout: Optional[float]) -> None:
    """Before, once warm, the wrapper's line was the site: ``at test_core_warm.py:33 called
    from ...`` where a cold run reads ``at ... through in_context``."""
    def warm_then_vote(comm: tc.TypedComm) -> Any:
        for i in range(32):
            in_context(str, i)
        return in_context(comm.allgather, "one" if comm.rank == 1 else 1)

    error = one_desync(outcomes(3, warm_then_vote, timeout=timeout))
    assert list(error.kinds) == [tc.MismatchKind.SCHEMA]
    line = warm_then_vote.__code__.co_firstlineno + 3
    rows = str(error).splitlines()[1:3]
    assert all(f"at test_core_warm.py:{line} through in_context" in r for r in rows), error
