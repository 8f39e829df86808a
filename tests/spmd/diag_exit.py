"""SPMD: an uncaught CollectiveTimeout ends the job (the excepthook), without python -m mpi4py.

Run by tests/test_diag_mpi.py at 2 ranks, not under ``python -m mpi4py``: rank 1 sleeps long in
plain Python; rank 0 times out, its traceback and hang report are printed, and the excepthook
aborts MPI, so the launcher ends every rank within the timeout plus a few seconds.
"""

import time

from mpi4py import MPI

import typedcoll as tc
import typedcoll.diagnostics

typedcoll.diagnostics.install()
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=0.5)
comm.allgather(comm.rank)
if comm.rank == 1:
    time.sleep(60)  # mark: away
comm.allgather(comm.rank)
