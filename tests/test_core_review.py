"""A review of the core's promises, attacked rank by rank.

The promises: no collective returns a result built from another call's data without raising on
every rank; no false alarms; every rank reaches the same verdict in the same call; the C fast path
and the pure-Python steps reach the same verdicts from the same bytes; a communicator stays usable
on every rank alike after an error it reported. Each test names the promise it checks. In-process
ranks (``typedcoll.testing.run``) where MPI is not the point: there the C fast path serves the
steady state when ``timeout=None`` (the in-memory transport has no C engine for deadlines).
Programs that need MPI run under mpiexec from files written here, each bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import msgspec
import numpy as np
import pytest

import typedcoll as tc
from typedcoll._comm import TypedComm, _created
from typedcoll.core import fast
from typedcoll.testing import observe, run

from launch import run_spmd

C_PATH = fast.ENABLED  # False in CI's pure-Python leg
TIMEOUTS = [None, 10.0]  # None: the C fast path serves in-process ranks; 10: the Python steps


def outcomes(n: int, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None,
             limit: float = 60.0) -> List[Any]:
    """Every rank's return value or exception (never a group), in rank order; a run that does
    not end within ``limit`` seconds fails the test instead of hanging it."""
    box: List[Any] = []

    def each(comm: tc.TypedComm, *a: Any) -> Any:
        try:
            return fn(comm, *a)
        except BaseException as exc:  # reported as the rank's outcome
            return exc

    worker = threading.Thread(target=lambda: box.append(run(n, each, *args, timeout=timeout)),
                              daemon=True)
    worker.start()
    worker.join(limit)
    assert box, f"the ranks did not finish within {limit:g} s (a hang)"
    return box[0]  # type: ignore[no-any-return]


def one_desync(results: List[Any]) -> tc.DesyncError:
    """Every rank's outcome is a DesyncError, with one text on every rank: that error."""
    assert all(isinstance(r, tc.DesyncError) for r in results), results
    assert len({str(r) for r in results}) == 1, results
    return results[0]  # type: ignore[no-any-return]


def a_skipped_vote_raises(run_votes: Callable[..., Any], peers_line: str, skippers_line: str,
                          *args: Any, skipper: int = 2, timeout: Optional[float] = None,
                          limit: float = 60.0) -> tc.DesyncError:
    """Two votes identical on the wire from two lines, ``run_votes(comm, *args, skipper)``
    leaving out the first on rank ``skipper`` (None: on none). Without a skipper every rank
    returns ``[True, False]``; with one every rank raises one DesyncError of kind CALL whose
    skipper's row names ``skippers_line`` and its peers' row ``peers_line``, neither the other's
    (``file.py:N`` as the text names it). The error, for a test's own further checks."""
    assert outcomes(3, run_votes, *args, None, timeout=timeout, limit=limit) == [[True, False]] * 3
    error = one_desync(outcomes(3, run_votes, *args, skipper, timeout=timeout, limit=limit))
    assert list(error.kinds) == [tc.MismatchKind.CALL], error
    rows = str(error).splitlines()[1:3]
    skippers = [row for row in rows if row.lstrip().startswith(f"rank {skipper}:")]
    assert len(skippers) == 1, error
    peers = [row for row in rows if row is not skippers[0]]
    named_by_peers, named_by_skipper = ({word.rstrip(",") for word in row.split()}
                                        for row in (peers[0], skippers[0]))
    assert peers_line in named_by_peers - named_by_skipper, error
    assert skippers_line in named_by_skipper - named_by_peers, error
    return error


def second_comm(comm: tc.TypedComm) -> tc.TypedComm:
    """Another TypedComm on the same private channel (as TypedComm(parent) twice over MPI)."""
    other = TypedComm.__new__(TypedComm)
    other._p = _created(comm._p.channel, comm.timeout, None)
    return other


def slot_state(comm: tc.TypedComm) -> tuple:
    """What must be equal on every rank after any verdict: numbering and the slot rule."""
    p = comm._p
    return (p.seq, p.slot, p.policy.size, p.policy.count, p.policy.window_max,
            p.channel.busy[0], p.channel.poison, p.channel.broken is not None)


def spmd_json(tmp_path: Path, code: str, nranks: int, *, timeout: float = 60.0,
              rank_env: Optional[List[dict]] = None, args: tuple = ()) -> List[Any]:
    """Run ``code`` under mpiexec; each rank writes ``OUT/<rank>.json``; their contents."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    result = run_spmd(code, nranks, timeout=timeout, tmp_path=tmp_path, abort_on_error=False,
                      args=(str(out),) + tuple(args), rank_env=rank_env)
    assert not result.timed_out, f"hung: {result!r}"
    files = sorted(out.glob("*.json"), key=lambda f: int(f.stem))
    assert len(files) == nranks, f"not every rank reported: {result!r}"
    return [json.loads(f.read_text()) for f in files]


# ==============================================================================================
# Findings: each of these tests failed on the code it was written against.
# ==============================================================================================

# --- 1. the slot rule after a caught desync between two TypedComms on one channel ---------------
def desync_between_comms_then_continue(comm: tc.TypedComm) -> Any:
    other = second_comm(comm)
    try:  # rank 0 on one communicator, the others on the second: a desync, caught
        (comm if comm.rank == 0 else other).allgather("x" * 1000)
    except tc.DesyncError:
        pass
    return [comm.allgather(comm.rank) for _ in range(3)], slot_state(comm), slot_state(other)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_caught_desync_between_two_comms_leaves_both_usable(timeout):
    """No false alarm after a reported desync: the verdict gives back the sequence number and
    occurrence that each rank spent on the wrong communicator, so that both stay aligned; the
    slot-size rule observed that same exchange on the wrong communicator too, and must be
    aligned as well. Now every later call on the first communicator raises DesyncError (slot
    sizes 2048 against 128) on every rank."""
    got = outcomes(2, desync_between_comms_then_continue, timeout=timeout)
    for r, out in enumerate(got):
        assert not isinstance(out, BaseException), f"rank {r}: {out!r}"
        assert out[0] == [[0, 1]] * 3
    assert got[0][1:] == got[1][1:], "the ranks' slot rules diverged"


MPI_DESYNC_BETWEEN_COMMS = """
import json, os, sys, time
from mpi4py import MPI
import typedcoll as tc
out, rank = sys.argv[1], MPI.COMM_WORLD.rank
first = tc.TypedComm(MPI.COMM_WORLD, timeout=3.0)
second = tc.TypedComm(MPI.COMM_WORLD, timeout=3.0)
try:
    (first if rank == 0 else second).allgather("x" * 1000)
    seen = "returned"
except tc.DesyncError:
    seen = "DesyncError"
try:
    after = ["returned", first.allgather(rank)]
except Exception as exc:
    after = [f"{type(exc).__module__}.{type(exc).__name__}", str(exc).splitlines()[0]]
json.dump([seen, after], open(f"{out}/{rank}.json", "w"))
time.sleep(0.2)
os._exit(0)  # an operation may still be pending after a timeout: MPI_Finalize could wait
"""


def test_mpi_a_caught_desync_between_two_comms_leaves_both_usable(tmp_path):
    """Over MPI the diverged slot sizes are worse than a false alarm: the exchange of the next
    call on the first communicator fails with a raw MPI truncation error on one rank while its
    peer waits for the cold path until its timeout (a hang without one): different verdicts,
    and an exception that is not a typedcoll error."""
    got = spmd_json(tmp_path, MPI_DESYNC_BETWEEN_COMMS, 2)
    assert [g[0] for g in got] == ["DesyncError"] * 2
    assert [g[1] for g in got] == [["returned", [0, 1]]] * 2, got


MPI_FORMS = """
import json, os, sys, time
from mpi4py import MPI
import typedcoll as tc
out, rank = sys.argv[1], MPI.COMM_WORLD.rank
report = {}
untimed = tc.TypedComm(MPI.COMM_WORLD)
report["untimed"] = [untimed.allgather(rank) for _ in range(3)] + [
    untimed.bcast(rank, 0, schema=int), untimed.gather(rank, 1)]
timed = tc.TypedComm(MPI.COMM_WORLD, timeout=2.0)
try:  # rank 0 on the timed communicator, its peers on the untimed one
    (timed if rank == 0 else untimed).allgather(rank)
    report["mixed"] = "returned"
except tc.DesyncError:
    report["mixed"] = "DesyncError"
report["after"] = [timed.allgather(rank), untimed.allgather(rank), timed.bcast(7, 0, schema=int)]
if rank == 1:
    time.sleep(4)
try:
    timed.allgather(rank)
    report["late"] = "returned"
except tc.CollectiveTimeout:
    report["late"] = "CollectiveTimeout"
json.dump(report, open(f"{out}/{rank}.json", "w"))
MPI.COMM_WORLD.Barrier()  # the launcher may end the job at the first exit
os._exit(0)  # operations stay pending after a timeout: MPI_Finalize could wait
"""


def test_mpi_timed_and_untimed_communicators_of_one_channel_meet(tmp_path):
    """A timed and an untimed communicator over one parent share a channel: the exchange must
    be one that ranks with and without a deadline both complete (an exchange tried earlier, one
    blocking MPI_Allgather on untimed channels, needed every rank to agree on its form first).
    After an untimed communicator's calls, a timed one is created, one rank calls on it while
    its peers call on the untimed one (DesyncError on every rank, not a hang), and a rank late
    on the timed communicator makes its peers time out (its deadline is kept). Ranks on three
    paths in one job."""
    c_path = {"TYPEDCOLL_PURE_PYTHON": ""}
    paths = [{"TYPEDCOLL_PURE_PYTHON": "1"}, dict(c_path, TYPEDCOLL_DIRECT_MPI="0"), c_path]
    got = spmd_json(tmp_path, MPI_FORMS, 3, timeout=90, rank_env=paths)
    assert [g["untimed"] for g in got] == [
        [[0, 1, 2]] * 3 + [0, [0, 1, 2] if r == 1 else None] for r in range(3)], got
    assert [g["mixed"] for g in got] == ["DesyncError"] * 3, got
    assert [g["after"] for g in got] == [[[0, 1, 2], [0, 1, 2], 7]] * 3, got
    assert [g["late"] for g in got] == ["CollectiveTimeout"] * 3, got


# --- 2. instance numbers after a creation that met another collective ---------------------------
def creation_meets_a_collective(comm: tc.TypedComm) -> Any:
    try:  # rank 0 builds a communicator while rank 1 calls allgather: a desync, caught
        if comm.rank == 0:
            second_comm(comm)
        else:
            comm.allgather(1)
    except tc.DesyncError:
        pass
    made = second_comm(comm)  # now every rank, at the same point
    return made.allgather(comm.rank)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_failed_creation_does_not_break_later_creations(timeout):
    """No false alarm after a reported desync: the failed creation spent an instance number on
    rank 0 only, so every later TypedComm built over that parent, on every rank at the same
    point, raises DesyncError (communicator: WORLD#3 against WORLD#2), forever."""
    got = outcomes(2, creation_meets_a_collective, timeout=timeout)
    assert got == [[0, 1], [0, 1]], got


def test_a_creation_meeting_a_collective_names_a_real_collective():
    """Messages name the collective by its number on the communicator. The rank whose call
    met another rank's creation reads "collective #18446744073709551615 on WORLD": the
    creation's internal number (2**64 - 1) taken from rank 0's envelope as if it were a
    sequence number."""
    def fn(comm: tc.TypedComm) -> Any:
        if comm.rank == 0:
            second_comm(comm)
        else:
            comm.allgather(1)
    got = outcomes(2, fn)
    assert all(isinstance(e, tc.DesyncError) for e in got), got
    for e in got:
        assert str(2 ** 64 - 1) not in str(e).splitlines()[0], str(e)


def test_a_late_creation_is_waited_for_beyond_a_tight_timeout():
    """A creation is the first traffic on a new backend group (gloo connects lazily): one rank
    arriving there later than the communicator's timeout is start-up, not a hang."""
    def fn(comm: tc.TypedComm) -> Any:
        if comm.rank == 1:
            time.sleep(0.6)
        made = second_comm(comm)
        assert made.timeout == 0.2
        return made.allgather(comm.rank)
    got = outcomes(2, fn, timeout=0.2)
    assert got == [[0, 1], [0, 1]], got


# --- 3. allreduce of arrays past the slot: MPI's own reduction --------------------------------
MPI_ALLREDUCE_PAST_THE_SLOT = """
import json, sys
import numpy as np
from mpi4py import MPI
import typedcoll as tc
out, rank = sys.argv[1], MPI.COMM_WORLD.rank
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=20.0)
report = {}
a = np.ones(8)  # 64 bytes of data: past the first slot (128), inline once the slot has grown
if rank == 0:
    a[3] = np.nan
report["nan_first"] = bool(np.isnan(comm.allreduce(a, "max")).any())
report["nan_second"] = bool(np.isnan(comm.allreduce(a, "max")).any())
big = np.ones(1000)
if rank == 0:
    big[7] = np.nan
report["nan_big"] = bool(np.isnan(comm.allreduce(big, "max")).any())
term = [1e16, 1.0, -1e16, 1.0][rank % 4]  # a sum whose value depends on the order
report["sums"] = [float(comm.allreduce(np.full(1000, term))[0]),  # past the slot
                  float(comm.allreduce(np.full(8, term))[0])]  # inline: the slot has grown
def outcome(fn):
    try:
        value = fn()
        return ["returned", str(value.dtype), bool(value.all())]
    except Exception as exc:
        return [f"{type(exc).__module__}.{type(exc).__name__}", str(exc).splitlines()[0][:120]]
report["bool_sum_small"] = outcome(lambda: comm.allreduce(np.ones(8, dtype=bool), "sum"))
report["bool_sum_big"] = outcome(lambda: comm.allreduce(np.ones(8000, dtype=bool), "sum"))
report["float_land_small"] = outcome(lambda: comm.allreduce(np.ones(4), "land"))
report["float_land_big"] = outcome(lambda: comm.allreduce(np.ones(1000), "land"))
json.dump(report, open(f"{out}/{rank}.json", "w"))
"""


def test_mpi_allreduce_past_the_slot_follows_the_inline_rules(tmp_path):
    """Values are combined in rank order, so every rank computes the bitwise same result, with
    the documented NaN rule ("a NaN anywhere makes max/min NaN, whichever rank holds it"),
    whatever the array's size. An array past the slot is reduced by MPI_Iallreduce instead:
    MPI's MAX keeps or drops a NaN by operand order, so ranks of one call get different data
    (NaN on some, none on others) and the same call gives NaN once the slot has grown; MPI
    associates a float sum its own way (0.0 past the slot, 1.0 inline for the same terms). Ops
    MPI does not define for a type (sum of bools, land of floats) raise raw mpi4py or
    TypeError errors past the slot and succeed inline."""
    got = spmd_json(tmp_path, MPI_ALLREDUCE_PAST_THE_SLOT, 4)
    for r, report in enumerate(got):
        assert report["sums"] == [1.0, 1.0], f"rank {r}: {report['sums']} (rank order: 1.0)"
        assert report["nan_second"], f"rank {r}: the inline path must keep the NaN"
        assert report["nan_first"] and report["nan_big"], \
            f"rank {r} lost the NaN held by rank 0 past the slot: {got}"
        assert report["bool_sum_big"] == report["bool_sum_small"] == ["returned", "bool", True]
        assert report["float_land_big"] == report["float_land_small"] == \
            ["returned", "bool", True], report


# --- 4. two threads inside one channel at once (C fast path) -----------------------------------
class Gated(msgspec.Struct):
    """A record whose __post_init__ runs user code that yields the GIL (logging, a lock)."""
    value: int

    def __post_init__(self) -> None:
        gate = _GATES.get(threading.current_thread().name)
        if gate is not None:
            gate()


_GATES: dict = {}


def two_threads_one_gather(comm: tc.TypedComm) -> Any:
    comm.gather(Gated(-1), root=1, name="g")  # every rank: the schema is cached, the C path warm
    if comm.rank == 1:
        time.sleep(0.5)  # rank 0's second thread waits inside its collective meanwhile
        out = []
        for _ in range(2):
            try:
                out.append([g.value for g in comm.gather(Gated(100), root=1, name="g")])
            except tc.CollectiveError as exc:
                out.append(type(exc).__name__)
        return out
    busy = comm._p.channel.busy
    seen = {"overlap": False}
    entered, second_done = threading.Event(), threading.Event()

    def gate() -> None:  # in the first thread's own decode of its value
        entered.set()
        me, end = threading.get_ident(), time.monotonic() + 3
        while time.monotonic() < end and not second_done.is_set():
            if busy[0] not in (0, me):
                seen["overlap"] = True  # another thread is inside, and this one goes on
                return
            time.sleep(0.001)

    _GATES["first"] = gate
    values = [Gated(0), Gated(1)]
    ends: dict = {}

    def call(i: int) -> None:
        try:
            comm.gather(values[i], root=1, name="g")
            ends[i] = "returned"
        except tc.CollectiveError as exc:
            ends[i] = type(exc).__name__
        finally:
            if i == 1:
                second_done.set()

    first = threading.Thread(target=call, args=(0,), name="first")
    first.start()
    entered.wait(5)
    second = threading.Thread(target=call, args=(1,), name="second")
    second.start()
    first.join(10)
    second.join(10)
    _GATES.clear()
    if "ConcurrentCallError" in ends.values():  # one was refused before its exchange: align
        try:
            comm.gather(Gated(2), root=1, name="g")
        except tc.CollectiveError as exc:
            ends["extra"] = type(exc).__name__
    return seen["overlap"], ends


def test_two_threads_are_never_inside_one_channel_at_once():
    """A thread entering a collective while another is inside raises ConcurrentCallError: never
    two exchanges on one channel at once (their messages would pair across threads). The C
    path checks the busy marker first and claims it only after encoding and validating the
    value, which runs user code (a gather validates with __post_init__; the first call at a
    site runs the fingerprint function): a second thread enters in between, both exchange on
    one channel, and no rank raises. The Python steps claim the marker before any user code."""
    got = outcomes(2, two_threads_one_gather)
    assert not any(isinstance(g, BaseException) for g in got), got
    overlap, ends = got[0]
    if overlap:
        assert "ConcurrentCallError" in ends.values(), \
            f"two threads were inside one channel and no rank raised: {got}"


# Set by rank 0 once its second thread collided with the one inside: rank 1 joins only then,
# whatever the load (a fixed sleep let it come first, and the holder's call completed early).
_COLLIDED = threading.Event()


def collision_named(comm: tc.TypedComm) -> Any:
    comm.allgather(0, name="x")  # every rank: the C path warm
    if comm.rank == 1:
        _COLLIDED.wait(10)
        out = []
        for _ in range(2):
            try:
                comm.allgather(1, name="x")
                out.append("returned")
            except tc.CollectiveError as exc:
                out.append(type(exc).__name__)
        return out
    busy = comm._p.channel.busy

    def hold() -> None:
        try:
            comm.allgather(2, name="x")
        except tc.CollectiveError:
            pass

    holder = threading.Thread(target=hold, name="holder")
    holder.start()
    end = time.monotonic() + 5
    while not busy[0] and time.monotonic() < end:
        time.sleep(0.001)
    try:
        comm.allgather(3, name="x")
        text = "no error"
    except tc.ConcurrentCallError as exc:
        text = str(exc)
    _COLLIDED.set()
    holder.join(10)
    try:  # the poisoned next call raises on every rank and keeps them aligned
        comm.allgather(4, name="x")
    except tc.CollectiveError:
        pass
    return text


def test_a_collision_names_the_thread_inside():
    """ConcurrentCallError names both threads. The C path marks the channel busy with the
    thread's id only, leaving the name and site of whichever thread last took the Python steps
    (here the rank's main thread, from the creation exchange): the error names the wrong
    thread as the one inside."""
    _COLLIDED.clear()
    got = outcomes(2, collision_named)
    text = got[0]
    assert isinstance(text, str) and text != "no error", got
    assert "thread holder" in text and "was inside" in text, text


def collision_then_continue(comm: tc.TypedComm) -> Any:
    comm.allgather("w" * 1000)  # a slot large enough that the error texts do not resize it
    comm.allgather(0, name="x")
    busy = comm._p.channel.busy
    if comm.rank == 1:  # no collision on this rank
        _COLLIDED.wait(10)
        for _ in range(2):
            try:
                comm.allgather(1, name="x")
            except tc.CollectiveError:
                pass
    else:
        def hold() -> None:
            try:
                comm.allgather(2, name="x")
            except tc.CollectiveError:
                pass

        holder = threading.Thread(target=hold, name="holder")
        holder.start()
        end = time.monotonic() + 5
        while not busy[0] and time.monotonic() < end:
            time.sleep(0.001)
        try:
            comm.allgather(3, name="x")
        except tc.ConcurrentCallError:
            pass
        _COLLIDED.set()
        holder.join(10)
        try:  # the poisoned call: ConcurrentCallError on every rank
            comm.allgather(4, name="x")
        except tc.CollectiveError:
            pass
    try:
        comm.allgather(5, name="after")
        return "returned"
    except tc.CollectiveError as exc:
        return type(exc).__name__


def test_after_a_collision_every_rank_refuses_the_next_call():
    """After a collision "the channel is now unusable on every rank": every rank refuses its
    next call at once, alike. The verdict marks the channel broken but leaves the C binding of
    the rank that saw no collision in place (only a timeout rebinds it), so that rank's C path
    starts an exchange its peer refused locally: it hangs (the Python steps refuse at once)."""
    _COLLIDED.clear()
    got = outcomes(2, collision_then_continue, limit=8)
    assert got == ["ConcurrentCallError", "ConcurrentCallError"], got


MPI_SECOND_COMM_AFTER_A_TIMEOUT = """
import json, os, sys, time
from mpi4py import MPI
import typedcoll as tc
out, rank = sys.argv[1], MPI.COMM_WORLD.rank
first = tc.TypedComm(MPI.COMM_WORLD, timeout=1.0)
second = tc.TypedComm(MPI.COMM_WORLD, timeout=1.0)
second.allgather(0)
first.allgather(0)
report = []
if rank == 0:  # rank 1 never joins: a timeout, then a call on the other communicator
    for comm in (first, second):
        try:
            comm.allgather(1)
            report.append("returned")
        except Exception as exc:
            report.append([f"{type(exc).__module__}.{type(exc).__name__}",
                           str(exc).splitlines()[0][:200]])
json.dump(report, open(f"{out}/{rank}.json", "w"))
time.sleep(0.2 if rank == 0 else 5.0)  # rank 1 outlives rank 0's report
os._exit(0)  # a timed-out operation is still pending: MPI_Finalize could wait for it
"""


def test_mpi_a_second_comm_on_a_timed_out_channel_refuses_with_a_typedcoll_error(tmp_path):
    """After a CollectiveTimeout every TypedComm on the channel refuses with CollectiveTimeout
    ("the communicator is unusable since ..."), as the Python steps do. Only the communicator
    that timed out rebinds its C path; another one on the same channel enters the C engine,
    which raises a raw RuntimeError ("typedcoll: the exchange is unusable after a timeout")."""
    got = spmd_json(tmp_path, MPI_SECOND_COMM_AFTER_A_TIMEOUT, 2)
    first, second = got[0]
    assert first[0] == "typedcoll.CollectiveTimeout", got
    assert second[0] == "typedcoll.CollectiveTimeout", got
    assert "refused: the communicator is unusable since" in second[1], got


# --- 5. an interrupt while decoding, on the C path -------------------------------------------
class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception, so it propagates as is."""


class Sensitive(msgspec.Struct):
    value: int
    pad: str = ""

    def __post_init__(self) -> None:
        if self.value == 42 and threading.current_thread().name == "rank-1":
            raise Interrupt("interrupted while decoding")


def interrupted_then_continue(comm: tc.TypedComm) -> Any:
    comm.allgather("g" * 600)  # the slot grows to 1024 on every rank
    comm.allgather(Sensitive(1))  # the schema cached, the C path bound again
    comm.allgather(0)
    try:
        comm.allgather(Sensitive(42 if comm.rank == 0 else comm.rank, pad="p" * 300))
        ended = "returned"
    except (Interrupt, tc.PeerError) as exc:
        ended = type(exc).__name__  # an application that catches the interrupt and goes on
    state = slot_state(comm)
    for i in range(300):  # past the 256-call shrink window
        comm.allgather(i)
    return ended, state


def test_an_interrupt_while_decoding_keeps_the_slot_rule_aligned():
    """A BaseException from user code while decoding propagates on the rank that met it; the
    communicator must stay aligned for the ranks that go on. The Python steps feed the slot
    rule before decoding; the C path feeds it after decoding, so the interrupted rank skips
    one observation, shrinks its slot one call later than its peers, and that call raises
    DesyncError on every rank (a false alarm; over MPI a truncated message). The hook reads
    rank-local state, so its peer settles the decoding with it and raises PeerError naming it
    instead of returning."""
    got = outcomes(2, interrupted_then_continue)
    assert not any(isinstance(g, BaseException) for g in got), got
    assert [g[0] for g in got] == ["PeerError", "Interrupt"], got
    assert got[0][1] == got[1][1], got


# --- 6. reduce_scatter of an op that does not apply ------------------------------------------
@pytest.mark.parametrize("values", [[1.5, 2.5], [np.ones(2), np.ones(2)]],
                         ids=["floats", "float arrays"])
def test_reduce_scatter_of_a_bitwise_op_on_floats_raises_typedcoll_errors(values):
    """Every exception a user sees is a typedcoll error, on every rank in the same call:
    allreduce checks that the op applies to the operands before the exchange (EncodeError);
    reduce_scatter does not, and every rank raises a raw TypeError from the reduction."""
    got = outcomes(2, lambda comm: comm.reduce_scatter(values, "band"), timeout=10.0)
    for r, out in enumerate(got):
        assert isinstance(out, tc.EncodeError), f"rank {r}: {out!r}"
        assert "expected integers or bools for op 'band'" in str(out)


# ==============================================================================================
# What held: strong tests that pass.
# ==============================================================================================
MPI_MISMATCHED_SHAPES = """
import json, random, sys
import numpy as np
from mpi4py import MPI
import typedcoll as tc
out, timeout = sys.argv[1], None if sys.argv[2] == "none" else float(sys.argv[2])
rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=timeout)
OPS = ["allgather", "gather", "bcast", "barrier", "allreduce", "reduce", "scatter", "alltoall",
       "arrays"]
def call(op, big):
    v = "x" * 3000 if big else rank  # past the largest slot on the ranks that send it
    if op == "allgather": return comm.allgather(v, name="k")
    if op == "gather": return comm.gather(v, root=size - 1, name="k")
    if op == "bcast": return comm.bcast(v, root=0, schema=str if big else int, name="k")
    if op == "barrier": return comm.barrier(name="k")
    if op == "allreduce": return comm.allreduce(rank, name="k")
    if op == "reduce": return comm.reduce(rank, root=1 % size, name="k")
    if op == "scatter":
        return comm.scatter([v] * size if rank == 0 else None, root=0,
                            schema=str if big else int, name="k")
    if op == "alltoall": return comm.alltoall([v] * size, name="k")
    return comm.allreduce(np.ones(1000 if big else 2), name="k")
rng = random.Random(size)
report = []
for case in range(24):
    usual, odd = rng.sample(OPS, 2)
    who, big = rng.randrange(size), rng.randrange(size) if rng.random() < 0.5 else -1
    try:
        call(odd if rank == who else usual, rank == big)
        report.append("returned")
    except tc.CollectiveError as exc:
        report.append(type(exc).__name__)
    except Exception as exc:
        report.append(f"raw {type(exc).__name__}")
    try:
        report.append("usable" if comm.allgather(rank) == list(range(size)) else "wrong data")
    except Exception as exc:
        report.append(f"after: {type(exc).__name__}")
json.dump(report, open(f"{out}/{rank}.json", "w"))
"""


@pytest.mark.parametrize("nranks,timeout", [(3, "none"), (5, "10"), (6, "none"), (7, "10")])
def test_mpi_exchanges_of_different_shapes_meet_and_disagree(tmp_path, nranks, timeout):
    """One rank in an op whose exchange has the other shape (GATHER against REDUCE), at sizes
    that are not powers of two, some payloads past the largest slot, ranks on three paths in one
    job (pure Python, the C steady state over the Python exchange, the C engine): every rank
    raises DesyncError in the same call and the communicator is usable afterwards."""
    c_path = {"TYPEDCOLL_PURE_PYTHON": ""}  # whatever leg CI runs this in
    paths = [{"TYPEDCOLL_PURE_PYTHON": "1"}, dict(c_path, TYPEDCOLL_DIRECT_MPI="0")] + \
        [c_path] * (nranks - 2)
    got = spmd_json(tmp_path, MPI_MISMATCHED_SHAPES, nranks, timeout=90, rank_env=paths,
                    args=(timeout,))
    assert all(g == got[0] for g in got), got
    assert got[0] == ["DesyncError", "usable"] * 24


def cold_paths(comm: tc.TypedComm, case: str) -> Any:
    r = comm.rank
    try:
        if case == "several fail":
            comm.allgather(object() if r % 2 else r)
        elif case == "long error text":
            comm.allgather(np.zeros(3), schema="s" * 300 if r == 0 else None)
        elif case == "bad name":
            comm.allgather(r, name="n" * 300 if r == 1 else "ok")
        elif case == "desync and failure":
            if r == 0:
                comm.allgather(object())
            elif r == 1:
                comm.bcast(1)
            else:
                comm.allgather(r)
        outcome = "returned"
    except tc.CollectiveError as exc:
        outcome = type(exc).__name__
    after = [comm.allgather("y" * k) for k in (0, 100, 200)]
    return outcome, after, slot_state(comm)


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("case", ["several fail", "long error text", "bad name",
                                  "desync and failure"])
def test_cold_paths_reach_one_verdict_and_leave_one_state(case, n, timeout):
    """Failures on several ranks, an error text past the slot, a bad name, a desync and a
    failure in the same call: the failed ranks raise EncodeError, the others PeerError (or all
    DesyncError), and afterwards every rank's numbering and slot rule are the same."""
    got = outcomes(n, cold_paths, case, timeout=timeout)
    kinds = {o[0] for o in got}
    assert kinds in ({"EncodeError", "PeerError"}, {"EncodeError"}, {"DesyncError"}), got
    assert len({repr(o[1:]) for o in got}) == 1, got


def split_and_dup(comm: tc.TypedComm) -> Any:
    r = comm.rank
    sub = comm.split(None if r % 2 else 0, key=-r)
    mine = None
    if sub is not None:
        mine = (sub.rank, sub.allgather(r), sub.bcast(r if sub.rank == 0 else None, 0,
                                                      schema=int))
        sub.free()
    twin = comm.dup()
    seen: dict = {}
    def use_the_dup() -> None:
        try:
            seen["dup"] = [twin.allgather((r, i)) for i in range(100)]
        except tc.CollectiveError as exc:
            seen["dup"] = exc

    worker = threading.Thread(target=use_the_dup)
    worker.start()
    seen["parent"] = [comm.allgather(r * 1000 + i) for i in range(100)]
    worker.join(30)
    twin.free()
    ok = (seen.get("dup") == [[(q, i) for q in range(comm.size)] for i in range(100)]
          and seen["parent"] == [[q * 1000 + i for q in range(comm.size)] for i in range(100)])
    return mine, ok


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_split_with_none_and_a_dup_used_from_another_thread(timeout):
    """Ranks without a color get None; the rest keep key order; a dup serves another thread
    while the parent serves this one, each with its own data."""
    got = outcomes(4, split_and_dup, timeout=timeout)
    assert got == [((1, [2, 0], 2), True), (None, True), ((0, [2, 0], 2), True), (None, True)]


def mixed_paths_across_the_shrink_window(comm: tc.TypedComm) -> Any:
    rng = random.Random(comm.rank)  # each rank picks its own path per call
    comm.allgather("g" * 600)  # the slot grows to 1024 on every rank
    for k in range(600):  # two shrink windows; one payload past the slot on the way
        step = np.int64(k) if rng.random() < 0.5 else k  # a numpy step takes the Python steps
        value = "b" * (700 if k == 100 else 10)
        assert comm.allgather(value, step=step) == [value] * comm.size
    return slot_state(comm)


def test_ranks_on_different_paths_apply_one_slot_rule():
    """Per call, some ranks on the C path and some on the Python steps, across growth and two
    256-call shrink windows: no false alarm, and the same slot rule state on every rank."""
    got = outcomes(3, mixed_paths_across_the_shrink_window)
    assert not any(isinstance(g, BaseException) for g in got), got
    assert got[0] == got[1] == got[2] and got[0][2] == 128, got


class Announced(msgspec.Struct):
    x: int


def wild_receivers(comm: tc.TypedComm) -> Any:
    r = comm.rank
    comm.bcast(Announced(0) if r == 0 else None, root=0, schema=Announced)  # schema cached
    got = []
    for k in range(3):  # root and rank 1 on the C path, rank 2 names no schema
        got.append(comm.bcast(Announced(k) if r == 0 else None, root=0,
                              schema=Announced if r < 2 else None))
    return got, slot_state(comm)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_bcast_to_receivers_without_a_schema_settles_alike(timeout):
    """A bcast whose root and one receiver take the C path while another receiver names no
    schema: the C ranks hand the call to the Python steps, every rank joins the settle
    exchange, all return the root's value and keep one state."""
    got = outcomes(3, wild_receivers, timeout=timeout)
    assert got[0] == got[1] == got[2], got
    assert got[0][0] == [Announced(0), Announced(1), Announced(2)]


def big_endian(values: Any, dtype: str) -> np.ndarray:
    return np.asarray(values).astype(dtype)  # arithmetic on such arrays gives native order


def arrays_everywhere(comm: tc.TypedComm, count: int) -> Any:
    r, n = comm.rank, comm.size
    a = big_endian(np.arange(count) + r, ">i4")
    return {
        "allgather": comm.allgather(a),
        "gather": comm.gather(a, root=n - 1),
        "bcast": comm.bcast(a if r == 0 else None, root=0, schema=np.ndarray),
        "scatter": comm.scatter([big_endian(np.arange(count) + k, ">f8") for k in range(n)]
                                if r == 0 else None, root=0, schema=np.ndarray),
        "alltoall": comm.alltoall([big_endian(np.arange(count) + 10 * r + k, ">i2")
                                   for k in range(n)]),
        "allreduce": comm.allreduce(a),
        "reduce": comm.reduce(a, root=1),
        "reduce_scatter": comm.reduce_scatter([a] * n),
        "land": comm.allreduce(np.array([True, r == 0] * (count // 2 + 1)), "land"),
        "scalar": comm.allreduce(np.float32(r + 0.5), "max"),
    }


def same(x: Any, values: Any, dtype: str) -> bool:
    return bool(np.array_equal(x, values)) and x.dtype.str == dtype


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("count", [3, 2000], ids=["inline", "past the slot"])
def test_arrays_of_any_byte_order_in_every_op(count, timeout):
    """Big-endian arrays inline and past the slot, numpy scalars and logical ops on bools: the
    values and byte order every op returns, on every rank."""
    n = 3
    got = outcomes(n, arrays_everywhere, count, timeout=timeout)
    rows = [np.arange(count) + k for k in range(n)]
    for r, out in enumerate(got):
        assert not isinstance(out, BaseException), f"rank {r}: {out!r}"
        assert all(same(x, y, ">i4") for x, y in zip(out["allgather"], rows))
        assert r != n - 1 or all(same(x, y, ">i4") for x, y in zip(out["gather"], rows))
        assert same(out["bcast"], rows[0], ">i4")
        assert same(out["scatter"], np.arange(count) + r, ">f8")
        assert all(same(x, np.arange(count) + 10 * k + r, ">i2")
                   for k, x in enumerate(out["alltoall"]))
        assert same(out["allreduce"], sum(rows), ">i4")
        assert r != 1 or same(out["reduce"], sum(rows), ">i4")
        assert same(out["reduce_scatter"], sum(rows), ">i4")
        assert out["land"].dtype == bool and out["land"][0] and not out["land"][1]
        assert out["scalar"] == np.float32(n - 0.5) and type(out["scalar"]) is np.float32


def test_the_c_path_serves_in_process_ranks_without_a_timeout():
    """The findings above that name the C path need it loaded in the C leg."""
    if not os.environ.get("TYPEDCOLL_PURE_PYTHON"):
        assert C_PATH, "the C extension is not loaded: the C-path findings are not exercised"


# --- reduce of Python numbers: the C path's gather to the root, and the Python steps ------------
REDUCE_OPS = ["sum", "prod", "max", "min", "land", "lor", "lxor", "band", "bor", "bxor"]


WARM_UP = 3  # collectives before the checked ones: the first call of a type fills caches


def reduce_everywhere(comm: tc.TypedComm) -> Any:
    r, n = comm.rank, comm.size
    comm.reduce(0, "sum", 0)
    comm.reduce(0.0, "sum", 0)
    comm.barrier()
    out = {}
    for op in REDUCE_OPS:
        for root in range(n):
            out[op, "int", root] = comm.reduce(3 * r - 4, op, root)
            if op not in ("band", "bor", "bxor"):
                out[op, "float", root] = comm.reduce(r * 0.5 - 0.25, op, root)
        out[op, "int", None] = comm.allreduce(3 * r - 4, op)  # None: every rank gets it
        if op not in ("band", "bor", "bxor"):
            out[op, "float", None] = comm.allreduce(r * 0.5 - 0.25, op)
    return out


def reduced(values: List[Any], op: str) -> Any:
    import functools
    import operator
    combine = {"sum": operator.add, "prod": operator.mul, "max": max, "min": min,
               "land": lambda a, b: bool(a) and bool(b), "lor": lambda a, b: bool(a) or bool(b),
               "lxor": lambda a, b: bool(a) != bool(b), "band": operator.and_,
               "bor": operator.or_, "bxor": operator.xor}[op]
    acc = functools.reduce(combine, values)
    return bool(acc) if op in ("land", "lor", "lxor") else acc


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_reductions_of_numbers_give_the_rank_order_result(timeout, monkeypatch):
    """Every op and root, ints and floats: the root of a reduce gets the rank-order
    combination, every other rank None, and every rank gets it from an allreduce; with
    timeout=None in the C leg the C path serves every one of them once the first call of each
    type has filled the caches."""
    served = []
    original = getattr(fast._speedups, "allreduce", None)  # the C entry TypedComm calls

    @tc.transparent  # the call site stays the caller's
    def spy(p: Any, *args: Any) -> Any:
        seq = p.seq
        out = original(p, *args)
        if seq >= WARM_UP:
            served.append(out.__class__ is list)
        return out
    if original is not None:
        monkeypatch.setattr(fast._speedups, "allreduce", spy)
    n = 3
    got = outcomes(n, reduce_everywhere, timeout=timeout)
    for r, out in enumerate(got):
        assert not isinstance(out, BaseException), f"rank {r}: {out!r}"
        for (op, kind, root), value in out.items():
            values = [3 * k - 4 if kind == "int" else k * 0.5 - 0.25 for k in range(n)]
            want = reduced(values, op) if root is None or r == root else None
            assert value == want and type(value) is type(want), (op, kind, root, r, value)
    if C_PATH and timeout is None:
        assert served and all(served), served


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_bitwise_reduce_of_floats_fails_alike_on_every_rank(timeout):
    got = outcomes(2, lambda comm: comm.reduce(comm.rank + 0.5, "band", 0), timeout=timeout)
    assert all(isinstance(e, tc.CollectiveError) for e in got), got
    assert len({type(e) for e in got}) == 1, got
    assert all("band" in str(e) and "float" in str(e) for e in got), [str(e) for e in got]


# --- scatter and alltoall: parts packed into the exchange, on the C path ------------------------
class Part(msgspec.Struct):
    rank: int
    text: str = ""


PART_SCHEMAS = ((int, lambda i, j: 10 * i + j), (str, lambda i, j: f"{i}->{j}"),
                (Part, lambda i, j: Part(i, "x" * j)))
PARTS_WARM_UP = 2 * len(PART_SCHEMAS)  # one scatter and one alltoall of each schema first


def parts_everywhere(comm: tc.TypedComm) -> Any:
    r, n = comm.rank, comm.size
    out = []
    for schema, make in PART_SCHEMAS:  # the first call of a schema fills caches
        comm.scatter([make(0, j) for j in range(n)] if r == 0 else None, 0, schema=schema)
        comm.alltoall([make(r, j) for j in range(n)])
    for schema, make in PART_SCHEMAS:
        for root in range(n):
            values = [make(root, j) for j in range(n)] if r == root else None
            out.append(comm.scatter(values, root, schema=schema))
        out.append(comm.alltoall([make(r, j) for j in range(n)]))
    out.append(comm.scatter(["y" * 900] * n if r == 0 else None, 0, schema=str))  # overflows
    out.append(comm.alltoall([[r] * 300] * n, schema=list))  # overflows
    return out


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_scatter_and_alltoall_deliver_each_part_and_the_c_path_serves_them(timeout, monkeypatch):
    """Each rank gets its own part, whichever path runs; parts past the slot take the backend's
    scatter and all-to-all. With timeout=None in the C leg, the C path serves every scatter and
    alltoall whose packed parts fit the slot."""
    served: List[Any] = []
    for entry in ("rooted", "allgather"):  # the C entries, whoever calls them
        original = getattr(fast._speedups, entry, None)
        if original is None:
            continue

        def after(seq: int, out: Any, p: Any, *args: Any) -> None:
            if args[4] in ("scatter", "alltoall"):  # the op
                served.append((seq, out.__class__ is list))
        monkeypatch.setattr(fast._speedups, entry,
                            observe(original, after, lambda p, *args: p.seq))
    n = 3
    got = outcomes(n, parts_everywhere, timeout=timeout)
    for r, out in enumerate(got):
        assert not isinstance(out, BaseException), f"rank {r}: {out!r}"
        want = []
        for _, make in PART_SCHEMAS:
            want += [make(root, r) for root in range(n)] + [[make(j, r) for j in range(n)]]
        want += ["y" * 900, [[j] * 300 for j in range(n)]]
        assert out == want, (r, out)
    if C_PATH and timeout is None:  # the calls after the warm-up and before the two that overflow
        fitting = range(PARTS_WARM_UP, PARTS_WARM_UP + len(PART_SCHEMAS) * (n + 1))
        checked = [ok for seq, ok in served if seq in fitting]
        assert len(checked) == n * len(fitting) and all(checked), served


# Set per rank thread by the test below: the communicator a decoded value's __post_init__
# calls a collective on, from inside the collective decoding it, once.
_REENTER: dict = {}


class Reenters(msgspec.Struct):
    x: int

    def __post_init__(self) -> None:
        comm = _REENTER.pop(threading.current_thread().name, None)
        if comm is not None:
            try:
                comm.allgather(0)
            except tc.ConcurrentCallError as exc:
                _REENTER["text"] = str(exc)


@pytest.mark.parametrize("timeout", [None, 10])
def test_a_thread_that_reenters_its_own_collective_is_told_so(timeout):
    # A signal handler or a callback that runs a collective in the middle of one: the same
    # thread twice, not "two threads" with one name.
    _REENTER.clear()

    def body(comm: tc.TypedComm) -> Any:
        mine = Reenters(comm.rank)
        if comm.rank == 0:
            _REENTER[threading.current_thread().name] = comm
        return [r.x for r in comm.allgather(mine)]

    assert outcomes(2, body, timeout=timeout) == [[0, 1]] * 2
    text = _REENTER.pop("text")
    assert "re-entered while it was inside a collective on the same channel" in text, text
    assert text.endswith("a collective run from a signal handler or a callback in the middle "
                         "of another: run it after that one returns"), text
