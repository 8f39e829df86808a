"""SPMD: the tensor- and data-parallel layout (tp = ranks of one pair, dp = ranks of one
position), with TYPEDCOLL_TRACE_DIR set and every rank dumping after a clean run.

Run by tests/test_diag_mpi.py at 4 ranks (any even size from 4 holds). Both splits are
created with color 0 on some ranks, so their names alone cannot tell them apart across ranks:
each rank checks that its communicators' ids hold their members' world ranks, and the test then
runs ``typedcoll trace`` on the dumps, which must align every communicator and find nothing.
"""

from mpi4py import MPI

import typedcoll as tc
import typedcoll.diagnostics
from typedcoll.diagnostics import state
from spmd.harness import Checker

typedcoll.diagnostics.install()
chk = Checker("diag_tpdp")
world = tc.TypedComm(MPI.COMM_WORLD)
rank = world.rank
tp = world.split(rank // 2)
dp = world.split(rank % 2)
for step in range(3):
    tp.allreduce(rank, op="sum", step=step)
    dp.allreduce(rank, op="sum", step=step)
    world.allgather(rank, step=step)


tp_members = f"{2 * (rank // 2)}-{2 * (rank // 2) + 1}"
dp_members = ",".join(str(r) for r in range(rank % 2, world.size, 2))
chk.eq("tp id", state.comm_id(tp._p), f"COMM_WORLD.split({rank // 2})[{tp_members}]")
chk.eq("dp id", state.comm_id(dp._p), f"COMM_WORLD.split({rank % 2})[{dp_members}]")
chk.eq("world id", state.comm_id(world._p), "COMM_WORLD")
chk.true("dumped", typedcoll.diagnostics.dump_traces("tpdp") is not None)
chk.done()
