"""SPMD: a rank SIGKILLed mid-job, under a launcher that keeps the survivors running.

Run by tests/test_diag_mpi.py at 3 ranks under hydra's ``mpiexec -disable-auto-cleanup`` with
TYPEDCOLL_TRACE_DIR set. Rank 1 dies after 20 collectives; the survivors time out in the next
one, and their report names rank 1 as unresponsive, with the last collective every rank took
part in. Each survivor then prints its marker itself (the harness's closing allgather would wait
for the dead rank) and leaves with os._exit(0): the timed-out collective is still pending.
"""

import os
import signal
import sys
import time

import msgspec
from mpi4py import MPI

import typedcoll as tc
import typedcoll.diagnostics
from spmd.harness import marker

FILE = os.path.basename(__file__)
TIMEOUT = 0.5


class RankState(msgspec.Struct):
    rank: int


typedcoll.diagnostics.install()
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT)
rank, size = comm.rank, comm.size
LOOP_LINE = sys._getframe().f_lineno + 2
for step in range(20):
    comm.allgather(RankState(rank))
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
started = time.monotonic()
try:
    comm.allgather(RankState(rank))
    raise AssertionError(f"rank {rank}: the allgather without rank 1 returned")
except tc.CollectiveTimeout as err:
    elapsed = time.monotonic() - started
    lines = str(err).splitlines()
    assert err.missing == (1,), err
    assert elapsed < TIMEOUT + 2, elapsed
    assert lines[1] == "hang report (side channel: 1 of 2 peers answered within 1 s):", lines
    assert lines[2] == ("  unresponsive: rank 1 (no answer within 1 s: it released this "
                        "communicator already (a `with` block left by an exception releases it "
                        "on that rank alone), or it is stuck in a C call that holds the GIL, "
                        "dead, or running without typedcoll diagnostics)"), lines
    assert lines[3] == "    rank 1: it never answered this rank's side channel", lines
    assert lines[4].startswith(
        f"    last collective every rank took part in: allgather[RankState] on COMM_WORLD "
        f"seq=19 at {FILE}:{LOOP_LINE}, its 20th call: completed "), lines
    assert lines[5] == "  arrived: ranks 0,2", lines
marker(f"SPMD-OK diag_killed rank {rank}/{size} checks 1")
# The dump this rank's error hook wrote, and the one a peer's question asked for, must both be
# on disk before the job ends.
time.sleep(0.3)
sys.stdout.flush()
os._exit(0)
