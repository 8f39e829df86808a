"""SPMD: a rank that never arrives is named by its peers' CollectiveTimeout, with where it is now.

Run by tests/test_diag_mpi.py at 2 and 4 ranks, with no environment variable: the report comes
over MPI itself (the side communicator, answered by each rank's diagnostics thread). The last
rank is absent twice:

1. stuck in another collective (a barrier on a duplicate its peers never call): its peers'
   report names it, that barrier as its last started collective, and the barrier's line as
   where it is now; its own barrier then times out and its report names the peers, waiting in
   a raw MPI barrier, at that line;
2. one call short: it skips the last allgather and sleeps, and is named with the sleep's line and
   the last collective it completed.

Decisions recorded with ``comm.note`` that differ between the ranks follow each report. The
timed-out collectives stay pending in MPI, so the program ends with os._exit(0) after the markers.
"""

import os
import re
import sys
import time

import msgspec
from mpi4py import MPI

import typedcoll as tc
import typedcoll.diagnostics
from spmd.harness import WORLD, Checker

FILE = os.path.basename(__file__)
TIMEOUT = 0.5
ABSENT_TIMEOUT = 1.0  # the absent rank's own barrier: long enough for its peers' reports


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int


def line_at(offset: int) -> int:
    """The line ``offset`` lines below the caller's."""
    return sys._getframe(1).f_lineno + offset


typedcoll.diagnostics.install()
chk = Checker("diag_hang")
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT)
parent = MPI.COMM_WORLD.Dup()  # a channel of its own, with a longer timeout than a dup's
parent.Set_name("other")
other = tc.TypedComm(parent, timeout=ABSENT_TIMEOUT)
later = comm.dup()  # a channel of its own: still usable once comm's has timed out
rank, size = comm.rank, comm.size
absent = size - 1
present = [r for r in range(size) if r != absent]
peers = "rank 0" if size == 2 else f"ranks 0-{size - 2}"
NOTE_LINE = line_at(1)
comm.note("can_queue", rank != absent)
comm.note("batch", 8)  # the same everywhere: not listed
LOOP_LINE = line_at(2)
for step in range(3):
    comm.allgather(RankState(rank, step))


def report_lines(err):
    """The report's lines, durations replaced by N."""
    lines = re.sub(r"in flight for [0-9.]+ s", "in flight for N s", str(err.error)).splitlines()
    chk.true(f"hang report header: {lines[1]!r}", re.fullmatch(
        rf"hang report \(side channel: {size - 1} of {size - 1} peers? answered in "
        rf"[0-9.]+ s\):", lines[1]) is not None)
    return lines


# --- 1. the absent rank is inside another collective -----------------------------------------
BARRIER_LINE = line_at(3)
if rank == absent:
    with chk.expect(tc.CollectiveTimeout, "absent rank's barrier") as err:
        other.barrier()
else:
    started = time.monotonic()
    with chk.expect(tc.CollectiveTimeout, "allgather while a rank is elsewhere") as err:
        comm.allgather(RankState(rank, 3))
    chk.true("report within timeout + 2 s", time.monotonic() - started < TIMEOUT + 2)
    chk.eq("missing", err.error.missing, (absent,))
    lines = report_lines(err)
    chk.eq("report", lines[:1] + lines[2:], [
        f"collective #4 on COMM_WORLD: allgather[RankState] at {err.site()} did not complete "
        f"within 0.5 s",
        f"  never arrived at collective #4 on COMM_WORLD: rank {absent}",
        f"    rank {absent}: now at {FILE}:{BARRIER_LINE} in <module> (thread "
        f"MainThread, inside a collective on other)",
        f"      last started: barrier on other seq=0 at {FILE}:{BARRIER_LINE}, "
        f"its 1st call: in flight for N s",
        # 4: the dup was a collective on COMM_WORLD too
        f"      on COMM_WORLD: issued 4 collectives, the last allgather[RankState] seq=3 at "
        f"{FILE}:{LOOP_LINE}, its 3rd call: completed",
        f"  arrived: {peers}",
        "  decisions that differ:",
        f"    can_queue at {FILE}:{NOTE_LINE} — {peers}: True; rank {absent}: False",
    ])
RAW_BARRIER_LINE = line_at(1)
WORLD.Barrier()
if rank == absent:
    # Its own report: every peer sits in the raw barrier above, outside any typed collective.
    lines = report_lines(err)
    chk.eq("absent rank's report", lines[2],
           f"  never arrived at collective #0 on other: {peers}")
    # Peers described alike are one group: every peer, under one label, at any size.
    chk.true("every peer named at the raw barrier",
             f"    {peers}: now at {FILE}:{RAW_BARRIER_LINE} in <module> "
             f"(thread MainThread)" in lines)

# --- 2. the absent rank is one call short ------------------------------------------------------
LATER_LINE = line_at(1)
later.allgather(RankState(rank, 4))
SLEEP_LINE = line_at(2)
if rank == absent:
    time.sleep(TIMEOUT + 0.6)
else:
    with chk.expect(tc.CollectiveTimeout, "allgather a rank skipped") as err:
        later.allgather(RankState(rank, 5))
    lines = report_lines(err)
    chk.eq("one call short", lines[2:5], [
        f"  never arrived at collective #1 on COMM_WORLD.dup: rank {absent}",
        f"    rank {absent}: now at {FILE}:{SLEEP_LINE} in <module> (thread MainThread)",
        f"      last started: allgather[RankState] on COMM_WORLD.dup seq=0 at "
        f"{FILE}:{LATER_LINE}, its 1st call: completed",
    ])
    chk.eq("missing", err.error.missing, (absent,))
chk.done(uniform=False)
WORLD.Barrier()  # every rank's marker is out before any leaves: a launcher may end the job then
os._exit(0)
