"""SPMD: a communicator one rank left alone hands none of its peers' messages to a later one.

Run by tests/test_core_mpi.py at 4 ranks. The last rank leaves a ``with`` block by an exception
after one collective, which releases the communicator on that rank alone; its peers' next
collective times out, and they leave their blocks by that timeout. Their rounds and give-up
notices went to the last rank's private communicators. MPI hands a freed communicator's context
to a later one, and messages sent to the freed one with it (under Open MPI at 4 and 6 ranks, the
next communicator's creation then hung on half the ranks while the others went on), so a
channel released that way is kept, not freed. Every rank then makes new communicators and checks
their results; a communicator every rank freed together is freed in MPI. The abandoned
exchanges stay pending in MPI, so the program ends with os._exit(0) after the markers.
"""

import os

from mpi4py import MPI

import typedcoll as tc
from spmd.harness import WORLD, Checker, marker

TIMEOUT = 1.0
chk = Checker("core_release")
rank, size = WORLD.rank, WORLD.size
odd = size - 1


class Leave(Exception):
    """The last rank's own reason to leave its block."""


left = None
try:
    with tc.TypedComm(WORLD.Dup(), timeout=TIMEOUT, name="left") as left:
        chk.eq("before leaving", left.allgather(rank), list(range(size)))
        if rank == odd:
            raise Leave()
        left.allgather(rank)  # the last rank left: this times out
    chk.true("the peers' call timed out", False)
except Leave:
    chk.true("the last rank left", rank == odd)
except tc.CollectiveTimeout as exc:
    chk.eq("who is missing", (rank != odd, exc.missing), (True, (odd,)))
assert left is not None
channel = left._p.channel
# Released on each rank alone (by an exception): kept, its communicators never freed.
chk.eq("a channel left alone is not settled", channel.settled, False)
chk.true("its communicators are not freed",
         all(c != MPI.COMM_NULL for c in (channel.transport.comm, channel.transport.p2p,
                                          channel.transport.side)))

for generation in range(3):
    # New parents, whose private communicators are the first made after the release: where the
    # release freed its own, these would receive the peers' late rounds and notices.
    with tc.TypedComm(WORLD.Dup(), timeout=30, name=f"fresh{generation}") as fresh:
        chk.eq(f"fresh{generation}: allgather", fresh.allgather(rank), list(range(size)))
        chk.eq(f"fresh{generation}: bcast", fresh.bcast(rank, root=0, schema=int), 0)
        fresh.barrier()
        chk.eq(f"fresh{generation}: allreduce", fresh.allreduce(rank, op="sum"),
               sum(range(size)))
        chk.eq(f"fresh{generation}: gather", fresh.gather(rank, root=odd),
               list(range(size)) if rank == odd else None)
        transport = fresh._p.channel.transport
    # Freed by every rank together (a with block left normally): freed in MPI too.
    chk.true(f"fresh{generation}: freed", transport.comm == MPI.COMM_NULL)

WORLD.Barrier()
marker(f"SPMD-OK core_release rank {rank}/{size} checks {chk.count}")
WORLD.Barrier()
os._exit(0)
