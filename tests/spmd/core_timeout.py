"""SPMD: a rank that skips a collective makes its peers raise CollectiveTimeout, in time.

Run by tests/test_core_mpi.py at 2 and 4 ranks. With every rank present, the deadline-bounded
paths (the exchange, phase 2, the cold paths) just work; then the last rank skips one collective
of each kind, each on a communicator of its own, and the others must raise within about the
timeout, naming seq, op, schema and call site, and refuse every later call on that channel; a
rank that arrives after its peers gave up raises too. The
skipped collectives stay pending in MPI, so the program ends with os._exit(0) after the markers
(MPI_Finalize could wait forever); the launcher's timeout bounds the whole run.
"""

import os
import time

import numpy as np
from mpi4py import MPI

import typedcoll as tc
from spmd.harness import WORLD, Checker, marker

TIMEOUT = 0.5
chk = Checker("core_timeout")
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT)
rank, size = comm.rank, comm.size
odd = size - 1

chk.eq("allgather", comm.allgather(rank), list(range(size)))
big = b"x" * 10_000
chk.eq("overflowing allgather", comm.allgather(big), [big] * size)
chk.eq("overflowing gather", comm.gather(big, 0), [big] * size if rank == 0 else None)
chk.eq("overflowing bcast", comm.bcast(big if rank == 0 else None, 0, schema=bytes), big)
chk.true("large allreduce", bool((comm.allreduce(np.ones(5000)) == size).all()))
if rank == odd:
    time.sleep(TIMEOUT / 4)
chk.eq("a late peer within the timeout", comm.allgather(rank), list(range(size)))

ONES = np.ones(3000)  # made here, so that each case's lambda is one call: a thin wrapper
CASES = {
    "allgather[int]": lambda c: c.allgather(rank),
    "bcast[int]": lambda c: c.bcast(rank, 0, schema=int),
    "barrier": lambda c: c.barrier(),
    "gather[int]": lambda c: c.gather(rank, 0),
    "allreduce[ndarray]": lambda c: c.allreduce(ONES),
}
for label, call in CASES.items():
    each = tc.TypedComm(WORLD.Dup(), timeout=TIMEOUT, name="each")
    if rank == odd:
        continue  # this rank has nothing to say: it skips the collective
    started = time.monotonic()
    with chk.expect(tc.CollectiveTimeout, label) as err:
        call(each)
    elapsed = time.monotonic() - started
    chk.true(f"{label}: raised after the timeout ({elapsed:.2f} s)", TIMEOUT <= elapsed < 10)
    first = str(err.error).splitlines()[0]
    # The lambda is a thin wrapper: its caller's line, inside the block, is the site, and the
    # message names the lambda passed, as a desync does.
    chk.true(f"{label}: message {first!r}", first.startswith(
        f"collective #0 on each: {label} at {err.site()} through <lambda> (") and first.endswith(
        ") did not complete within 0.5 s"))
    op = label.partition("[")[0]
    chk.eq(f"{label}: attributes", (err.error.seq, err.error.comm, err.error.op),
           (0, "each", op))
    with chk.expect(tc.CollectiveTimeout, f"{label}: refused") as again:
        each.allgather(rank)
    chk.true(f"{label}: refusal names the cause", str(again.error).startswith(
        f"collective #1 on each: allgather[int] refused: the communicator is unusable since "
        f"collective #0 on each ({op}"))

# A rank that arrives after its peers gave up can complete the exchange from the messages they
# left posted; it must raise too (none returns the call's data), naming who gave up.
LATE = {
    "allgather[int]": lambda c: c.allgather(rank),
    "bcast[int]": lambda c: c.bcast(rank, 0, schema=int),
}
for label, call in LATE.items():
    each = tc.TypedComm(WORLD.Dup(), timeout=TIMEOUT, name="late")
    if rank == odd:
        time.sleep(TIMEOUT * 3)
    with chk.expect(tc.CollectiveTimeout, f"late {label}") as err:
        call(each)
    if rank == odd:
        where, _, rest = str(err.error).splitlines()[0].partition(" is abandoned: ")
        chk.true(f"late {label}: where {where!r}", where.startswith(
            f"collective #0 on late: {label} at {err.site()} through <lambda> ("))
        chk.eq(f"late {label}: the late rank's message", rest,
               f"{'rank 0' if size == 2 else f'ranks 0-{odd - 1}'} gave up waiting "
               f"at collective #0 (timeout 0.5 s) before it completed on rank {odd}; no rank "
               f"returns this call's result (their reports name the ranks they waited for)")
    chk.eq(f"late {label}: missing", err.error.missing, None if rank == odd else (odd,))

# Every rank waits for the others (the launcher may end the job at the first exit), prints its
# marker, then leaves without MPI_Finalize, which would wait for the abandoned exchanges.
WORLD.Barrier()
marker(f"SPMD-OK core_timeout rank {rank}/{size} checks {chk.count}")
WORLD.Barrier()
os._exit(0)
