"""A gate accepted with a reason is not reported; a bare marker, or none, is."""

import os

from mpi4py import MPI

comm = MPI.COMM_WORLD


def accepted(queue):
    if queue:  # typedcoll: symmetric (the queue is filled from a broadcast every rank receives)
        comm.Barrier()


def accepted_multiline(queue, deadline):
    if (queue
            and deadline):  # typedcoll: symmetric (both come from the same bcast)
        comm.Barrier()


def bare_marker(queue):
    if queue:  # typedcoll: symmetric
        comm.Barrier()  # expect: collective-under-rank-local-gate


def accepted_value():
    workers = int(os.environ.get("WORKERS", "1"))  # typedcoll: symmetric (set by the launcher)
    for _ in range(workers):
        comm.Barrier()


def not_accepted():
    workers = int(os.environ.get("WORKERS", "1"))
    for _ in range(workers):
        comm.Barrier()  # expect: collective-under-rank-local-gate
