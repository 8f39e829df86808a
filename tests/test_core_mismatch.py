"""Mismatch analysis as pure logic over hand-built envelopes (no communicator)."""

from __future__ import annotations

import pytest

from typedcoll import EnvelopeInfo, Group, MismatchKind
from typedcoll._mismatch import (compact_ranks, describe, desync_message, format_groups,
                                 group_envelopes, mismatch_kinds)

K = MismatchKind


def env(rank, **fields):
    base = dict(seq=902, op="allgather", schema="RankState", fingerprint="aa" * 8,
                site="adp_router.py:88", step=451)
    base.update(fields)
    return EnvelopeInfo(rank=rank, **base)


def flag(rank, **fields):
    return env(rank, schema="TimeoutFlag", fingerprint="bb" * 8, site="py_executor.py:4438",
               **fields)


@pytest.mark.parametrize("ranks, text", [
    ([3], "rank 3"),
    ([0, 1, 2, 4, 5, 6, 7], "ranks 0-2,4-7"),
    ([0, 1], "ranks 0-1"),
    ([0, 2], "ranks 0,2"),
    ([5, 1, 3, 2], "ranks 1-3,5"),
    ([1, 1, 2], "ranks 1-2"),
    ([0, 2, 3, 4, 9], "ranks 0,2-4,9"),
    ([7, 6], "ranks 6-7"),
])
def test_compact_ranks(ranks, text):
    assert compact_ranks(ranks) == text


def test_the_issue_example():
    envelopes = [flag(3) if r == 3 else env(r) for r in range(8)]
    kinds = mismatch_kinds(envelopes)
    groups = group_envelopes(envelopes)
    assert kinds == [K.SCHEMA]
    assert [g.ranks for g in groups] == [(0, 1, 2, 4, 5, 6, 7), (3,)]
    assert all(isinstance(g, Group) for g in groups)
    assert groups[0].envelope == env(0)
    assert desync_message(902, "COMM_WORLD", kinds, groups) == (
        "collective #902 on COMM_WORLD diverged (schema):\n"
        "  ranks 0-2,4-7: allgather[RankState] at adp_router.py:88 step 451\n"
        "  rank 3:        allgather[TimeoutFlag] at py_executor.py:4438 step 451")


def test_groups_ordered_by_lowest_rank_whatever_the_input_order():
    envelopes = [flag(0), env(5), env(1), flag(2)]
    groups = group_envelopes(envelopes)
    assert [g.ranks for g in groups] == [(0, 2), (1, 5)]
    assert [g.envelope.rank for g in groups] == [0, 1]


def test_single_group_and_no_kinds():
    envelopes = [env(r) for r in range(4)]
    assert mismatch_kinds(envelopes) == []
    groups = group_envelopes(envelopes)
    assert [g.ranks for g in groups] == [(0, 1, 2, 3)]
    # No kind found (say, only the site differs): the head still says something.
    assert desync_message(1, "W", [], groups).splitlines()[0] == \
        "collective #1 on W diverged (envelope):"


@pytest.mark.parametrize("other, kinds", [
    (dict(seq=903), [K.SEQUENCE]),
    (dict(op="gather", root=0), [K.OP, K.ROOT]),
    (dict(schema="TimeoutFlag", fingerprint="bb" * 8), [K.SCHEMA]),
    (dict(fingerprint="cc" * 8), [K.SCHEMA]),  # same name, another version
    (dict(step=452), [K.STEP]),
    (dict(step=None), [K.STEP]),
    (dict(op="allreduce", reduce_op="max"), [K.OP, K.REDUCE_OP]),
    (dict(shape=(4,)), [K.SHAPE]),
    (dict(dtype="int32"), [K.DTYPE]),
    (dict(seq=1, op="bcast", schema="X", step=1, root=1, reduce_op="sum", shape=(1,),
          dtype="int8"),
     [K.SEQUENCE, K.OP, K.SCHEMA, K.STEP, K.ROOT, K.REDUCE_OP, K.SHAPE, K.DTYPE]),
    (dict(site="other.py:1"), []),  # call sites alone differ only for ops that pin them
])
def test_kinds_in_fixed_order(other, kinds):
    assert mismatch_kinds([env(0), env(1, **other)]) == kinds
    assert mismatch_kinds([env(1, **other), env(0)]) == kinds


def test_call_site_kind_only_when_pinned():
    a = env(0, site="a.py:1", site_checked=True)
    b = env(1, site="b.py:2", site_checked=True)
    assert mismatch_kinds([a, b]) == [K.CALL_SITE]
    assert mismatch_kinds([a, env(1, site="a.py:1", site_checked=True)]) == []


def test_kind_values_are_the_words_in_messages():
    assert [k.value for k in K] == ["sequence", "op", "schema", "step", "root", "reduce op",
                                    "shape", "dtype", "call site", "missing ranks"]


def test_describe_fields():
    assert describe(env(0)) == "allgather[RankState] at adp_router.py:88 step 451"
    assert describe(env(0, step=None)) == "allgather[RankState] at adp_router.py:88"
    assert describe(env(0, op="gather", root=2)) == \
        "gather[RankState] root=2 at adp_router.py:88 step 451"
    assert describe(env(0, op="allreduce", schema="ndarray", reduce_op="sum", shape=(2, 3),
                        dtype="float32", step=None)) == \
        "allreduce[ndarray] op=sum shape=(2, 3) dtype=float32 at adp_router.py:88"
    # A differing root is shown even for ops without one, so both sides are visible.
    assert describe(env(0), [K.ROOT]) == \
        "allgather[RankState] root=None at adp_router.py:88 step 451"
    assert describe(env(0, op="barrier", schema="", step=None)) == "barrier at adp_router.py:88"
    assert describe(env(0, seq=5), [K.SEQUENCE]) == \
        "allgather[RankState] seq=5 at adp_router.py:88 step 451"
    assert describe(env(0, error="TypeError: no")) == \
        "allgather[RankState] at adp_router.py:88 step 451 (failed: TypeError: no)"


def test_fingerprints_shown_only_when_two_schemas_share_a_name():
    old = env(0, fingerprint="0123456789abcdef")
    new = env(1, fingerprint="fedcba9876543210")
    groups = group_envelopes([old, new])
    assert format_groups(groups, [K.SCHEMA]) == [
        "  rank 0: allgather[RankState@01234567] at adp_router.py:88 step 451",
        "  rank 1: allgather[RankState@fedcba98] at adp_router.py:88 step 451"]
    # Different names: no fingerprints.
    assert format_groups(group_envelopes([env(0), flag(1)]), [K.SCHEMA]) == [
        "  rank 0: allgather[RankState] at adp_router.py:88 step 451",
        "  rank 1: allgather[TimeoutFlag] at py_executor.py:4438 step 451"]


def test_three_groups_aligned():
    envelopes = [env(0), env(1, step=452), flag(2), env(3), env(4, step=452), env(5)]
    groups = group_envelopes(envelopes)
    assert desync_message(7, "COMM_WORLD.dup", mismatch_kinds(envelopes), groups) == (
        "collective #7 on COMM_WORLD.dup diverged (schema, step):\n"
        "  ranks 0,3,5: allgather[RankState] at adp_router.py:88 step 451\n"
        "  ranks 1,4:   allgather[RankState] at adp_router.py:88 step 452\n"
        "  rank 2:      allgather[TimeoutFlag] at py_executor.py:4438 step 451")


def test_envelope_info_round_trips_through_msgpack():
    import msgspec
    info = env(3, shape=(2, 3), dtype="int8", error="x")
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(info), type=EnvelopeInfo)
    assert back == info and back.shape == (2, 3)
