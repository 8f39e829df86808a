"""A coroutine is its caller's callee only while that caller awaits it, or steps it by hand
with its own ``send``, ``throw`` or ``close`` (core/callers.py).

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
import types
from typing import Any, Optional

import pytest

import typedcoll as tc

from test_core_callers import async_votes
from test_core_review import TIMEOUTS, a_skipped_vote_raises, one_desync, outcomes


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
def test_a_coroutine_that_votes_as_it_is_cancelled_keeps_its_awaiters_line(
        timeout: Optional[float]) -> None:
    """A cancellation is thrown into the awaited coroutine through its awaiter, which stands
    at its await meanwhile (YIELD_VALUE, or RESUME from Python 3.13): the awaiter's line still
    tells the two votes apart, and the rank that skipped the first raises with its peers."""
    def run_votes(comm: tc.TypedComm, skip: Optional[int]) -> Any:
        comm.set_step(3)
        return asyncio.run(cancel_until_done(comm, skip))

    first = votes_on_cancellation.__code__.co_firstlineno
    error = a_skipped_vote_raises(run_votes, f"test_core_tasks.py:{first + 3}",
                                  f"test_core_tasks.py:{first + 4}", timeout=timeout)
    rows = str(error).splitlines()[1:3]
    assert {r.split("called from ")[1].split()[0].rstrip(",") for r in rows} == \
        {f"test_core_tasks.py:{first + 3}", f"test_core_tasks.py:{first + 4}"}, error


async def any_of(comm: tc.TypedComm, flag: Any) -> bool:
    """A vote helper without a loop, as an engine's ``async def vote``."""
    return any(comm.allgather(flag))


# A notebook cell (IPython's autoawait, ``python -m asyncio``): module code that awaits
CELL = """
got = []
if not skip:
    got.append(await any_of(comm, comm.rank == 0))
got.append(await any_of(comm, False))
"""


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_two_votes_awaited_at_a_cells_top_level_are_two_calls(timeout: Optional[float]) -> None:
    """A cell's code is no function's (no CO_OPTIMIZED), and its awaits were not read as
    awaits: the helper was its own caller, so the cell's two votes were one call and the rank
    that skipped the first returned its peers' first vote as its second, without an error."""
    import ast

    code = compile(CELL, "<cell-7>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)

    def run_cell(comm: tc.TypedComm, skip: Optional[int]) -> Any:
        space = {"any_of": any_of, "comm": comm, "skip": comm.rank == skip}

        async def cell() -> None:
            await eval(code, space)
        asyncio.run(cell())
        return space["got"]

    error = a_skipped_vote_raises(run_cell, "<cell-7>:4", "<cell-7>:5", timeout=timeout)
    rows = str(error).splitlines()[1:3]
    assert {r.split("called from ")[1].split()[0].rstrip(",") for r in rows} == \
        {"<cell-7>:4", "<cell-7>:5"}, error


def run_sync(coro: Any) -> Any:
    """A coroutine that never suspends, run from synchronous code by stepping it once."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended")


def votes_stepped_by_hand(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    got = []
    if comm.rank != skipper:
        got.append(run_sync(any_of(comm, comm.rank == 0)))
    got.append(run_sync(any_of(comm, False)))
    return got


def votes_stepped_by_hand_in_a_task(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    async def in_task() -> Any:
        return votes_stepped_by_hand(comm, skipper)
    return asyncio.run(in_task())


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("driver", [votes_stepped_by_hand, votes_stepped_by_hand_in_a_task])
def test_a_coroutine_stepped_by_hand_keeps_its_steppers_line(
        driver: Any, timeout: Optional[float]) -> None:
    """A coroutine stepped with ``send`` (a synchronous driver of one that never suspends) is
    no task's: before, it was its own caller as a task is, so two votes through one helper
    stepped from two lines were one call and the rank that skipped the first returned its
    peers' first vote as its second, without an error."""
    first = votes_stepped_by_hand.__code__.co_firstlineno
    a_skipped_vote_raises(driver, f"test_core_tasks.py:{first + 3}",
                          f"test_core_tasks.py:{first + 4}", timeout=timeout)


@types.coroutine
def any_of_legacy(comm: tc.TypedComm, flag: Any) -> Any:
    """A generator-based coroutine (``types.coroutine``, older libraries' awaitables) that
    delegates to the vote helper: ``yield from`` runs it once, as an ``await`` does."""
    return (yield from any_of(comm, flag).__await__())


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_two_votes_through_a_generator_based_coroutine_are_two_calls(
        timeout: Optional[float]) -> None:
    """A ``types.coroutine`` generator's code is flagged CO_ITERABLE_COROUTINE, which
    ``loops.loop_spans`` refused as a function with a loop: it carried no callers, so its two
    votes were one call and the rank that skipped the first returned its peers' first vote as
    its second, without an error."""
    def run_votes(comm: tc.TypedComm, skip: Optional[int]) -> Any:
        return asyncio.run(async_votes(comm, skip, any_of_legacy))

    first = async_votes.__code__.co_firstlineno
    a_skipped_vote_raises(run_votes, f"test_core_callers.py:{first + 6}",
                          f"test_core_callers.py:{first + 7}", timeout=timeout)


# Code compiled without column positions (``-X no_debug_ranges``) names a call's callee by the
# stack (a stepper's; a role branch's call by its name): each function's last call is read.
def steps(coro: Any) -> Any:
    return coro.send(None)


def throws_into(self: Any, exc: BaseException) -> Any:
    return self.gen.throw(exc)


def schedules(loop: Any, make: Any) -> Any:
    return loop.create_task(make())


def sends_what_a_call_returns(coro: Any, closer: Any) -> Any:
    return coro.send(closer.close())


def sends_a_method(coro: Any, other: Any) -> Any:
    return coro.send(other.throw)


def sends_one_of_two(coro: Any, which: bool, a: Any, b: Any) -> Any:
    return coro.send(a if which else b)


def measures(items: Any) -> Any:
    return len(items)


def broadcasts(comm: Any, x: Any) -> Any:
    return comm.bcast(x, root=0)


def hands_on(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


@pytest.mark.parametrize("fn, callee", [
    (steps, "send"), (throws_into, "throw"), (schedules, "create_task"),
    (sends_what_a_call_returns, "send"), (sends_a_method, "send"), (sends_one_of_two, None),
    (measures, "len"), (broadcasts, "bcast"), (hands_on, "fn")])
def test_a_calls_callee_is_read_from_the_stack_where_no_columns_are_kept(
        fn: Any, callee: Optional[str]) -> None:
    """The walk back over the arguments' stack effects stops at the load that pushed the
    callee, past loads inside the arguments; a jump between them (a conditional argument)
    leaves it unknown."""
    import dis

    from typedcoll.core.callers import _CALLS
    from typedcoll.core.sites import callee_by_stack

    instructions = list(dis.get_instructions(fn))
    last = max(i for i, ins in enumerate(instructions) if ins.opcode in _CALLS)
    found = callee_by_stack(instructions[:last + 1])
    assert (found.argval if found is not None else None) == callee, instructions
