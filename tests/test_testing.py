"""typedcoll.testing.run: N ranks as threads, results in rank order, every rank's exception in one
ExceptionGroup, hangs turned into timeouts that name the absent ranks and where they are."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

import typedcoll as tc
from typedcoll.testing import run


def line_of(text: str) -> int:
    for number, line in enumerate(Path(__file__).read_text().splitlines(), 1):
        if text in line and "line_of" not in line:
            return number
    raise AssertionError(text)


def mine(err: BaseException) -> str:
    """The timeout's text up to the report of the diagnostics, when those are installed."""
    return str(err).split("\nhang report")[0]


def test_results_in_rank_order_with_args():
    def prog(comm, base, *, scale=1):
        return comm.allgather(base + comm.rank)

    assert run(3, prog, 10) == [[10, 11, 12]] * 3


def test_every_ranks_exception_in_one_group_noted_with_its_rank():
    def prog(comm):
        comm.barrier()
        if comm.rank in (0, 2):
            raise KeyError(f"rank {comm.rank}")
        return comm.rank

    with pytest.raises(ExceptionGroup, match=r"^2 of 3 ranks raised") as info:
        run(3, prog, timeout=5)
    assert [(type(e), e.__notes__) for e in info.value.exceptions] == [
        (KeyError, ["(rank 0 of 3)"]), (KeyError, ["(rank 2 of 3)"])]


def test_desync_raises_the_same_error_on_every_rank():
    def prog(comm):
        if comm.rank == 1:
            comm.bcast(1)
        comm.allgather(comm.rank)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=5)
    texts = {str(e) for e in info.value.exceptions}
    assert len(info.value.exceptions) == 2 and len(texts) == 1
    assert all(isinstance(e, tc.DesyncError) for e in info.value.exceptions)


def test_a_skipped_collective_times_out_naming_the_absent_rank_and_where_it_is():
    release = threading.Event()
    both_reported = threading.Barrier(2, timeout=10)

    def prog(comm):
        if comm.rank == 1:
            release.wait(10)  # ELSEWHERE
            return None
        try:
            comm.allgather(comm.rank)  # WAITING
        finally:
            both_reported.wait()  # rank 1 stays where it is until both reports are written
            release.set()

    with pytest.raises(ExceptionGroup) as info:
        run(3, prog, timeout=0.5)
    errors = info.value.exceptions
    assert len(errors) == 2 and all(isinstance(e, tc.CollectiveTimeout) for e in errors)
    assert all(e.missing == (1,) for e in errors)
    # (A report of the diagnostics, when they are installed, follows this one.)
    assert mine(errors[0]) == (
        f"collective #0 on WORLD: allgather[int] at test_testing.py:{line_of('# WAITING')} did "
        f"not complete within 0.5 s\n"
        f"ranks that never arrived, and where they are:\n"
        f"  rank 1: at test_testing.py:{line_of('# ELSEWHERE')} in prog (outside typedcoll)")


def test_absent_ranks_at_one_place_are_named_on_one_line():
    release = threading.Event()  # the absent ranks stay away until rank 0 has its report

    def prog(comm):
        if comm.rank:
            release.wait(30)  # AWAY
            return None
        try:
            return comm.allgather(comm.rank)
        finally:
            release.set()

    with pytest.raises(ExceptionGroup) as info:
        run(5, prog, timeout=0.3)
    (error,) = info.value.exceptions
    assert error.missing == (1, 2, 3, 4)
    assert str(error).splitlines()[1:3] == [
        "ranks that never arrived, and where they are:",
        f"  ranks 1-4: at test_testing.py:{line_of('# AWAY')} in prog (outside typedcoll)"]


def late_last_rank(size: int):
    """A program whose last rank calls allgather after its peers gave up on it."""
    gave_up = threading.Barrier(size, timeout=10)

    def prog(comm):
        if comm.rank == size - 1:
            gave_up.wait()  # its peers' part of the call is deposited, and abandoned
            return comm.allgather(comm.rank)  # LATE
        try:
            return comm.allgather(comm.rank)
        finally:
            gave_up.wait()
    return prog


def test_a_rank_that_arrives_after_its_peers_gave_up_raises_with_them():
    with pytest.raises(ExceptionGroup) as info:
        run(3, late_last_rank(3), timeout=0.3)
    errors = info.value.exceptions
    assert len(errors) == 3 and all(isinstance(e, tc.CollectiveTimeout) for e in errors)
    late = errors[2]
    assert [e.missing for e in errors] == [(2,), (2,), None]
    assert str(late) == (
        f"collective #0 on WORLD: allgather[int] at test_testing.py:{line_of('# LATE')} is "
        f"abandoned: ranks 0-1 gave up waiting at collective #0 (timeout 0.3 s) before it "
        f"completed on rank 2; no rank returns this call's result (their reports name the ranks "
        f"they waited for)")


def test_a_late_rank_that_has_heard_one_notice_claims_no_more(monkeypatch):
    """Over MPI a peer's notice may still be in flight when the late rank looks (one found of
    three): the message names the ranks it heard from, and says there may be others."""
    from typedcoll.transports.memory import MemoryTransport
    heard = MemoryTransport.given_up
    monkeypatch.setattr(MemoryTransport, "given_up",
                        lambda self: [n for n in heard(self) if n[0] == 0])
    with pytest.raises(ExceptionGroup) as info:
        run(4, late_last_rank(4), timeout=0.3)
    late = info.value.exceptions[3]
    assert "is abandoned: rank 0 (and possibly others) gave up waiting at collective #0 " \
        "(timeout 0.3 s) before it completed on rank 3;" in str(late), str(late)


def test_a_rank_waiting_in_another_call_is_shown_inside_typedcoll():
    def prog(comm):
        if comm.rank == 1:
            time.sleep(1.0)  # its receive starts mid-way through its peer's wait, a second each way
            return comm.recv(0)  # IN-RECV
        return comm.allgather(comm.rank)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=2.0)
    text = str(next(e for e in info.value.exceptions if "allgather" in str(e)))
    assert text.splitlines()[2] == (f"  rank 1: at test_testing.py:{line_of('# IN-RECV')} in "
                                    f"prog (inside typedcoll: recv)")


def test_a_rank_that_finished_early_is_said_to_have_finished():
    def prog(comm):
        if comm.rank == 0:
            return comm.allgather(1)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=0.3)
    lines = str(info.value.exceptions[0]).splitlines()
    assert lines[2] == "  rank 1: finished (returned or raised)"


def test_a_rank_stuck_in_its_own_code_is_reported_once_the_others_are_done():
    stop = threading.Event()

    def prog(comm):
        if comm.rank == 1:
            while not stop.is_set():  # SPINNING
                time.sleep(0.01)
        return comm.rank

    start = time.monotonic()
    try:
        with pytest.raises(ExceptionGroup) as info:
            run(2, prog, timeout=0.3)
    finally:
        stop.set()
    assert time.monotonic() - start < 5
    (err,) = info.value.exceptions
    assert isinstance(err, TimeoutError)
    assert re.fullmatch(
        rf"rank 1 of 2 did not return within 0.3 s of the other ranks finishing; it is at "
        rf"test_testing.py:{line_of('# SPINNING') + 1} in prog \(outside typedcoll\) \(its "
        rf"thread is left running\)", str(err))


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_rank_count_is_checked(n):
    with pytest.raises(ValueError, match=r"expected n to be an int of at least 1"):
        run(n, lambda comm: None)


def test_deterministic_and_fast():
    def prog(comm):
        out = []
        for i in range(300):
            comm.set_step(i)
            out.append(comm.allgather((comm.rank, i))[-1])
            out.append(comm.bcast(i if comm.rank == i % comm.size else None, root=i % comm.size))
        return out

    start = time.perf_counter()
    first = run(4, prog, timeout=10)
    assert time.perf_counter() - start < 10  # ~0.2 s on a 2-core machine
    assert first == run(4, prog, timeout=10)
    assert first[0][:4] == [(3, 0), 0, (3, 1), 1]


def test_one_rank():
    assert run(1, lambda comm: (comm.allgather("x"), comm.size)) == [(["x"], 1)]
