"""Untimed calls of a TypedComm made with ``from_torch(group, timeout=None)`` wait past the
group's own timeout: that timeout bounds only the private group's connection. A receive whose
sender comes later than it, and a collective whose last member does, complete with their data.

Run by tests/test_diag_torch.py as ``python gloo_untimed_wait.py RANK SIZE PORT`` in 2
processes; each prints ``SPMD-OK gloo_untimed_wait rank R/N``, then ``gloo_job.leave``.
"""

import datetime
import sys
import time

import torch.distributed as dist

import gloo_job
import typedcoll as tc

GROUP_TIMEOUT_S = 4
LATE_S = GROUP_TIMEOUT_S + 3

rank, size = gloo_job.join(sys.argv)
short = dist.new_group(list(range(size)), timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
comm = tc.TypedComm.from_torch(short, timeout=None)
assert comm.timeout is None, comm.timeout
if rank == 1:
    time.sleep(LATE_S)
    comm.send([7, 8], 0, schema=list[int], name="late_send")
else:
    started = time.monotonic()
    got = comm.recv(1, schema=list[int], name="late_send")
    assert got == [7, 8], got
    assert time.monotonic() - started >= LATE_S - 1, time.monotonic() - started
    time.sleep(LATE_S)
ranks = comm.allgather(rank, name="late_member")
assert ranks == list(range(size)), ranks
print(f"SPMD-OK gloo_untimed_wait rank {rank}/{size}", flush=True)
gloo_job.leave("gloo_untimed_wait", ranks_done=size)
