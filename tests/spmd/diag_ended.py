"""SPMD: a rank whose program ends normally after leaving its loop one vote early.

Run by tests/test_diag_mpi.py without ``python -m mpi4py``. The last rank's queue holds one
item where its peers' hold two, so it leaves the loop after one vote and its program returns:
no exception, no excepthook. At exit it tells every peer how many collectives it issued.

* ``untimed``: no timeout. Its peers, inside the second vote, would wait for ever (and so
  would its MPI_Finalize); each finds that the ended rank never joins it and ends the job.
* ``timed``: the peers' CollectiveTimeout names it as ended normally, with its last call; each
  survivor prints its marker, waits for the others and leaves with os._exit(0) (the timed-out
  collective is still pending).
* ``collected``: as ``untimed``, with the communicator a local of ``main()``, collected once
  main returns on the last rank: its count still goes into the farewell.
* ``finalize``: as ``untimed``, the last rank calling ``MPI.Finalize()`` itself, then ending.
* ``worker``: as ``untimed``, the votes made by a worker thread; the main threads end at
  once, and the interpreter waits for the workers before its exit hooks.
* ``symmetric``: every rank votes twice; rank 0 works on for a while after its peers ended, and
  every rank makes one more collective at exit, in an ``atexit`` hook registered before the
  communicator, except on rank 0, whose diagnostics started earlier (a communicator over
  COMM_SELF): that hook runs after the farewell on ranks 1-3, before it on rank 0, and no
  rank may take it for a call never joined. A communicator over a user's duplicate, dropped
  and collected, whose parent is then freed, sends no farewell. Nothing is reported; the job
  ends normally.
"""

import atexit
import gc
import os
import sys
import threading
import time

from mpi4py import MPI

import typedcoll as tc
from spmd.harness import marker

FILE = os.path.basename(__file__)
MODE = sys.argv[1]
assert MODE in ("untimed", "timed", "collected", "finalize", "worker", "symmetric"), MODE
last = MPI.COMM_WORLD.size - 1
survivors = MPI.COMM_WORLD.Split(0 if MPI.COMM_WORLD.rank < last else MPI.UNDEFINED)


def main() -> None:
    local = tc.TypedComm(MPI.COMM_WORLD)
    for item in [7] if local.rank == last else [7, 8]:
        local.allgather(item)


if MODE == "collected":
    main()
    gc.collect()  # the last rank's communicator is gone; its peers still wait in it
    marker(f"SPMD-OK diag_ended rank {last}/{last + 1} checks 1")
    sys.exit(0)
if MODE == "worker":
    worker = threading.Thread(target=main)
    worker.start()
    sys.exit(0)
if MODE == "symmetric":
    if MPI.COMM_WORLD.rank == 0:
        tc.TypedComm(MPI.COMM_SELF)
    atexit.register(lambda: marker(f"at exit {comm.rank}: {comm.allgather(comm.rank)}"))
    user = MPI.COMM_WORLD.Dup()
    tc.TypedComm(user).allgather(0)
    gc.collect()
    user.Free()
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=1.0 if MODE == "timed" else None)
rank, size = comm.rank, comm.size
queue = [7] if rank == last and MODE != "symmetric" else [7, 8]
VOTE_LINE = sys._getframe().f_lineno + 3
try:
    for item in queue:
        comm.allgather(item)  # VOTE_LINE
except tc.CollectiveTimeout as err:
    assert MODE == "timed" and rank != last, (MODE, rank, err)
    lines = str(err).splitlines()
    assert err.missing == (last,), err
    assert f"  ended normally: rank {last}" in lines, lines
    assert (f"    rank {last}: its program ended without an uncaught exception; its last "
            f"collective: allgather[int] on COMM_WORLD seq=0 at {FILE}:{VOTE_LINE}, its 1st "
            f"call: completed") in lines, lines
    marker(f"SPMD-OK diag_ended rank {rank}/{size} checks 1")
    survivors.Barrier()
    os._exit(0)
assert MODE != "timed" or rank == last, "the vote without the last rank returned"
if MODE == "finalize":
    assert rank == last, "the vote without the last rank returned"
    MPI.Finalize()
if MODE == "symmetric" and rank == 0:
    time.sleep(0.5)  # its peers' farewells arrive while it works: it is inside no collective
marker(f"SPMD-OK diag_ended rank {rank}/{size} checks 1")
