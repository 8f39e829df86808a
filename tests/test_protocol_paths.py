"""The protocol's three implementations of one wire format: C steady state, Python steady state,
general path. Ranks may take different ones in the same collective (a schema cached on one rank
only, an overflow on one rank, a build without the C extension), so they must interoperate and
agree on every verdict; and the backend calls they issue must match (MPI never pairs a blocking
collective with a nonblocking one).
"""

from __future__ import annotations

import pytest

from launch import run_spmd

PRELUDE = """
import os, sys
from typing import Optional, Tuple
import msgspec
import typedcoll as tc
from typedcoll import _protocol
from mpi4py import MPI

class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int

class IterStats(msgspec.Struct):
    iteration: int
    tokens: int = 0

world = MPI.COMM_WORLD
def report(text):
    print(f"rank {world.rank}: {text}", flush=True)
"""


def test_cached_and_uncached_schema_desync_with_timeout_raises_instead_of_hanging(tmp_path):
    # Field report: rank 0 meets IterStats for the first time (general path, nonblocking exchange
    # under a timeout) while rank 1 repeats a cached schema (fast path): the cold path's envelope
    # exchange must use the same kind of backend call on both.
    code = PRELUDE + """
c = tc.TypedComm(world, timeout=10)
c.allgather((False, 1), schema=Tuple[bool, int])
try:
    if world.rank == 0:
        c.allgather(IterStats(iteration=3))
    else:
        c.allgather((False, 1), schema=Tuple[bool, int])
except tc.DesyncError as exc:
    report(f"{type(exc).__name__} seq={exc.seq} kinds={[k.value for k in exc.kinds]}")
report(f"after {c.allgather(world.rank)}")
"""
    res = run_spmd(code, 2, timeout=60, tmp_path=tmp_path)
    assert not res.timed_out and res.returncode == 0, res
    for rank in (0, 1):
        assert f"rank {rank}: DesyncError seq=1 kinds=['schema']" in res.stdout, res
        assert f"rank {rank}: after [0, 1]" in res.stdout, res


@pytest.mark.parametrize("nranks", [2, 4])
def test_c_and_python_ranks_interoperate(tmp_path, nranks):
    # Odd ranks run the pure-Python fast path, even ranks the C one (where it is built): the
    # results, the desync verdict and the error texts must be the same on all of them.
    code = PRELUDE + """
if world.rank % 2:
    _protocol._fast_allgather = None
    import typedcoll._comm
    typedcoll._comm._fast_allgather = None
c = tc.TypedComm(world)
r = world.rank
for it in range(50):
    got = c.allgather(RankState(r, it, 2 * r), step=it)
    assert got == [RankState(q, it, 2 * q) for q in range(world.size)], got
    idle = c.allgather(None if (r + it) % 3 == 0 else RankState(r, it, 0), schema=Optional[RankState])
    assert [x is None for x in idle] == [(q + it) % 3 == 0 for q in range(world.size)]
big = c.allgather(list(range(100 * (r + 1))))           # overflows the slot on some ranks
assert [len(x) for x in big] == [100 * (q + 1) for q in range(world.size)]
for it in range(3):                                       # back in the steady state after growth
    assert c.allgather(RankState(r, it, 0)) == [RankState(q, it, 0) for q in range(world.size)]
try:
    c.allgather(IterStats(iteration=1) if r == 1 else RankState(r, 0, 0), step=7)
except tc.DesyncError as exc:
    report(str(exc).splitlines()[0])
try:
    c.allgather(RankState("x", 0, 0) if r == 0 else RankState(r, 0, 0))
except tc.CollectiveError as exc:
    report(f"{type(exc).__name__}: {exc}")
report(f"seq {c.seq} {'python' if r % 2 else 'c'}")
"""
    res = run_spmd(code, nranks, timeout=90, tmp_path=tmp_path)
    assert not res.timed_out and res.returncode == 0, res
    seq = 2 * 50 + 1 + 3 + 2
    for rank in range(nranks):
        assert f"rank {rank}: collective #104 on COMM_WORLD diverged (schema):" in res.stdout, res
        assert f"rank {rank}: seq {seq} " in res.stdout, res
    assert ("rank 0: EncodeError: collective #105 on COMM_WORLD: rank 0 could not send its "
            "allgather[RankState] contribution: Expected `int`, got `str` - at `$.rank`") in res.stdout
    assert ("rank 1: DecodeError: collective #105 on COMM_WORLD: payload from rank 0 does not "
            "decode as RankState: Expected `int`, got `str` - at `$.rank`") in res.stdout


def test_ranks_must_agree_on_timeout(tmp_path):
    code = PRELUDE + """
try:
    tc.TypedComm(world, timeout=None if world.rank else 5.0)
except ValueError as exc:
    report(str(exc))
"""
    res = run_spmd(code, 2, timeout=60, tmp_path=tmp_path)
    assert not res.timed_out and res.returncode == 0, res
    for rank in (0, 1):
        assert (f"rank {rank}: COMM_WORLD: expected the same timeout on every rank, got "
                f"rank 0: 5.0, rank 1: None") in res.stdout, res


def test_c_fast_path_is_built_here():
    # CI builds the extension (gcc is on every machine of this project); if it silently failed,
    # the performance claims would not hold, so say so loudly.
    from typedcoll import _protocol
    assert _protocol._fast_allgather is not None


def test_direct_mpi_binding_is_used_here():
    # The C fast path's own MPI_Allgather binding (_speedups.direct) is what keeps a checked
    # allgather near the raw floor; a build or mpi4py where it silently fell back would too.
    from mpi4py import MPI

    import typedcoll as tc
    comm = tc.TypedComm(MPI.COMM_SELF)
    binding = comm._p.transport.direct_allgather
    assert binding is not None and comm._p.fast[10] is binding
    assert comm.allgather(7) == [7]


def test_direct_binding_checks_buffer_sizes():
    # MPI writes one slot per rank into recv: a short buffer must be refused, not overrun.
    from mpi4py import MPI

    from typedcoll import _speedups
    from typedcoll._mpi import direct_allgather
    comm = MPI.COMM_SELF.Dup()
    binding = direct_allgather(comm)
    send, recv = bytearray(b"x" * 128), bytearray(128)
    _speedups.exchange(binding, send, recv)
    assert recv == send
    with pytest.raises(ValueError, match="expected a send slot of 1 to 2\\*\\*31-1 bytes and a "
                                         "receive buffer of 1 slots, got 128 and 256 bytes"):
        _speedups.exchange(binding, send, bytearray(256))
    comm.Free()


def test_replaced_allgather_slots_turns_the_direct_binding_off():
    # Tracing or fault injection that replaces the transport's send method must see every call.
    from mpi4py import MPI

    import typedcoll as tc
    comm = tc.TypedComm(MPI.COMM_SELF)
    transport = comm._p.transport
    seen = []

    def traced(send, recv):
        seen.append(len(send))
        transport.comm.Allgather(send, recv)
    transport.allgather_slots = traced
    comm._p._refresh_fast()
    assert comm._p.fast[10] is None
    comm.allgather(1)
    comm.allgather(2)
    assert seen == [128, 128]


def test_direct_and_mpi4py_exchanges_interoperate(tmp_path):
    # Rank 0 exchanges through the direct binding, rank 1 through mpi4py's comm.Allgather: one
    # MPI collective either way, so results and verdicts must be identical.
    code = PRELUDE + """
if world.rank == 1:
    os.environ["TYPEDCOLL_DIRECT_MPI"] = "0"
c = tc.TypedComm(world)
assert (c._p.transport.direct_allgather is None) == (world.rank == 1)
r = world.rank
for it in range(20):
    assert c.allgather(RankState(r, it, 0), step=it) == [RankState(q, it, 0) for q in range(2)]
try:
    c.allgather(IterStats(iteration=1) if r == 1 else RankState(r, 0, 0))
except tc.DesyncError as exc:
    report(str(exc).splitlines()[0])
report(f"after {c.allgather(r)}")
"""
    res = run_spmd(code, 2, timeout=60, tmp_path=tmp_path)
    assert not res.timed_out and res.returncode == 0, res
    for rank in (0, 1):
        assert f"rank {rank}: collective #20 on COMM_WORLD diverged (schema):" in res.stdout, res
        assert f"rank {rank}: after [0, 1]" in res.stdout, res


def test_direct_binding_meets_a_freed_communicator_as_mpi4py_does(tmp_path):
    # A communicator freed under the TypedComm: the direct binding reads the handle at every call,
    # sees MPI_COMM_NULL and leaves the call to mpi4py (Open MPI itself crashes on a null
    # communicator), so the outcome is mpi4py's own: MPICH raises ERR_COMM.
    code = PRELUDE + """
def outcome(fn):
    try:
        fn()
    except MPI.Exception as exc:
        return f"MPI error class {exc.Get_error_class()}"
    return "no error"
raw = world.Dup()
raw.Free()
expected = outcome(lambda: raw.Allgather(bytearray(128), bytearray(128)))
c = tc.TypedComm(world)
assert c._p.transport.direct_allgather is not None
c.allgather(1)
c.allgather(1)
c._p.transport.comm.Free()
got = outcome(lambda: c.allgather(2))
report(f"same={got == expected} {got} mpich={'MPICH' in MPI.Get_library_version()}")
"""
    res = run_spmd(code, 1, timeout=60, tmp_path=tmp_path)
    assert not res.timed_out and res.returncode == 0, res
    assert "rank 0: same=True " in res.stdout, res
    if "mpich=True" in res.stdout:
        from mpi4py import MPI
        assert f"MPI error class {MPI.ERR_COMM}" in res.stdout, res


def test_pending_deferred_checks_are_verified_before_every_typed_call():
    # The torch device path's deferred envelope checks (``Protocol.deferred``) must be verified
    # at the next typed call of any kind, object collectives included, and a failed one raised
    # there before the collective is issued.
    from mpi4py import MPI

    import typedcoll as tc

    class Deferred:
        def __init__(self, fail_at=None):
            self.calls, self.fail_at = 0, fail_at

        def verify_ready(self, protocol):
            self.calls += 1
            if self.calls == self.fail_at:
                raise tc.DesyncError("collective #0 on self diverged (envelope):", seq=0)

    comm = tc.TypedComm(MPI.COMM_SELF)
    p = comm._p
    p.deferred = Deferred()
    p._refresh_fast()
    assert p.fast is None
    assert comm.allgather(1) == [1] and comm.allgather(2) == [2]
    assert comm.gather(3, root=0) == [3] and comm.bcast(4, root=0) == 4
    assert comm.allreduce(5) == 5
    comm.barrier()
    assert p.deferred.calls == 6 and comm.seq == 6
    p.deferred = Deferred(fail_at=1)
    with pytest.raises(tc.DesyncError, match="diverged"):
        comm.allgather(6)
    assert comm.seq == 6  # not issued
    p.deferred = None
    p._refresh_fast()
    assert p.fast is not None and comm.allgather(7) == [7]


@pytest.mark.parametrize("nranks", [2, 4])
def test_gather_bcast_barrier_allreduce_steady_state_interoperates(tmp_path, nranks):
    # gather, bcast, barrier and allreduce of numbers have a C steady state too: even ranks run
    # it, odd ranks the general Python path, and results, overflow phases and verdicts must be
    # the same everywhere.
    code = PRELUDE + """
import typedcoll._comm as ops
from typedcoll import _protocol
if world.rank % 2:
    ops._fast_collective = None
general = []
phase1 = _protocol.Protocol.phase1
def counting_phase1(self, op, *args, **kwargs):
    general.append(op)
    return phase1(self, op, *args, **kwargs)
_protocol.Protocol.phase1 = counting_phase1
c = tc.TypedComm(world)
r, n = world.rank, world.size
for it in range(30):
    if it == 1:
        warm = len(general)  # the first round resolves each schema on the general path
    assert c.gather(RankState(r, it, 0), root=it % n, step=it) == (
        [RankState(q, it, 0) for q in range(n)] if r == it % n else None)
    got = c.bcast(RankState(r, it, 1) if r == it % n else None, root=it % n, schema=RankState)
    assert got == RankState(it % n, it, 1), got
    assert c.bcast((True, it) if r == 0 else None, schema=Tuple[bool, int]) == (True, it)
    assert c.allreduce(r + it) == sum(q + it for q in range(n))
    assert c.allreduce(float(r), "max") == float(n - 1)
    c.barrier()
if r % 2 == 0:
    report(f"general path calls after warm-up: {len(general) - warm}")
big = c.gather(list(range(100 * (r + 1))), root=0)          # some ranks overflow the slot
assert big is None or [len(x) for x in big] == [100 * (q + 1) for q in range(n)]
assert c.bcast(list(range(2000)) if r == 1 else None, root=1, schema=list) == list(range(2000))
try:
    c.bcast(RankState(r, 0, 0), root=r % 2)                    # ranks disagree on the root
except tc.DesyncError as exc:
    report(str(exc).splitlines()[0])
try:
    c.gather(RankState("x", 0, 0) if r == 1 else RankState(r, 0, 0), root=0)
except tc.CollectiveError as exc:
    report(f"{type(exc).__name__}: {exc}")
try:
    if r == 0:
        c.barrier()
    else:
        c.allreduce(1)
except tc.DesyncError as exc:
    report(str(exc).splitlines()[0])
for op in (c.gather, c.bcast):                                 # a root no C long can hold
    try:
        op(1, root=2 ** 70 if r == 1 else 0, schema=int)
    except tc.CollectiveError as exc:
        report(f"{type(exc).__name__}: {exc}")
report(f"seq {c.seq}")
"""
    res = run_spmd(code, nranks, timeout=120, tmp_path=tmp_path)
    assert not res.timed_out and res.returncode == 0, res
    per_iteration = 6
    seq = 30 * per_iteration
    assert "rank 0: general path calls after warm-up: 0" in res.stdout, res
    for rank in range(nranks):
        assert f"rank {rank}: collective #{seq + 2} on COMM_WORLD diverged (root):" in res.stdout, res
        assert f"rank {rank}: collective #{seq + 4} on COMM_WORLD diverged (" in res.stdout, res
        assert f"rank {rank}: seq {seq + 7}" in res.stdout, res
    assert ("rank 1: EncodeError: collective #183 on COMM_WORLD: rank 1 could not send its "
            "gather[RankState] contribution: Expected `int`, got `str` - at `$.rank`") in res.stdout
    assert ("rank 0: PeerError: collective #183 on COMM_WORLD: rank 1 failed its "
            "gather[RankState] contribution: Expected `int`, got `str` - at `$.rank`") in res.stdout
    for seq, op in ((185, "gather"), (186, "bcast")):
        assert (f"rank 1: EncodeError: collective #{seq} on COMM_WORLD: rank 1 could not send "
                f"its {op}[int] contribution: expected root in 0..{nranks - 1}, got "
                f"{2 ** 70}") in res.stdout, res
        assert (f"rank 0: PeerError: collective #{seq} on COMM_WORLD: rank 1 failed its "
                f"{op}[int] contribution: expected root in 0..{nranks - 1}, got "
                f"{2 ** 70}") in res.stdout, res


@pytest.mark.parametrize("schema", ["raw", "memoryview"])
def test_results_that_reference_their_payload_outlive_the_receive_buffer(schema):
    # msgspec.Raw and memoryview values point into the bytes they were decoded from; the slots
    # they arrive in are overwritten by the next collective and reallocated when the slot grows.
    import msgspec
    from mpi4py import MPI

    import typedcoll as tc
    comm = tc.TypedComm(MPI.COMM_SELF)
    if schema == "raw":
        kept = comm.allgather(msgspec.Raw(msgspec.msgpack.encode(b"AAAA")), schema=msgspec.Raw)
        expected = [msgspec.msgpack.encode(b"AAAA")]
        again = comm.bcast(msgspec.Raw(msgspec.msgpack.encode(b"CCCC")), schema=msgspec.Raw)
    else:
        kept = comm.allgather(memoryview(b"AAAA"), schema=memoryview)
        expected = [b"AAAA"]
        again = comm.bcast(memoryview(b"CCCC"), schema=memoryview)
    comm.allgather(b"B" * 64)
    comm.allgather(b"Q" * 1000)  # the slot grows: the receive buffer is reallocated
    assert [bytes(x) for x in kept] == expected
    assert bytes(again).endswith(b"CCCC")


def test_collectives_with_a_timeout_take_the_general_path(monkeypatch):
    # The C steady state has no deadline: with timeout= gather, bcast, allreduce and barrier go
    # through phase1's nonblocking exchange (allgather through its flattened Python path, which
    # has one too), on every rank alike, so MPI calls still match.
    from mpi4py import MPI

    import typedcoll as tc
    from typedcoll import _protocol
    comm = tc.TypedComm(MPI.COMM_SELF, timeout=30)
    seen = []
    real = _protocol.Protocol.phase1
    monkeypatch.setattr(_protocol.Protocol, "phase1",
                        lambda self, op, *a, **k: (seen.append(op), real(self, op, *a, **k))[1])
    for _ in range(2):  # the second round has every schema cached
        seen.clear()
        assert comm.allgather(1) == [1] and comm.gather(2) == [2] and comm.bcast(3) == 3
        assert comm.allreduce(4) == 4
        comm.barrier()
        assert seen == ["gather", "bcast", "allreduce", "barrier"]
