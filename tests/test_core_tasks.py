"""A coroutine is its caller's callee only while that caller awaits it (core/callers.py).

A vote helper without a loop carries its callers, so two votes through it from two lines are two
calls. A coroutine's frame names as its caller whatever frame stepped it last: the coroutine that
awaits it, or the event loop, or, for an eager task (Python 3.12), the ``create_task`` line that
ran its first step. Which of the last two a rank sees depends on whether its task suspended
before the call, which is timing, so a task is its own caller on every rank. In-process ranks,
over the C fast path (timeout None) and the Python steps (timeout 10).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Optional

import pytest

import typedcoll as tc

from test_core_review import TIMEOUTS, one_desync, outcomes


async def vote_holding(comm: tc.TypedComm, lock: asyncio.Lock, flag: bool) -> bool:
    """An engine's vote under a lock its own scheduler may hold: a coroutine without a loop."""
    async with lock:
        return any(comm.allgather(flag))


async def vote_in_an_eager_task(comm: tc.TypedComm, busy: Optional[int]) -> bool:
    """Rank ``busy`` holds the lock 20 ms, so its task suspends at the lock and the event loop
    steps it to the vote; every other rank's task votes inside ``create_task``."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    lock = asyncio.Lock()
    if comm.rank == busy:
        await lock.acquire()
        loop.call_later(0.02, lock.release)
    return await asyncio.create_task(vote_holding(comm, lock, comm.rank == 0))


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks came in Python 3.12")
@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("busy", [None, 1])
def test_a_vote_in_an_eager_task_is_one_call_whether_or_not_it_suspended(
        busy: Optional[int], timeout: Optional[float]) -> None:
    """Before, a rank whose eager task voted inside ``create_task`` named that line's callers
    and a rank whose task suspended named the event loop's: a correct program raised
    DesyncError on every rank."""
    def run_vote(comm: tc.TypedComm, rank_busy: Optional[int]) -> Any:
        return asyncio.run(vote_in_an_eager_task(comm, rank_busy))

    assert outcomes(3, run_vote, busy, timeout=timeout) == [True] * 3


async def any_rank(comm: tc.TypedComm, flag: Any) -> bool:
    await asyncio.sleep(0)
    return any(comm.allgather(flag))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_coroutine_the_event_loop_steps_names_no_caller_of_the_loops(
        timeout: Optional[float]) -> None:
    """A task's coroutine is its own caller: before, its callers went on through the event
    loop's frames (``called from asyncio/events.py``), which name nothing of the program."""
    def run_vote(comm: tc.TypedComm) -> Any:
        flag = "yes" if comm.rank == 1 else True  # rank 1 votes another type
        return asyncio.run(any_rank(comm, flag))

    error = one_desync(outcomes(3, run_vote, timeout=timeout))
    assert list(error.kinds) == [tc.MismatchKind.SCHEMA]
    rows = str(error).splitlines()[1:3]
    line = any_rank.__code__.co_firstlineno + 2
    assert all("allgather[" in r and f"test_core_tasks.py:{line}," in r for r in rows), error
    assert "called from" not in str(error) and "asyncio" not in str(error), error


async def vote_when_cancelled(comm: tc.TypedComm, flag: bool) -> bool:
    """A vote made as a task is cancelled (a request aborted), in the handler of the
    cancellation thrown into it through its awaiter."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return any(comm.allgather(flag))
    return False


async def votes_on_cancellation(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    got = []
    if comm.rank != skipper:
        got.append(await vote_when_cancelled(comm, comm.rank == 0))
    got.append(await vote_when_cancelled(comm, False))
    return got


async def cancel_until_done(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    task = asyncio.create_task(votes_on_cancellation(comm, skipper))
    while not task.done():
        await asyncio.sleep(0.005)
        task.cancel()
    return task.result()


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("skipper", [None, 2])
def test_a_coroutine_that_votes_as_it_is_cancelled_keeps_its_awaiters_line(
        skipper: Optional[int], timeout: Optional[float]) -> None:
    """A cancellation is thrown into the awaited coroutine through its awaiter, which stands
    at its await meanwhile (YIELD_VALUE, or RESUME from Python 3.13): the awaiter's line still
    tells the two votes apart, and the rank that skipped the first raises with its peers."""
    def run_votes(comm: tc.TypedComm, skip: Optional[int]) -> Any:
        comm.set_step(3)
        return asyncio.run(cancel_until_done(comm, skip))

    if skipper is None:
        assert outcomes(3, run_votes, None, timeout=timeout) == [[True, False]] * 3
        return
    error = one_desync(outcomes(3, run_votes, skipper, timeout=timeout))
    assert list(error.kinds) == [tc.MismatchKind.CALL]
    first = votes_on_cancellation.__code__.co_firstlineno
    rows = str(error).splitlines()[1:3]
    assert {r.split("called from ")[1].split()[0].rstrip(",") for r in rows} == \
        {f"test_core_tasks.py:{first + 3}", f"test_core_tasks.py:{first + 4}"}, error
