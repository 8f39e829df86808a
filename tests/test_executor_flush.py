"""SymmetricFlush on in-process ranks: delivery, local post checks, the step clock, and a flush
reached under a rank-local condition."""

from __future__ import annotations

import re
from typing import List, Optional

import msgspec
import pytest

import typedcoll as tc
from typedcoll import testing
from typedcoll.executor import Delivery, IterStats, RankState, SymmetricFlush, TimeoutFlag

CHANNELS = {"rank_state": RankState, "timeouts": TimeoutFlag, "iter_stats": IterStats}
SITE = r"test_executor_flush\.py:\d+"
BATCH = rf"FlushBatch@{SITE}"  # a flush's default batch name: where it was created
STEP_HINT = ("  the ranks are at different steps of the same call: a rank skipped or repeated an "
             "iteration")  # a step DesyncError's last line (no regex metacharacters)


def run(n, fn):
    return testing.run(n, fn, timeout=10, name="tp")


def raised(n, fn):
    """Every rank's exception, in rank order; fails when some rank returned."""
    with pytest.raises(Exception) as info:  # an ExceptionGroup
        run(n, fn)
    errors = list(info.value.exceptions)  # type: ignore[attr-defined]
    assert len(errors) == n, errors
    return errors


@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_flush_delivers_every_rank_messages(nranks):
    def body(comm):
        r, n = comm.rank, comm.size
        flush = SymmetricFlush(comm, CHANNELS)
        flush.post("rank_state", RankState(r, r, 10 * r))
        if r % 2:
            flush.post("timeouts", TimeoutFlag(rank=r, iteration=0, request_ids=(r, r + 1)))
            flush.post("timeouts", TimeoutFlag(rank=r, iteration=0))
        assert flush.num_pending == (3 if r % 2 else 1)
        d = flush.flush(step=0)
        assert isinstance(d, Delivery) and d.step == 0 and d.seq == 0
        assert d["rank_state"] == [(RankState(s, s, 10 * s),) for s in range(n)]
        assert [len(x) for x in d["timeouts"]] == [2 if s % 2 else 0 for s in range(n)]
        assert list(d.messages("timeouts")) == [
            (s, m) for s in range(n) if s % 2
            for m in (TimeoutFlag(rank=s, iteration=0, request_ids=(s, s + 1)),
                      TimeoutFlag(rank=s, iteration=0))]
        assert d.latest("iter_stats") == [None] * n and flush.num_pending == 0
        assert len(d) == n + 2 * (n // 2) and d["timeouts"] is d["timeouts"]
        assert repr(d) == f"Delivery(step=0, seq=0, messages={len(d)})"
        empty = flush.flush(step=1)  # nothing pending anywhere: still one collective
        assert len(empty) == 0 and comm.seq == 2 and flush.flushes == 2
        assert flush.posted == {"rank_state": 1, "timeouts": 2 if r % 2 else 0,
                                "iter_stats": 0}
        with pytest.raises(KeyError, match=re.escape(
                "expected a channel in ['rank_state', 'timeouts', 'iter_stats'], got 'nope'")):
            d["nope"]
        return d.channels

    assert run(nranks, body) == [("rank_state", "timeouts", "iter_stats")] * nranks


def test_a_message_posted_by_another_thread_during_a_flush_goes_out_in_the_next():
    # A callback thread (a transfer's completion, say) posts while the rank's main thread is
    # inside a flush: that message was not sent, so the flush must leave it queued.
    import threading
    import time

    posted = threading.Event()

    def body(comm):
        flush = SymmetricFlush(comm, {"done": int})
        if comm.rank == 0:
            flush.post("done", 1)

            def poster():
                deadline = time.monotonic() + 10
                while not comm._p.channel.busy[0] and time.monotonic() < deadline:
                    time.sleep(0.001)  # until rank 0 is inside the flush
                flush.post("done", 2)
                posted.set()
            thread = threading.Thread(target=poster)
            thread.start()
        else:
            posted.wait(10)  # rank 0 waits inside the flush for this rank meanwhile
        first = flush.flush(step=0)
        if comm.rank == 0:
            thread.join()
        second = flush.flush(step=1)
        return first["done"], second["done"], flush.posted, flush.num_pending

    results = run(2, body)
    assert [(first, second) for first, second, _, _ in results] == \
        [([(1,), ()], [(2,), ()])] * 2
    assert [(posted_counts, pending) for _, _, posted_counts, pending in results] == \
        [({"done": 2}, 0), ({"done": 0}, 0)]


def test_post_checks_locally():
    def body(comm):
        flush = SymmetricFlush(comm, CHANNELS)
        with pytest.raises(KeyError, match=re.escape(
                "expected a channel in ['rank_state', 'timeouts', 'iter_stats'], got 'nope'")):
            flush.post("nope", RankState(0))
        with pytest.raises(TypeError, match="^channel 'timeouts': expected TimeoutFlag, got "
                                            "RankState$"):
            flush.post("timeouts", RankState(0))
        assert flush.num_pending == 0 and comm.seq == 0  # nothing was communicated
        with pytest.raises(ValueError, match="^expected at least one channel, got none$"):
            SymmetricFlush(comm, {})
        # A record inside the channel's type: a TimeoutFlag went out on an Optional[RankState]
        # channel and arrived as RankState(rank=...), its own fields dropped.
        nested = SymmetricFlush(comm, {"states": Optional[RankState],
                                       "batches": List[RankState]})
        with pytest.raises(TypeError, match=re.escape(
                "channel 'states': expected Optional[RankState], got TimeoutFlag")):
            nested.post("states", TimeoutFlag(rank=0, iteration=0))
        with pytest.raises(TypeError, match=re.escape(
                "channel 'batches': expected list[RankState], got TimeoutFlag at [1]")):
            nested.post("batches", [RankState(0), TimeoutFlag(rank=0, iteration=0)])
        nested.post("states", None)
        nested.post("batches", [RankState(0)])
        assert nested.num_pending == 2

    run(1, body)


def test_flush_step_sets_the_clock_and_ordinal_is_the_default():
    def body(comm):
        flush = SymmetricFlush(comm, CHANNELS)
        assert flush.flush().step == 0 and comm.step is None  # no clock: the flush's ordinal
        assert flush.flush(step=7).step == 7 and comm.step == 7
        comm.allgather(comm.rank)  # stamped with step 7 by the clock
        assert flush.flush().step == 7  # no step given: the clock
        return comm.step

    assert run(2, body) == [7, 7]


def test_clock_from_flush_catches_a_skipped_iteration_later():
    # The flush sets step 4 on every rank; rank 0 then moves its clock on alone: the next
    # collective, the same call on every rank, differs in step only.
    def body(comm):
        SymmetricFlush(comm, CHANNELS).flush(step=4)
        if comm.rank == 0:
            comm.set_step(5)
        comm.allgather(comm.rank)

    errors = raised(2, body)
    assert {type(e) for e in errors} == {tc.DesyncError}
    text = str(errors[0])
    assert re.fullmatch(
        rf"collective #1 on tp diverged \(step\):\n"
        rf"  rank 0: allgather\[int\] at {SITE}, its 1st call, step 5\n"
        rf"  rank 1: allgather\[int\] at {SITE}, its 1st call, step 4\n"
        rf"{STEP_HINT}", text), text
    assert str(errors[1]) == text


def _idle_iteration_loop(comm, clock_at_top):
    """Rank 1 idles through iteration 1 (`continue`); every iteration makes an allgather, then
    an end-of-iteration flush."""
    flush = SymmetricFlush(comm, CHANNELS)
    for it in range(3):
        if clock_at_top:
            comm.set_step(it)
        if comm.rank == 1 and it == 1:
            continue
        comm.allgather(it)
        flush.flush(step=it)


def test_a_flush_at_the_end_stamps_the_next_iteration_so_the_clock_goes_on_top():
    # Without set_step at the top, the flush's clock lags an iteration behind: rank 1's
    # iteration 2 meets rank 0's iteration 1 in the allgather (what the docs warn of), and only
    # the flush after it raises (step).
    def lagging(comm):
        try:
            _idle_iteration_loop(comm, clock_at_top=False)
        except tc.DesyncError as exc:
            return exc.seq, str(exc).splitlines()
        raise AssertionError("expected the flush to raise")

    results = run(2, lagging)
    assert results[0] == results[1], results
    seq, lines = results[0]
    assert seq == 3 and lines[0] == "collective #3 on tp diverged (step):", lines
    assert re.fullmatch(rf"  rank 0: flush\[{BATCH}\] at {SITE}, its 2nd "
                        rf"call, step 1", lines[1]), lines

    # With it, the first call of the iteration rank 1 went on to raises on every rank, before
    # any payload of another iteration is returned.
    errors = raised(2, lambda comm: _idle_iteration_loop(comm, clock_at_top=True))
    assert {type(e) for e in errors} == {tc.DesyncError}
    text = str(errors[0])
    assert re.fullmatch(
        rf"collective #2 on tp diverged \(step\):\n"
        rf"  rank 0: allgather\[int\] at {SITE}, its 2nd call, step 1\n"
        rf"  rank 1: allgather\[int\] at {SITE}, its 2nd call, step 2\n"
        rf"{STEP_HINT}", text), text
    assert str(errors[1]) == text


def test_flush_under_rank_local_condition_meets_another_collective():
    def body(comm):
        flush = SymmetricFlush(comm, CHANNELS)
        if comm.rank == 1:
            flush.post("rank_state", RankState(1))
            flush.flush(step=5)                       # a flush reached on rank 1 only
        else:
            comm.allgather(RankState(0), step=5)

    errors = raised(2, body)
    assert {type(e) for e in errors} == {tc.DesyncError}
    text = str(errors[0])
    assert re.fullmatch(
        rf"collective #0 on tp diverged \(op, call site, schema\):\n"
        rf"  rank 0: allgather\[RankState\] at {SITE}, its 1st call, step 5\n"
        rf"  rank 1: flush\[{BATCH}\] at {SITE}, its 1st call, step 5", text), text
    assert [k.value for k in errors[0].kinds] == ["op", "call site", "schema"]
    assert str(errors[1]) == text


def test_two_flush_points_differ_in_call_site_and_a_name_joins_them():
    def two_points(comm):
        flush = SymmetricFlush(comm, CHANNELS)
        if comm.rank == 1:
            flush.flush(step=6)
        else:
            flush.flush(step=6)

    errors = raised(2, two_points)
    text = str(errors[0])
    assert re.fullmatch(
        rf"collective #0 on tp diverged \(call site\):\n"
        rf"  rank 0: flush\[{BATCH}\] at {SITE}, its 1st call, step 6\n"
        rf"  rank 1: flush\[{BATCH}\] at {SITE}, its 1st call, step 6\n"
        rf"  only the call sites differ: if these are the same collective called from different "
        rf"places, give every rank's call the same name=", text), text

    def named(comm):
        flush = SymmetricFlush(comm, CHANNELS)
        flush.post("rank_state", RankState(comm.rank))
        if comm.rank == 1:
            d = flush.flush(step=6, name="drain")
        else:
            d = flush.flush(step=6, name="drain")
        return len(d)

    assert run(2, named) == [2, 2]


def test_flush_one_iteration_late_differs_in_step():
    def body(comm):
        SymmetricFlush(comm, CHANNELS).flush(step=7 if comm.rank == 1 else 8)

    errors = raised(2, body)
    text = str(errors[0])
    assert re.fullmatch(
        rf"collective #0 on tp diverged \(step\):\n"
        rf"  rank 0: flush\[{BATCH}\] at {SITE}, its 1st call, step 8\n"
        rf"  rank 1: flush\[{BATCH}\] at {SITE}, its 1st call, step 7\n"
        rf"{STEP_HINT}", text), text


def test_different_channels_differ_in_schema():
    def body(comm):
        channels = CHANNELS if comm.rank == 0 else {"rank_state": RankState}
        SymmetricFlush(comm, channels).flush(step=1)

    errors = raised(2, body)
    text = str(errors[0])
    assert re.fullmatch(
        rf"collective #0 on tp diverged \(schema\):\n"
        rf"  rank 0: flush\[{BATCH}@[0-9a-f]{{8}}\] at {SITE}, its 1st call, step 1\n"
        rf"  rank 1: flush\[{BATCH}@[0-9a-f]{{8}}\] at {SITE}, its 1st call, step 1\n"
        rf"  only the flush's channels differ: build the SymmetricFlush with the same channels "
        rf"and message types on every rank \(and one version of each type\)", text), text


@pytest.mark.parametrize("nranks", [2, 4])
def test_flushes_of_two_objects_from_one_line_are_told_apart(nranks):
    """Two SymmetricFlush objects with the same channels, flushed from one line (a loop over
    them): a rank that skips one flushes the other against its peers' first. Their batches are
    named where each was created, so every rank raises instead of receiving the other object's
    messages, and that with only one rank wrong."""
    def body(comm):
        prefill = SymmetricFlush(comm, {"rank_state": RankState})
        decode = SymmetricFlush(comm, {"rank_state": RankState})
        prefill.post("rank_state", RankState(comm.rank, 1))
        decode.post("rank_state", RankState(comm.rank, 2))
        for flush in (prefill, decode):
            if flush is prefill and comm.rank == nranks - 1:
                continue                              # this rank had no prefill batch
            flush.flush(step=0)

    errors = raised(nranks, body)
    assert {type(e) for e in errors} == {tc.DesyncError}
    text = str(errors[0])
    first = "0" if nranks == 2 else "0-2"
    assert re.fullmatch(
        rf"collective #0 on tp diverged \(schema\):\n"
        rf"  ranks? {first}: flush\[{BATCH}\] at {SITE}, its 1st call, step 0\n"
        rf"  rank {nranks - 1}: +flush\[{BATCH}\] at {SITE}, its 1st call, step 0\n"
        rf"  only the flushes' batches differ \({BATCH} and {BATCH}\): each SymmetricFlush is "
        rf"named where it was created, or by its batch_name=, so a rank flushed one where its "
        rf"peers flushed another \(a rank skipped or added a flush\), or built it elsewhere: "
        rf"if these are one flush point, flush them with one name= \(or build them with one "
        rf"batch_name=\)", text), text
    assert all(str(e) == text for e in errors)
    made = re.findall(r"flush\[FlushBatch@test_executor_flush\.py:(\d+)\]", text)
    assert int(made[1]) == int(made[0]) + 1  # rank 0 flushed prefill, the last rank decode


def test_objects_made_at_one_line_in_orders_that_differ_say_how_to_name_them():
    """Flushes made lazily, per stage, at one line: each rank numbers them in the order it made
    them, so the ranks' names differ. Every rank raises, and the hint says what to do."""
    def body(comm):
        made = {}

        def flush_for(stage):
            if stage not in made:
                made[stage] = SymmetricFlush(comm, {"rank_state": RankState})
            return made[stage]

        for stage in (["prefill", "decode"] if comm.rank == 0 else ["decode", "prefill"]):
            flush_for(stage).post("rank_state", RankState(comm.rank))
        flush_for("prefill").flush(step=0)

    errors = raised(2, body)
    text = str(errors[0])
    assert re.fullmatch(
        rf"collective #0 on tp diverged \(schema\):\n"
        rf"  rank 0: flush\[(?P<name>{BATCH})\] at {SITE}, its 1st call, step 0\n"
        rf"  rank 1: flush\[(?P=name)#2\] at {SITE}, its 1st call, step 0\n"
        rf"  only the numbers of flushes made at one line differ \((?P=name) and (?P=name)#2\): "
        rf"objects made there are numbered in the order each rank made them, so a rank flushed "
        rf"one where its peers flushed another, or the ranks made them in different orders: "
        rf"then make them in one order on every rank, or give each its own batch_name= \(one "
        rf"per stage, say\)", text), text
    assert str(errors[1]) == text


def test_a_driver_and_its_workers_flush_their_own_objects_as_one_named_flush():
    """Objects built at two lines (a driver's, its workers') are one flush point when flushed
    with one name=; without one, every rank raises and the hint says so."""
    def driver(comm, name):
        flush = SymmetricFlush(comm, {"rank_state": RankState})
        flush.post("rank_state", RankState(comm.rank))
        return flush.flush(step=0, name=name)["rank_state"]

    def worker(comm, name):
        flush = SymmetricFlush(comm, {"rank_state": RankState})
        flush.post("rank_state", RankState(comm.rank))
        return flush.flush(step=0, name=name)["rank_state"]

    got = run(3, lambda comm: (driver if comm.rank == 0 else worker)(comm, "control"))
    assert got == [[(RankState(0),), (RankState(1),), (RankState(2),)]] * 3
    errors = raised(3, lambda comm: (driver if comm.rank == 0 else worker)(comm, None))
    text = str(errors[0])
    assert text.endswith(
        "  the ranks flushed different SymmetricFlush objects from different lines: if these "
        "are one flush point (a driver's and its workers'), flush them with one name=; else a "
        "rank skipped or added a flush before this one"), text
    assert all(str(e) == text for e in errors)


def test_objects_made_at_one_line_are_numbered_and_one_batch_name_joins_two():
    def body(comm):
        made = [SymmetricFlush(comm, {"rank_state": RankState}) for _ in range(3)]
        names = [f._batch_type.__name__ for f in made]
        # Declared one flush point: a rank may flush either object there.
        a, b = (SymmetricFlush(comm, {"rank_state": RankState}, batch_name="Control")
                for _ in range(2))
        mine = a if comm.rank == 0 else b
        mine.post("rank_state", RankState(comm.rank))
        return names, mine.flush(step=0)["rank_state"]

    got = run(2, body)
    names = got[0][0]
    assert got[1][0] == names
    assert re.fullmatch(rf"FlushBatch@({SITE})", names[0]) and \
        names[1:] == [names[0] + "#2", names[0] + "#3"], names
    assert [g[1] for g in got] == [[(RankState(0),), (RankState(1),)]] * 2


def test_bad_step_on_one_rank_fails_the_flush_on_every_rank_and_keeps_messages():
    def body(comm):
        flush = SymmetricFlush(comm, CHANNELS)
        flush.post("rank_state", RankState(comm.rank))
        try:
            flush.flush(step="x" if comm.rank == 1 else 1)  # type: ignore[arg-type]
        finally:
            # Nothing was delivered: the message is still pending and no clock moved.
            assert flush.num_pending == 1 and comm.step is None

    errors = raised(2, body)
    assert [type(e) for e in errors] == [tc.PeerError, tc.EncodeError]
    assert re.fullmatch(rf"collective #0 on tp: rank 1 failed its flush\[{BATCH}\] "
                        rf"contribution at {SITE}: expected step to be None or a 64-bit int, "
                        rf"got 'x'", str(errors[0])), str(errors[0])
    assert re.fullmatch(rf"collective #0 on tp: rank 1 could not send its flush\[{BATCH}\] "
                        rf"contribution at {SITE}: expected step to be None or a 64-bit int, "
                        rf"got 'x'", str(errors[1])), str(errors[1])


def test_a_message_unfit_for_its_channel_fails_one_flush_and_is_kept_aside():
    """A message that post() accepts (a Struct whose field holds the wrong type; a str on an
    Optional[int] channel) fails the flush on every rank; the posting rank takes it out of its
    queues into ``rejected`` so the next flush delivers everything else, every peer's too."""
    from typing import Optional

    def body(comm):
        flush = SymmetricFlush(comm, {"timeouts": TimeoutFlag, "count": Optional[int]})
        bad = comm.rank == 1
        flush.post("timeouts", TimeoutFlag(rank=comm.rank, iteration=0,
                                           request_ids=("x",) if bad else (comm.rank,)))
        flush.post("count", "oops" if bad else comm.rank)
        try:
            flush.flush(step=0)
        except tc.CollectiveError as exc:
            first = exc
        delivery = flush.flush(step=1)
        return (type(first), str(first), [len(t) for t in delivery["timeouts"]],
                delivery["count"], [(ch, why.split(":")[0]) for ch, _, why in flush.rejected])

    got = run(3, body)
    assert [g[0] for g in got] == [tc.DecodeError, tc.EncodeError, tc.DecodeError]
    assert "payload from rank 1 does not decode as FlushBatch" in got[0][1]
    assert "taken out of this rank's queues (in SymmetricFlush.rejected)" in got[1][1]
    assert "'count': 'oops' (ValidationError: Expected `int | null`, got `str`)" in got[1][1]
    assert [g[2:4] for g in got] == [([1, 0, 1], [(0,), (), (2,)])] * 3
    assert [g[4] for g in got] == [[], [("timeouts", "ValidationError"),
                                        ("count", "ValidationError")], []]


class Opaque:
    """No codec knows it: the encoder raises NotImplementedError, not a msgspec error."""


class Count(msgspec.Struct):
    n: int


def test_a_message_that_does_not_encode_at_all_is_kept_aside_too():
    """Whatever the encoder raises for a message, it is unfit: taken aside into ``rejected``,
    an EncodeError on its rank and a PeerError on the others, and the next flush delivers."""
    def body(comm):
        flush = SymmetricFlush(comm, {"count": Count})
        flush.post("count", Count(comm.rank))
        if comm.rank == 2:
            flush.post("count", Count(Opaque()))  # post() checks the class, not its fields
        try:
            flush.flush(step=0)
        except tc.CollectiveError as exc:
            first = exc
        delivery = flush.flush(step=1)
        return type(first), [[c.n for c in got] for got in delivery["count"]], \
            [(ch, why.split(":")[0]) for ch, _, why in flush.rejected]

    got = run(3, body)
    assert [g[0] for g in got] == [tc.PeerError, tc.PeerError, tc.EncodeError]
    assert [g[1] for g in got] == [[[0], [1], [2]]] * 3
    assert [g[2] for g in got] == [[], [], [("count", "NotImplementedError")]]
