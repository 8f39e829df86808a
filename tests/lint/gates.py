"""Collectives under if, while and for whose conditions are rank-local, and under symmetric ones."""

import time

from mpi4py import MPI

STEPS = 4
comm = MPI.COMM_WORLD


def drain(queue):
    while queue:  # a queue's length differs by rank
        comm.allgather(queue.pop())  # expect: collective-under-rank-local-gate


def poll(deadline):
    while time.monotonic() < deadline:
        comm.Barrier()  # expect: collective-under-rank-local-gate


def per_item(items):
    for item in items:
        comm.allreduce(item)  # expect: collective-under-rank-local-gate


def if_pending(pending):
    if len(pending) > 0:
        comm.bcast(pending)  # expect: collective-under-rank-local-gate


def symmetric_loops():
    for step in range(STEPS):
        comm.allgather(step)
    if STEPS > 2:
        comm.Barrier()
    done = False
    while not done:
        done = all(comm.allgather(True))
