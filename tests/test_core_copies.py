"""Calls the compiler writes twice are one call (core/callers.py, ``_copies_of``).

A ``finally`` block is compiled once on the way out of its ``try`` and once in the exception
handler after the function's code; a ``while`` loop's test once before the loop and once at its
end. Both copies hold one line and column, so their identity may differ only by whether they
carry their callers: they must agree, or a rank that leaves its ``try`` by an exception makes
another call than its peers. On in-process ranks, over the C fast path (timeout None) and the
Python steps (timeout 10).
"""

from __future__ import annotations

import contextlib
import dis
from types import CodeType
from typing import Any, Iterator, List, Optional

import pytest

import typedcoll as tc
from typedcoll.core.callers import PICKED, role_site

from test_core_review import TIMEOUTS, one_desync, outcomes


class BatchError(Exception):
    """A rank-local failure of one iteration's batch (a request it alone rejected)."""


def vote_in_finally(comm: tc.TypedComm, failing: Optional[int], caught: bool) -> Any:
    """Every rank votes once per iteration, on every way out of its batch: whether any rank
    failed. ``failing`` raises at iteration 2; ``caught``: the loop catches it and goes on,
    else it propagates after the vote and every rank stops on the vote's count."""
    seen: List[int] = []
    try:
        for it in range(4):
            comm.set_step(it)
            failed = True
            try:
                try:
                    if comm.rank == failing and it == 2:
                        raise BatchError(f"rank {comm.rank} rejected a request")
                    failed = False
                finally:
                    count = comm.allreduce(int(failed), op="sum")
                    seen.append(count)
            except BatchError:
                if not caught:
                    raise
                continue
            if count and not caught:
                return ("stopped", seen)
    except BatchError:
        return ("raised after the vote", seen)
    return ("ran", seen)


@pytest.mark.parametrize("caught", [True, False])
@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_vote_in_finally_pairs_with_its_copy_in_the_handler(
        timeout: Optional[float], caught: bool) -> None:
    """Before, the handler's copy of the ``finally`` block (after the loop, ending in a
    re-raise) carried its callers and the loop's copy none: the failing rank's vote raised a
    DesyncError on every rank, its hint pointing at wrappers that were not there."""
    results = outcomes(3, vote_in_finally, 1, caught, timeout=timeout)
    if caught:
        assert results == [("ran", [0, 0, 1, 0])] * 3, results
    else:
        assert results == [("stopped", [0, 0, 1]), ("raised after the vote", [0, 0, 1]),
                           ("stopped", [0, 0, 1])], results
    assert outcomes(3, vote_in_finally, None, caught, timeout=timeout) == \
        [("ran", [0, 0, 0, 0])] * 3


def drain(comm: tc.TypedComm, work: List[int]) -> int:
    """A loop whose test is a vote: compiled before the loop and again at its end."""
    rounds = 0
    while any(comm.allgather(bool(work))):
        if work:
            work.pop()
        rounds += 1
    return rounds


def test_a_while_loops_test_is_one_call_before_the_loop_and_at_its_end() -> None:
    for timeout in TIMEOUTS:
        sizes = [1, 3, 0]
        assert outcomes(3, lambda comm: drain(comm, [0] * sizes[comm.rank]),
                        timeout=timeout) == [3] * 3


def call_offsets(code: CodeType, name: str) -> List[int]:
    """The offsets of the calls of ``name``'s method (every copy of each)."""
    instructions = list(dis.get_instructions(code))
    loads = {ins.positions for ins in instructions if ins.argval == name}
    return [ins.offset for ins in instructions if ins.opname in ("CALL", "CALL_KW")
            and ins.positions is not None and any(
                load is not None and load.lineno == ins.positions.lineno and
                load.col_offset == ins.positions.col_offset for load in loads)]


@pytest.mark.parametrize("function, name", [(vote_in_finally, "allreduce"),
                                            (drain, "allgather")])
def test_every_copy_of_a_call_answers_alike(function: Any, name: str) -> None:
    code = function.__code__
    offsets = call_offsets(code, name)
    assert len(offsets) == 2, dis.Bytecode(code).dis()
    assert len({role_site(code, at) & PICKED for at in offsets}) == 1


def fetch(comm: tc.TypedComm, flag: bool, box: List[Any]) -> bool:
    """A retry helper that votes on every attempt, in its ``finally``: every rank's first
    attempt succeeds, so the copy that runs is the one before the ``return``."""
    for _attempt in range(3):
        try:
            return flag
        except ConnectionError:
            continue
        finally:
            box.append(comm.allgather(flag))
    return False


@contextlib.contextmanager
def step_vote(comm: tc.TypedComm, flag: bool, box: List[Any]) -> Iterator[None]:
    """A scope that votes on every way out of its block; the loop after it holds a handler,
    which 3.12 and later place after the code, beside the ``finally``'s exception copy."""
    try:
        yield
    finally:
        box.append(comm.allgather(flag))
    for hook in ():
        try:
            hook()
        except Exception:
            pass


def two_votes(comm: tc.TypedComm, how: str, skipper: Optional[int]) -> List[Any]:
    comm.set_step(7)  # both votes in one iteration: the step clock cannot tell them apart
    box: List[Any] = []
    if comm.rank != skipper:
        if how == "retry":
            fetch(comm, comm.rank == 0, box)
        else:
            with step_vote(comm, comm.rank == 0, box):
                pass
    if how == "retry":
        fetch(comm, False, box)
    else:
        with step_vote(comm, False, box):
            pass
    return box


@pytest.mark.parametrize("how", ["retry", "scope"])
@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_skipped_vote_in_a_finally_reached_from_two_lines_raises(
        timeout: Optional[float], how: str) -> None:
    """The copies of a ``finally`` answer as the first, the one that runs normally: taking
    the coarser answer of all of them (no callers where any copy sat in a loop) made both
    uses one call, and the skipper's second vote took its peers' first without an error."""
    assert outcomes(3, two_votes, how, None, timeout=timeout) == \
        [[[True, False, False], [False, False, False]]] * 3
    error = one_desync(outcomes(3, two_votes, how, 2, timeout=timeout))
    assert list(error.kinds) == [tc.MismatchKind.CALL], error
