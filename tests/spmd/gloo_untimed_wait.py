"""Untimed calls of a TypedComm made with ``from_torch(group, timeout=None)`` wait past the
group's own timeout: that timeout bounds only the private group's connection. A receive whose
sender comes later than it, and a collective whose last member does, complete with their data.

Run by tests/test_diag_torch.py as ``python gloo_untimed_wait.py RANK SIZE PORT`` in 2
processes; each prints ``SPMD-OK gloo_untimed_wait rank R/N`` and leaves with os._exit(0) once
both are done with the store (rank 0 serves it).
"""

import datetime
import os
import sys
import time

import torch.distributed as dist

import typedcoll as tc

GROUP_TIMEOUT_S = 4
LATE_S = GROUP_TIMEOUT_S + 3

rank, size, port = (int(x) for x in sys.argv[1:4])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=size)
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
store = dist.distributed_c10d._get_default_store()
store.add("gloo_untimed_wait_done", 1)
while rank == 0 and int(store.add("gloo_untimed_wait_done", 0)) < size:
    time.sleep(0.05)
os._exit(0)
