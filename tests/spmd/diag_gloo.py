"""A gloo job: a rank that never arrives is named over the group's Store, with no setup.

Run by tests/test_diag_torch.py as ``python diag_gloo.py RANK SIZE PORT`` in SIZE processes. The
last rank is one call short: it skips the last allgather and sleeps; its peers' CollectiveTimeout
names it, the line it sleeps on, its last collective and the decision that differs. Every rank
prints ``SPMD-OK diag_gloo rank R/N checks K``, then ``gloo_job.leave``.
"""

import os
import re
import sys
import time

import msgspec

import gloo_job
import typedcoll as tc
import typedcoll.diagnostics

TIMEOUT = 0.5
FILE = os.path.basename(__file__)


class RankState(msgspec.Struct):
    rank: int


def line_at(offset: int) -> int:
    return sys._getframe(1).f_lineno + offset


rank, size = gloo_job.join(sys.argv)
typedcoll.diagnostics.install()
comm = tc.TypedComm.from_torch(timeout=TIMEOUT)
absent = size - 1
peers = "rank 0" if size == 2 else f"ranks 0-{size - 2}"
NOTE_LINE = line_at(1)
comm.note("can_queue", rank != absent)
LOOP_LINE = line_at(2)
for step in range(3):
    comm.allgather(RankState(rank))
checks = 0
SLEEP_LINE = line_at(2)
if rank == absent:
    time.sleep(TIMEOUT + 1.5)
else:
    started = time.monotonic()
    try:
        comm.allgather(RankState(rank))
        raise AssertionError(f"rank {rank}: the allgather without rank {absent} returned")
    except tc.CollectiveTimeout as err:
        elapsed = time.monotonic() - started
        assert elapsed < TIMEOUT + 2, elapsed
        assert err.missing == (absent,), err.missing
        lines = str(err).splitlines()
        assert re.fullmatch(rf"hang report \(side channel: {size - 1} of {size - 1} peers? "
                            rf"answered in [0-9.]+ s\):", lines[1]), lines
        expected = [
            f"  never arrived at collective #3 on WORLD: rank {absent}",
            f"    rank {absent}: now at {FILE}:{SLEEP_LINE} in <module> (thread MainThread)",
            f"      last started: allgather[RankState] on WORLD seq=2 at {FILE}:{LOOP_LINE}, "
            f"its 3rd call: completed",
            f"  arrived: {peers}",
            "  decisions that differ:",
            f"    can_queue at {FILE}:{NOTE_LINE} — {peers}: True; rank {absent}: False",
        ]
        assert lines[2:] == expected, "\n".join(lines[2:]) + "\n---\n" + "\n".join(expected)
        checks = 1
print(f"SPMD-OK diag_gloo rank {rank}/{size} checks {checks}", flush=True)
gloo_job.leave("diag_gloo", ranks_done=size)
