"""SPMD: a rank that skips a collective makes its peers raise CollectiveTimeout (rule 6).

Run by tests/test_core_spmd.py at 2 and 4 ranks. The last rank skips one collective on each of
five duplicates; the others must raise within about the timeout, naming seq, op, schema and call
site, and refuse later calls on that communicator. The skipped collectives stay pending in MPI,
so the program ends with os._exit(0) after the markers (MPI_Finalize could wait forever); the
launcher's timeout bounds the whole run.
"""

import os
import time

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from spmd.harness import Checker, slot_size

TIMEOUT = 0.5


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int


chk = Checker("core_timeout")
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT)
rank, size = comm.rank, comm.size
odd = size - 1
chk.eq("timeout", comm.timeout, TIMEOUT)

# With every rank present, the deadline-bounded paths (phase 1 and phase 2) just work.
chk.eq("allgather", comm.allgather(rank), list(range(size)))
big = b"x" * 10_000
chk.eq("overflowing allgather", comm.allgather(big), [big] * size)
chk.eq("overflowing gather", comm.gather(big, 0), [big] * size if rank == 0 else None)
chk.eq("overflowing bcast", comm.bcast(big if rank == 0 else None, 0, schema=bytes), big)
chk.eq("large allreduce", comm.allreduce(np.ones(5000)), np.full(5000, float(size)))
chk.same("slot agrees", slot_size(comm))
# A peer that is late but within the timeout is no error.
if rank == odd:
    time.sleep(TIMEOUT / 4)
chk.eq("late peer", comm.allgather(rank), list(range(size)))

dups = [comm.dup() for _ in range(5)]
chk.eq("dups inherit the timeout", [d.timeout for d in dups], [TIMEOUT] * 5)


def timed_out(err, dup, label, started):
    """The peers' CollectiveTimeout: first line, attributes, time taken, later calls refused."""
    e = err.error
    elapsed = time.monotonic() - started
    chk.true(f"{label}: raised after the timeout ({elapsed:.2f} s)", TIMEOUT <= elapsed < 20)
    first = str(e).splitlines()[0]
    chk.eq(f"{label}: message", first, f"collective #0 on COMM_WORLD.dup: {label} at "
                                       f"{err.site()} did not complete within 0.5 s")
    op, _, schema = label.partition("[")
    chk.eq(f"{label}: attributes", (e.seq, e.comm, e.op, e.schema, e.site, e.timeout),
           (0, "COMM_WORLD.dup", op, schema.rstrip("]") if schema else "", err.site(),
            TIMEOUT))
    chk.true(f"{label}: missing is None or names the absent rank",
             e.missing is None or e.missing == (odd,))
    with chk.expect(tc.CollectiveTimeout, f"{label}: refused") as again:
        dup.allgather(rank)
    chk.eq(f"{label}: refused message", str(again.error),
           f"collective #1 on COMM_WORLD.dup: allgather[int] refused: the communicator is "
           f"unusable since collective #0 ({op}[{e.schema}] at {err.site()}) timed out")
    chk.eq(f"{label}: refused seq", (again.error.seq, dup.seq), (1, 1))


if rank != odd:
    t = time.monotonic()
    with chk.expect(tc.CollectiveTimeout, "allgather") as err:
        dups[0].allgather(rank)
    timed_out(err, dups[0], "allgather[int]", t)
    t = time.monotonic()
    with chk.expect(tc.CollectiveTimeout, "gather") as err:
        dups[1].gather(RankState(rank, 1, 2), 0)
    timed_out(err, dups[1], "gather[RankState]", t)
    t = time.monotonic()
    with chk.expect(tc.CollectiveTimeout, "bcast") as err:
        dups[2].bcast(big if rank == 0 else None, 0, schema=bytes)
    timed_out(err, dups[2], "bcast[bytes]", t)
    t = time.monotonic()
    with chk.expect(tc.CollectiveTimeout, "allreduce") as err:
        dups[3].allreduce(np.float64(1.5), op="max")
    timed_out(err, dups[3], "allreduce[float64]", t)
    t = time.monotonic()
    with chk.expect(tc.CollectiveTimeout, "barrier") as err:
        dups[4].barrier()
    timed_out(err, dups[4], "barrier", t)
else:
    chk.eq("the skipping rank's dups", [d.seq for d in dups], [0] * 5)

# The world communicator itself was never touched by the skipped collectives.
chk.done(uniform=False)
# Every rank has written its marker before any rank leaves: hydra may drop the last output of a
# rank still running when a peer's process exits.
MPI.COMM_WORLD.Barrier()
time.sleep(0.2)
os._exit(0)
