"""SPMD: a rank whose main thread raises an uncaught exception between two collectives.

Run by tests/test_diag_mpi.py at 3 and 4 ranks, without ``python -m mpi4py`` (whose abort would
end the job at once). The last rank's ``schedule`` raises; its excepthook tells every peer over
the side channel before the process ends, so the survivors' report names the exception and
where it was raised, where it said "unresponsive" before. Each survivor prints its marker, waits
for the other survivors (Open MPI ends the job when a rank leaves without MPI_Finalize) and
leaves with os._exit(0): the timed-out collective is still pending.

With the argument ``untimed`` the communicator has no timeout: the survivors would wait for
ever, and the ending rank, finding them inside a collective it never joined, ends the job.
"""

import os
import sys

from mpi4py import MPI

import typedcoll as tc
from spmd.harness import marker

FILE = os.path.basename(__file__)
TIMEOUT = 1.0

UNTIMED = sys.argv[1:] == ["untimed"]
last = MPI.COMM_WORLD.size - 1
survivors = MPI.COMM_WORLD.Split(0 if MPI.COMM_WORLD.rank < last else MPI.UNDEFINED)
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=None if UNTIMED else TIMEOUT)
rank, size = comm.rank, comm.size
FIRST_LINE = sys._getframe().f_lineno + 1
comm.allgather(rank)


def schedule(r: int) -> int:
    if r == size - 1:
        raise ValueError(f"request 17 has no KV blocks on rank {r}")  # RAISE_LINE
    return r


RAISE_LINE = FIRST_LINE + 5
try:
    comm.allgather(schedule(rank))
    assert not UNTIMED, "the allgather without the ending rank returned"
    raise AssertionError(f"rank {rank}: the allgather without rank {size - 1} returned")
except tc.CollectiveTimeout as err:
    lines = str(err).splitlines()
    assert err.missing == (last,), err
    assert lines[1] == f"hang report (side channel: {size - 2} of {size - 1} peers answered " \
                       f"within 1 s):", lines
    assert lines[2] == f"  ended by an uncaught exception: rank {last}", lines
    assert lines[3] == (f"    rank {last}: ValueError: request 17 has no KV blocks on rank "
                        f"{last} (raised at {FILE}:{RAISE_LINE} in schedule)"), lines
    assert lines[4].startswith(
        f"    last collective every rank took part in: allgather[int] on COMM_WORLD seq=0 at "
        f"{FILE}:{FIRST_LINE}, its 1st call: completed "), lines
    assert lines[5] == f"  arrived: ranks 0-{size - 2}", lines
marker(f"SPMD-OK diag_uncaught rank {rank}/{size} checks 1")
survivors.Barrier()
os._exit(0)
