"""SPMD: a desync behind a rank-local decision, with TYPEDCOLL_TRACE_DIR set.

Run by tests/test_diag_mpi.py at 3 ranks (it holds at any size from 3). Rank 2 decides
differently (``comm.note``) and sends an extra flag; every rank's DesyncError lists the
decision, every rank logs one JSON line and writes its dump, and the test then runs
``typedcoll trace`` on the dumps.
"""

import os
import sys

import msgspec
from mpi4py import MPI

import typedcoll as tc
import typedcoll.diagnostics
from spmd.harness import Checker


class RankState(msgspec.Struct):
    rank: int


class TimeoutFlag(msgspec.Struct):
    on: bool


typedcoll.diagnostics.install()
chk = Checker("diag_desync")
FILE = os.path.basename(__file__)
comm = tc.TypedComm(MPI.COMM_WORLD)
for step in range(3):
    comm.allgather(RankState(comm.rank), step=step)
NOTE_LINE = sys._getframe().f_lineno + 1
comm.note("timed_out", comm.rank == 2)
with chk.expect(tc.DesyncError, "a rank-local branch") as err:
    if comm.rank == 2:
        comm.allgather(TimeoutFlag(True), step=3)
    comm.allgather(RankState(comm.rank), step=3)
others = {3: "ranks 0-1", 4: "ranks 0-1,3"}.get(comm.size, f"ranks 0-1,3-{comm.size - 1}")
chk.eq("decisions", err.error.decisions,
       (("timed_out", f"{FILE}:{NOTE_LINE}", [(others, "False"), ("rank 2", "True")]),))
chk.eq("message ends with them", str(err.error).splitlines()[-2:], [
    "  decisions that differ:",
    f"    timed_out at {FILE}:{NOTE_LINE} — {others}: False; rank 2: True"])
chk.done()
