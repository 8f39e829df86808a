"""SymmetricFlush: delivery, local post checks, and a flush under a rank-local condition."""

from __future__ import annotations

import pytest

from launch import run_spmd

PRELUDE = """
from mpi4py import MPI
import typedcoll as tc
from typedcoll.executor import SymmetricFlush, RankState, TimeoutFlag, IterStats
# No timeout on the communicator: the launcher's timeout bounds every test.
comm = tc.TypedComm(MPI.COMM_WORLD, name="tp")
flush = SymmetricFlush(comm, {"rank_state": RankState, "timeouts": TimeoutFlag,
                              "iter_stats": IterStats})
r, n = comm.rank, comm.size
"""


def _run(body: str, nranks: int, tmp_path):
    result = run_spmd(PRELUDE + body, nranks, timeout=60, tmp_path=tmp_path)
    assert not result.timed_out and result.returncode == 0, repr(result)
    return result


@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_flush_delivers_every_rank_messages(nranks, tmp_path):
    out = _run("""
flush.post("rank_state", RankState(r, r, 10 * r))
if r % 2:
    flush.post("timeouts", TimeoutFlag(rank=r, iteration=0, request_ids=(r, r + 1)))
    flush.post("timeouts", TimeoutFlag(rank=r, iteration=0))
d = flush.flush(step=0)
assert d["rank_state"] == [(RankState(s, s, 10 * s),) for s in range(n)]
assert [len(x) for x in d["timeouts"]] == [2 if s % 2 else 0 for s in range(n)]
assert d.latest("iter_stats") == [None] * n and flush.num_pending == 0
assert len(d) == n + 2 * (n // 2)
empty = flush.flush(step=1)          # nothing pending anywhere: still one collective, all None
assert len(empty) == 0 and comm.seq == 2
assert flush.posted["timeouts"] == (2 if r % 2 else 0)
assert d["timeouts"] is d["timeouts"] and d.channels == flush.channels
try:
    d["nope"]
except KeyError as exc:
    assert "expected a channel in ['rank_state', 'timeouts', 'iter_stats'], got 'nope'" in str(exc)
else:
    raise AssertionError("expected a KeyError")
print("OK", r)
""", nranks, tmp_path)
    assert out.stdout.count("OK") == nranks


def test_post_checks_locally(tmp_path):
    _run("""
import pytest
with pytest.raises(KeyError, match="expected a channel in"):
    flush.post("nope", RankState(r))
with pytest.raises(TypeError, match="channel 'timeouts': expected TimeoutFlag, got RankState"):
    flush.post("timeouts", RankState(r))
assert flush.num_pending == 0
""", 1, tmp_path)


def test_flush_under_rank_local_condition_is_caught(tmp_path):
    # Rank 1 flushes once more (a gated flush): its flush meets its peers' allgather, then the
    # ranks are realigned; then two different flush points; then a flush one iteration late.
    out = _run("""
def expect(fn, seq, kinds):
    try:
        fn()
    except tc.DesyncError as exc:
        assert exc.seq == seq, (exc.seq, seq, str(exc))
        assert [k.value for k in exc.kinds] == kinds, (exc.kinds, str(exc))
        print(f"rank {r} caught #{exc.seq}:", str(exc).replace(chr(10), " | "))
    else:
        raise AssertionError("expected a DesyncError")

def gated():
    if r == 1:
        flush.flush(step=5)                             # flush point A, rank-local
    else:
        comm.allgather(RankState(r), step=5)
expect(gated, 0, ["op", "schema", "call site"])

def two_points():
    if r == 1:
        flush.flush(step=6)                             # flush point B
    else:
        flush.flush(step=6)                             # flush point C
expect(two_points, 1, ["call site"])

def late():
    flush.flush(step=7 if r == 1 else 8)
expect(late, 2, ["step"])
""", 2, tmp_path)
    assert "flush[FlushBatch] at" in out.stdout
