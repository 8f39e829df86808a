"""Typed point to point under typedcoll.testing: values, matching, mismatches, errors, timeouts.

Over MPI the same checks run in tests/spmd/compat_p2p.py (test_p2p_mpi.py).
"""

from __future__ import annotations

import dataclasses
import gc
import re
import sys
import threading
import time
import types
from pathlib import Path
from typing import Optional

import msgspec
import numpy as np
import pytest

import typedcoll as tc
from typedcoll._comm import _created
from typedcoll.testing import run


class Request(msgspec.Struct):
    id: int
    text: str


class Reply(msgspec.Struct):
    id: int


@dataclasses.dataclass
class Point:
    x: int
    y: float


def only_rank(group: BaseException, rank: int) -> BaseException:
    found = [e for e in group.exceptions if f"(rank {rank} of" in "".join(e.__notes__)]
    assert len(found) == 1, group.exceptions
    return found[0]


def line_of(text: str) -> int:
    for offset, line in enumerate(Path(__file__).read_text().splitlines()):
        if text in line:
            return offset + 1
    raise AssertionError(text)


# --- values -------------------------------------------------------------------------------------
VALUES = [Request(1, "a"), Point(1, 2.5), np.arange(6).reshape(2, 3), np.float32(1.5), 7,
          "text", [1, 2], {"k": [1.0]}, None, b"raw"]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_value_arrives_as_its_own_class_without_schema(value):
    def prog(comm):
        if comm.rank == 0:
            comm.send(value, 1, tag=3)
            return None
        return comm.recv(0, 3)

    got = run(2, prog, timeout=10)[1]
    assert type(got) is type(value)
    if isinstance(value, np.ndarray):
        assert got.dtype == value.dtype and np.array_equal(got, value)
    else:
        assert got == value


def test_schema_given_on_receiver_decodes_as_it():
    def prog(comm):
        if comm.rank == 0:
            comm.send(None, 1, schema=Optional[Request])
            comm.send(Request(2, "b"), 1, schema=Optional[Request])
            return None
        return [comm.recv(0, schema=Optional[Request]) for _ in range(2)]

    assert run(2, prog, timeout=10)[1] == [None, Request(2, "b")]


def test_tags_match_out_of_order_and_wildcards_take_arrival_order():
    def prog(comm):
        if comm.rank == 0:
            for tag in (1, 2, 3):
                comm.send(f"t{tag}", 1, tag=tag)
            return None
        first = comm.recv(0, 2)
        rest = [comm.recv(None, None), comm.recv(0, None)]
        return [first] + rest

    assert run(2, prog, timeout=10)[1] == ["t2", "t1", "t3"]


def test_irecv_posted_first_takes_the_first_message_whatever_the_wait_order():
    def prog(comm):
        if comm.rank == 0:
            comm.send("first", 1, tag=5)
            comm.send("second", 1, tag=5)
            return None
        early = comm.irecv(0, None)
        late = comm.irecv(0, 5)
        return [late.wait(), early.wait(), early.test()]

    assert run(2, prog, timeout=10)[1] == ["second", "first", (True, "first")]


def test_a_receive_never_waited_for_leaves_nothing_behind():
    # A posted receive refers back to its channel; held in a table keyed by the channel, it kept
    # both, and the whole job, alive for the rest of the process.
    from typedcoll.core.protocol import LIVE

    def prog(comm):
        if comm.rank == 1:
            comm.irecv(0)  # posted, never waited for, never matched
    run(2, prog, timeout=5, name="abandoned_receive")
    gc.collect()
    assert [p for p in LIVE if p.name == "abandoned_receive"] == []


def test_isend_irecv_test_and_sendrecv_exchange():
    def prog(comm):
        peer = 1 - comm.rank
        request = comm.irecv(peer, 0)
        before = request.test()
        sending = comm.isend({"from": comm.rank}, peer)
        sending.wait()
        swapped = comm.sendrecv(comm.rank * 10, peer, peer, sendtag=7, recvtag=7)
        return before, request.wait(), swapped, sending.test()

    out = run(2, prog, timeout=10)
    assert out[0][1:] == ({"from": 1}, 10, (True, None))
    assert out[1][1:] == ({"from": 0}, 0, (True, None))


def test_communicators_sharing_a_channel_keep_their_messages_apart():
    def prog(comm):
        other = tc.TypedComm.__new__(tc.TypedComm)
        other._p = _created(comm._p.channel, 5.0, None)
        if comm.rank == 0:
            other.send("on the second", 1)
            comm.send("on the first", 1)
            return None
        return comm.recv(0), other.recv(0), other.name

    assert run(2, prog, timeout=10)[1] == ("on the first", "on the second", "WORLD#2")


# --- mismatches: the receiver raises, naming both sites ---------------------------------------
def test_schema_mismatch_names_both_sites():
    def prog(comm):
        if comm.rank == 0:
            comm.send(Request(1, "a"), 1)  # SEND-REQUEST
            return comm.rank
        return comm.recv(0, schema=Reply)  # RECV-REPLY

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    err = only_rank(info.value, 1)
    assert isinstance(err, tc.DesyncError)
    assert err.kinds == (tc.MismatchKind.SCHEMA,)
    assert str(err) == (
        f"recv #0 from rank 0 (tag 0) on WORLD diverged (schema):\n"
        f"  rank 0: send[Request] at test_p2p.py:{line_of('# SEND-REQUEST')}, its 1st call\n"
        f"  rank 1: recv[Reply] at test_p2p.py:{line_of('# RECV-REPLY')}, its 1st call")


def test_both_named_and_names_differ():
    def prog(comm):
        if comm.rank == 0:
            comm.send(1, 1, name="votes")
            comm.send(2, 1, name="sizes")
            return None
        first = comm.recv(0, name="votes")
        try:
            comm.recv(0, name="timeouts")
        except tc.DesyncError as err:
            return first, err.kinds, str(err).splitlines()[0]

    assert run(2, prog, timeout=10)[1] == (
        1, (tc.MismatchKind.CALL,), "recv #1 from rank 0 (tag 0) on WORLD diverged (call site):")


def test_one_side_named_is_no_mismatch():
    def prog(comm):
        if comm.rank == 0:
            comm.send(1, 1, name="votes")
            return None
        return comm.recv(0)

    assert run(2, prog, timeout=10)[1] == 1


def test_step_clocks_that_differ_are_a_mismatch():
    def prog(comm):
        comm.set_step(4 if comm.rank == 0 else 5)
        if comm.rank == 0:
            comm.send(1, 1)
            return None
        try:
            comm.recv(0)
        except tc.DesyncError as err:
            return err.kinds, [g.envelope.step for g in err.groups]

    assert run(2, prog, timeout=10)[1] == ((tc.MismatchKind.STEP,), [4, 5])


def test_a_receive_posted_ahead_for_the_next_iteration_says_its_step():
    # Double buffering: the receiver posts next iteration's receive before this one ends. It
    # carries the clock as it was when posted, so it names the step it is for.
    def prog(comm, ahead):
        got = []
        comm.set_step(0)
        request = comm.irecv(0, 5) if comm.rank == 1 else None
        for it in range(3):
            comm.set_step(it)
            if comm.rank == 0:
                comm.send(it * 10, 1, 5)
                continue
            got.append(request.wait())
            if it < 2:
                request = comm.irecv(0, 5, step=it + 1) if ahead else comm.irecv(0, 5)
        return got

    assert run(2, prog, True, timeout=10)[1] == [0, 10, 20]
    with pytest.raises(BaseExceptionGroup) as info:
        run(2, prog, False, timeout=10)
    (err,) = info.value.exceptions
    assert isinstance(err, tc.DesyncError) and err.kinds == (tc.MismatchKind.STEP,)
    assert str(err).splitlines()[-1] == (
        "  a side skipped or repeated an iteration, or the receive was posted ahead of it: a "
        "receive carries the step clock as it was when posted, so one posted for a later "
        "iteration (irecv of the next step's message) passes that step: irecv(..., "
        "step=it + 1)")


def test_a_receive_that_says_its_step_is_not_told_it_may_have_been_posted_ahead():
    # step= on the receive is the user's word for which iteration it belongs to: the hint
    # names both steps rather than suggesting what the receive already does.
    def prog(comm):
        comm.set_step(3)
        if comm.rank == 0:
            comm.send("late", 1, 5)
            return None
        return str(pytest.raises(tc.DesyncError, comm.recv, 0, 5, step=4).value)

    assert run(2, prog, timeout=10)[1].splitlines()[-1] == (
        "  a side skipped or repeated an iteration: this receive is for step 4 (its step=), "
        "the message was sent at step 3")


def test_a_send_is_not_held_up_by_a_receive_waiting_on_another_thread():
    # free()'s message count took the mailbox's lock, which a blocking receive holds: a send
    # from another thread waited for that receive, which waited for the reply to the send.
    def prog(comm):
        if comm.rank == 1:
            comm.send(comm.recv(0, 0, schema=int) + 1, 0, 1)
            return None
        got = []
        waiting = threading.Thread(target=lambda: got.append(comm.recv(1, 1, schema=int)))
        waiting.start()
        time.sleep(0.2)  # the receive is waiting
        comm.send(5, 1, 0)
        waiting.join()
        return got

    assert run(2, prog, timeout=5)[0] == [6]


def test_only_the_last_free_of_a_shared_channel_decides_whether_its_backend_is_kept():
    # Two TypedComms on one channel: the first's free, while a message of the second was still
    # in flight, kept the backend for good, though every message was taken by the last free.
    from typedcoll._comm import TypedComm, _created

    def prog(first):
        channel = first._p.channel
        second = TypedComm.__new__(TypedComm)
        second._p = _created(channel, None, "second")
        freed = []
        close = channel.transport.free
        channel.transport.free = lambda settled=True: (freed.append(settled), close(settled))
        if first.rank == 0:
            second.send(1, 1)
        first.free()
        if first.rank == 1:
            assert second.recv(0, schema=int) == 1
        second.free()
        return freed

    assert run(2, prog, timeout=10) == [[True], [True]]


def test_a_step_that_is_not_an_int_is_refused_on_the_calling_rank():
    def prog(comm):
        return str(pytest.raises(tc.EncodeError, comm.irecv, 0, step="1").value)

    assert run(1, prog)[0] == ("recv on WORLD: refused: TypeError: expected step to be None or "
                               "a 64-bit int, got '1'")


def test_a_send_with_a_bad_step_fails_on_its_receiver_too():
    # The receiver is told (PeerError), not left waiting for a message that never comes.
    def prog(comm):
        if comm.rank == 0:
            return type(pytest.raises(tc.EncodeError, comm.send, 1, 1, step="1").value)
        error = pytest.raises(tc.PeerError, comm.recv, 0).value
        return error.ranks, "expected step to be None or a 64-bit int, got '1'" in str(error)

    assert run(2, prog, timeout=10) == [tc.EncodeError, ((0,), True)]

    # sendrecv too: its receive is not posted, its send tells the peer.
    def pair(comm):
        if comm.rank == 0:
            return type(pytest.raises(tc.EncodeError, comm.sendrecv, 1, 1, 1, step="1").value)
        return type(pytest.raises(tc.PeerError, comm.sendrecv, 2, 0, 0).value)

    assert run(2, pair, timeout=10) == [tc.EncodeError, tc.PeerError]


def _after_a_timed_out_recv(source, tag):
    """Rank 1's receive times out, then rank 0 sends "late" and "next": the second receive's
    DesyncError kinds and last line, and what a third receive returns."""
    release = threading.Event()

    def prog(comm):
        if comm.rank == 0:
            release.wait(10)
            comm.send("late", 1)
            comm.send("next", 1)
            return None
        with pytest.raises(tc.CollectiveTimeout):
            comm.recv(source, tag)  # TIMED-OUT
        release.set()
        try:
            comm.recv(source, tag)
        except tc.DesyncError as err:
            return err.kinds, str(err).splitlines()[-1], comm.recv(source, tag)

    return run(2, prog, timeout=0.5)[1]


def test_late_message_of_a_timed_out_recv_is_not_the_next_ones():
    kinds, hint, after = _after_a_timed_out_recv(0, 0)
    assert kinds == (tc.MismatchKind.SEQUENCE,)
    assert hint == ("  expected message #1 from rank 0, got #0 (a receive that timed out, or a "
                    "send or receive skipped on one side)")
    assert after == "next"


@pytest.mark.parametrize("source, tag", [(None, None), (None, 0), (0, None)])
def test_late_message_of_a_timed_out_wildcard_recv_is_not_the_next_ones(source, tag):
    # A wildcard receive cannot know which message it missed: the first that fits it counts as
    # its late one, as the explicit receive's count does above, and the next receive raises.
    kinds, hint, after = _after_a_timed_out_recv(source, tag)
    assert kinds == (tc.MismatchKind.SEQUENCE,)
    peer = "any rank" if source is None else f"rank {source}"
    of_tag = "any tag" if tag is None else f"tag {tag}"
    assert hint == (
        f"  the receive from {peer} ({of_tag}) at test_p2p.py:{line_of('# TIMED-OUT')} "
        f"timed out before this message arrived, and may have been waiting for it: a receive "
        f"from any rank or of any tag that times out counts against the first message that "
        f"fits it, which is not taken for a later receive (to wait again without giving one "
        f"up, poll irecv()'s test())")
    assert after == "next"


def test_a_timed_out_wildcard_recv_owes_nothing_to_receives_posted_before_it_or_unlike_it():
    release = threading.Event()

    def prog(comm):
        if comm.rank == 0:
            release.wait(10)
            comm.send("first", 1, tag=1)
            comm.send("tagged 2", 1, tag=2)
            comm.send("second", 1, tag=1)
            return None
        early = comm.irecv(0, 1)  # posted before the receive that times out
        with pytest.raises(tc.CollectiveTimeout):
            comm.recv(None, 2)  # times out: it owes the first message of tag 2, not of tag 1
        release.set()
        with pytest.raises(tc.DesyncError):
            comm.recv(0, 2)
        return early.wait(), comm.recv(0, 1)

    assert run(2, prog, timeout=0.5)[1] == ("first", "second")


# --- errors --------------------------------------------------------------------------------------
def test_unencodable_value_raises_on_sender_and_peer_error_on_receiver():
    def prog(comm):
        if comm.rank == 0:
            comm.send(object(), 1)  # BAD-SEND
        return comm.recv(0)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    site = f"test_p2p.py:{line_of('# BAD-SEND')}"
    sender, receiver = only_rank(info.value, 0), only_rank(info.value, 1)
    # It read "expected object, got object": the value's own type as what was expected.
    detail = ("NotImplementedError: expected a value msgspec can encode (a Struct, a dataclass, "
              "builtins, numpy arrays), got object: msgspec cannot encode it (Encoding objects "
              "of type object is unsupported); make it a msgspec Struct or a dataclass, or "
              "convert it to one of those types before the call")
    assert isinstance(sender, tc.EncodeError) and isinstance(receiver, tc.PeerError)
    assert str(sender) == (f"send #0 to rank 1 (tag 0) on WORLD: rank 0 could not send its "
                           f"send[object] at {site}: {detail}")
    assert str(receiver) == (f"recv #0 from rank 0 (tag 0) on WORLD: rank 0 failed its "
                             f"send[object] at {site}: {detail}")
    assert receiver.ranks == (0,)


def test_value_not_matching_its_schema_is_flagged():
    def prog(comm):
        if comm.rank == 0:
            with pytest.raises(tc.EncodeError, match=r"expected Request, got dict"):
                comm.send({"id": 1}, 1, schema=Request)
            return None
        with pytest.raises(tc.PeerError, match=r"failed its send\[Request\]"):
            comm.recv(0)
        return "ok"

    assert run(2, prog, timeout=10)[1] == "ok"


def test_recv_timeout_names_the_absent_sender():
    def prog(comm):
        if comm.rank == 1:
            comm.recv(0, 4, schema=int)  # WAITS

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=0.3)
    err = only_rank(info.value, 1)
    assert isinstance(err, tc.CollectiveTimeout)
    assert err.missing == (0,)
    assert str(err) == (f"recv #0 from rank 0 (tag 4) on WORLD: recv[int] at "
                        f"test_p2p.py:{line_of('# WAITS')} did not complete within 0.3 s: no "
                        f"message from rank 0 arrived")


def test_communicator_stays_usable_after_a_recv_timeout():
    timed_out = threading.Event()

    def prog(comm):
        if comm.rank == 1:
            with pytest.raises(tc.CollectiveTimeout):
                comm.recv(0, 9)
            timed_out.set()
        timed_out.wait(10)
        return comm.allgather(comm.rank)

    assert run(2, prog, timeout=0.3) == [[0, 1], [0, 1]]


@pytest.mark.parametrize("call, message", [
    (lambda c: c.send(1, 2), "send on WORLD: refused: ValueError: expected dest in 0..1, got 2"),
    (lambda c: c.send(1, 0, tag=-1),
     "send on WORLD: refused: ValueError: expected tag to be an int in 0..2147483647, got -1"),
    (lambda c: c.recv(5), "recv on WORLD: refused: ValueError: expected source in 0..1, got 5"),
    (lambda c: c.recv(0, "x"), "recv on WORLD: refused: ValueError: expected tag to be None (any "
                               "tag) or an int in 0..2147483647, got 'x'"),
    (lambda c: c.recv(0, schema=object()), "recv on WORLD: refused: TypeError: expected a schema"),
])
def test_bad_arguments_raise_on_the_calling_rank(call, message):
    def prog(comm):
        if comm.rank == 0:
            with pytest.raises(tc.EncodeError) as info:
                call(comm)
            return str(info.value)

    assert run(2, prog, timeout=5)[0].startswith(message)


def test_freed_communicator_refuses():
    def prog(comm):
        comm.free()
        with pytest.raises(tc.CollectiveError, match=re.escape(
                "send to rank 0 (tag 0) on WORLD: refused: the communicator was freed")):
            comm.send(1, 0)
        return True

    assert run(2, prog, timeout=5) == [True, True]


# --- receivers without a schema find the sender's class by name ----------------------------------
def _rank0_only_module() -> types.ModuleType:
    """A module whose class only rank 0's thread can see (what each rank imported, in one
    process)."""
    module = types.ModuleType("p2p_rank0_only")

    @dataclasses.dataclass
    class Hidden:
        a: int

    Hidden.__module__, Hidden.__qualname__ = module.__name__, "Hidden"

    def __getattr__(name: str):
        if name == "Hidden" and threading.current_thread().name == "rank-0":
            return Hidden
        raise AttributeError(name)

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    module.Hidden_for_rank0 = Hidden  # type: ignore[attr-defined]
    return module


def test_class_the_receiver_cannot_find_is_a_decode_error(monkeypatch):
    module = _rank0_only_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def prog(comm):
        if comm.rank == 0:
            comm.send(module.Hidden_for_rank0(1), 1)
            return None
        with pytest.raises(tc.DecodeError) as info:
            comm.recv(0)
        return str(info.value)

    assert run(2, prog, timeout=5)[1] == (
        "recv #0 from rank 0 (tag 0) on WORLD: expected the class p2p_rank0_only:Hidden, got "
        "no 'Hidden' in module 'p2p_rank0_only' (pass schema=)")


def test_class_of_another_structure_is_a_decode_error(monkeypatch):
    module = types.ModuleType("p2p_versions")

    def make(version: int) -> type:
        fields = [("a", int)] + ([("b", int)] if version == 2 else [])
        cls = dataclasses.make_dataclass("Msg", fields)
        cls.__module__ = module.__name__
        return cls

    old, new = make(1), make(2)
    module.Msg = old  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def prog(comm):
        if comm.rank == 0:
            comm.send(new(1, 2), 1)
            return None
        with pytest.raises(tc.DecodeError, match=r"expected p2p_versions:Msg with the sender's "
                                                 r"structure \(\w{8}\), got a class of another "
                                                 r"structure \(\w{8}\) on this rank; pass schema="):
            comm.recv(0)
        return "ok"

    assert run(2, prog, timeout=5)[1] == "ok"
