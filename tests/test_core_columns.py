"""Two collectives written on one line are two calls: a site's identity holds the column where
its call starts, not only its line (``core/identity.py``).

``comm.allgather(a) if ready else comm.allgather(b)`` with ``ready`` rank-local used to pair the
two votes silently (both sites read ``file.py:LINE``). The live verdict on in-process ranks runs
on the C path (``timeout=None``) and the Python steps (``timeout=10``); the message formatter and
the trace analyzer are pure logic on hand-built envelopes and dumps.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional

import pytest

import typedcoll as tc
from typedcoll import MismatchKind
from typedcoll.core.identity import column_of, format_column, site_fingerprint
from typedcoll.core.sites import COLUMNS
from typedcoll.core.desync import desync_message
from typedcoll.core.mismatch import EnvelopeInfo, format_groups, group_envelopes
from typedcoll.diagnostics.analysis import analyze

from test_core_review import TIMEOUTS, one_desync, outcomes
from test_trace import comm as trace_comm, dump, dumps_of, entry

FILE = "test_core_columns.py"


def line_and_columns(fn: Callable[..., Any], marker: str, call: str) -> tuple:
    """The line of ``fn`` holding ``marker``, and the 1-based columns where each ``call``
    starts on it (as messages show them)."""
    lines, start = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if marker in text:
            columns, at = [], text.find(call)
            while at >= 0:
                columns.append(at + 1)
                at = text.find(call, at + 1)
            return start + i, columns
    raise AssertionError(marker)


def two_votes_on_one_line(comm: tc.TypedComm, ready: bool) -> List[int]:
    return comm.allgather(1) if ready else comm.allgather(2)  # TWO-VOTES


def two_role_branches_on_one_line(comm: tc.TypedComm, ready: bool) -> Any:
    b, r = comm.bcast, comm.rank
    return (b("plan") if r == 0 else b(None)) if ready else (b("flag") if r == 0 else b(None))


def one_role_branch_on_one_line(comm: tc.TypedComm, x: Any) -> List[Any]:
    return [comm.bcast(x + i) if comm.rank == 0 else comm.bcast(None) for i in range(4)]


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_two_votes_on_one_line_with_a_rank_local_condition_raise(timeout: Optional[float]):
    assert outcomes(3, two_votes_on_one_line, True, timeout=timeout) == [[1, 1, 1]] * 3
    assert outcomes(3, two_votes_on_one_line, False, timeout=timeout) == [[2, 2, 2]] * 3

    def body(comm: tc.TypedComm) -> Any:  # rank 0 ready, its peers not: two different votes
        return two_votes_on_one_line(comm, comm.rank == 0)

    results = outcomes(3, body, timeout=timeout)
    one_desync(results)
    line, (ready, other) = line_and_columns(two_votes_on_one_line, "# TWO-VOTES", "comm.allgather")
    # (the function picks one of its two calls: each names its caller, the same on every rank)
    runner, (column,) = line_and_columns(outcomes, "return fn(comm, *a)", "fn(comm, *a)")
    called = (f" called from test_core_review.py:{runner}:{column} through {body.__qualname__} "
              f"({FILE}:{body.__code__.co_firstlineno}), its 1st call")
    assert str(results[0]).splitlines()[1:] == [
        f"  rank 0:    allgather[int] at {FILE}:{line}:{ready}{called}",
        f"  ranks 1-2: allgather[int] at {FILE}:{line}:{other}{called}",
        "  only the call sites differ: if these are the same collective called from different "
        "places, give every rank's call the same name="]
    assert list(results[0].kinds) == [MismatchKind.CALL]


@pytest.mark.skipif(COLUMNS, reason="run under -X no_debug_ranges by test_core_no_columns")
@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_two_votes_on_one_line_raise_without_column_positions(timeout: Optional[float]):
    """Where code keeps no column positions (``-X no_debug_ranges``), a site is
    its line and which of the line's calls it is, in bytecode order. Before, both votes were
    ``file.py:LINE``, and the function that picks one of them a thin wrapper: the ready rank
    took its peers' other vote without an error."""
    assert outcomes(3, two_votes_on_one_line, True, timeout=timeout) == [[1, 1, 1]] * 3
    assert outcomes(3, two_votes_on_one_line, False, timeout=timeout) == [[2, 2, 2]] * 3

    def body(comm: tc.TypedComm) -> Any:
        return two_votes_on_one_line(comm, comm.rank == 0)

    error = one_desync(outcomes(3, body, timeout=timeout))
    assert list(error.kinds) == [MismatchKind.CALL], error
    line, _ = line_and_columns(two_votes_on_one_line, "# TWO-VOTES", "comm.allgather")
    rows = str(error).splitlines()[1:3]
    at = f"allgather[int] at {FILE}:{line}"
    assert rows[0].startswith(f"  rank 0:    {at} (call 1 of 2 on its line) called from "), error
    assert rows[1].startswith(f"  ranks 1-2: {at} (call 2 of 2 on its line) called from "), error


def votes_when_done(comm: tc.TypedComm, box: List[Any]) -> None:
    try:
        pass
    finally:
        box.append(comm.allgather(True))  # FINALLY


def test_a_lines_calls_are_told_apart_and_the_compilers_copies_are_not():
    """``sites.calls_by_line``, what sites hold where code keeps no columns: the two votes of
    one line are its calls 0 and 1; the copies of a ``finally`` block (one run on each way
    out) are one call each."""
    import dis

    from typedcoll.core.sites import calls_by_line

    def read(fn: Callable[..., Any], marker: str) -> List[Any]:
        line, _ = line_and_columns(fn, marker, "comm.allgather")
        instructions = list(dis.get_instructions(fn))
        table = calls_by_line(instructions)
        return [table[i.offset] for i in instructions
                if i.offset in table and i.positions is not None and i.positions.lineno == line]

    assert read(two_votes_on_one_line, "# TWO-VOTES") == [(0, 2), (1, 2)]
    done = read(votes_when_done, "# FINALLY")  # allgather, then append, on each way out
    assert len(done) >= 4 and set(done) == {(0, 2), (1, 2)}, done


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_two_role_branches_on_one_line_are_two_calls(timeout: Optional[float]):
    assert outcomes(3, two_role_branches_on_one_line, True, timeout=timeout) == ["plan"] * 3
    assert outcomes(3, two_role_branches_on_one_line, False, timeout=timeout) == ["flag"] * 3

    def body(comm: tc.TypedComm) -> Any:  # the root ready, its receivers not: another call
        return two_role_branches_on_one_line(comm, comm.rank == 0)

    results = outcomes(3, body, timeout=timeout)
    one_desync(results)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_role_branch_on_one_line_still_matches_in_the_steady_state(timeout: Optional[float]):
    assert outcomes(3, one_role_branch_on_one_line, 10, timeout=timeout) == \
        [[10, 11, 12, 13]] * 3


def test_columns_are_shown_only_where_two_sites_share_a_line():
    def info(rank: int, site: str, column: int) -> EnvelopeInfo:
        return EnvelopeInfo(rank=rank, seq=4, op="allgather", schema="int", site=site,
                            column=column)
    one_line = group_envelopes([info(0, "m.py:7", 11), info(1, "m.py:7", 40)])
    assert format_groups(one_line, [MismatchKind.CALL]) == [
        "  rank 0: allgather[int] at m.py:7:12",
        "  rank 1: allgather[int] at m.py:7:41"]
    two_lines = group_envelopes([info(0, "m.py:7", 11), info(1, "m.py:9", 11)])
    assert format_groups(two_lines, [MismatchKind.CALL]) == [
        "  rank 0: allgather[int] at m.py:7",
        "  rank 1: allgather[int] at m.py:9"]


def test_a_site_fingerprint_holds_its_column():
    def here() -> Any:
        import sys
        frame = sys._getframe(1)
        return frame.f_code, frame.f_lasti

    (code, first), (_, second) = here(), here()  # two calls, one line
    assert column_of(code, first) is not None and column_of(code, first) != column_of(code, second)
    assert site_fingerprint(code, first) != site_fingerprint(code, second)
    assert format_column("m.py:7", None) == "m.py:7" and format_column("m.py:7", 0) == "m.py:7:1"


def test_the_trace_analyzer_tells_two_calls_of_one_line_apart():
    def ranks(columns: List[int]) -> Any:
        return analyze(dumps_of(*(dump(r, [trace_comm(r, 2, [entry(0, column=c)])])
                                  for r, c in enumerate(columns))))
    assert ranks([4, 4]).consistent
    report = ranks([4, 30])
    div = report.comms[0].divergence
    assert div is not None and div.kinds == [MismatchKind.CALL]
    assert "loop.py:10:5" in div.text and "loop.py:10:31" in div.text


def test_a_rank_without_column_positions_is_named_at_creation(spmd):
    spmd("core_columns", 2, timeout=120,
         rank_env=[{}, {"PYTHONNODEBUGRANGES": "1"}])


def test_callers_on_one_line_are_told_apart_by_their_columns():
    # ``return f(lo, mid) if rank < mid else f(mid, hi)``: the rows read alike without them.
    from typedcoll.core.mismatch import Caller

    def info(rank: int, column: int) -> EnvelopeInfo:
        return EnvelopeInfo(rank=rank, seq=2, op="allreduce", schema="int", site="m.py:9",
                            column=4, callers=(Caller("m.py:12", column), Caller("m.py:20", 0)))
    rows = format_groups(group_envelopes([info(0, 15), info(1, 48)]), [MismatchKind.CALL])
    assert rows == ["  rank 0: allreduce[int] at m.py:9:5 called from m.py:12:16 called from "
                    "m.py:20:1", "  rank 1: allreduce[int] at m.py:9:5 called from m.py:12:49 "
                    "called from m.py:20:1"], rows


def test_a_site_without_its_column_says_why():
    def info(rank: int, column: Optional[int]) -> EnvelopeInfo:
        return EnvelopeInfo(rank=rank, seq=4, op="allgather", schema="int", site="m.py:7",
                            column=column)
    groups = group_envelopes([info(0, 11), info(1, 11), info(2, None)])
    text = desync_message(4, "WORLD", [MismatchKind.CALL], groups)
    assert text.splitlines()[1:] == [
        "  ranks 0-1: allgather[int] at m.py:7:12",
        "  rank 2:    allgather[int] at m.py:7",
        "  rank 2 ran code with no column positions (-X no_debug_ranges, PYTHONNODEBUGRANGES, "
        "or code compiled so), its peers with: a site's column is part of its identity, so run "
        "every rank alike (remove __pycache__ written without columns), or give the call a "
        "name="]
