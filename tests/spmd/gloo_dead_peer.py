"""A gloo job whose last rank dies between two collectives: its peers raise CollectiveTimeout
saying the backend failed the call (never gloo's bare RuntimeError), long before the timeout
and with none at all, and every later call on that communicator is refused. gloo itself fails
the call only on the ranks that exchange with the dead one directly: the others learn it from
their report (at 4 ranks, rank 1 does).

Run by tests/test_diag_torch.py as ``python gloo_dead_peer.py RANK SIZE PORT`` in SIZE
processes. The survivors print ``SPMD-OK gloo_dead_peer rank R/N``, then ``gloo_job.leave``.
"""

import os
import sys
import time

import torch.distributed as dist

import gloo_job
import typedcoll as tc

rank, size = gloo_job.join(sys.argv)
timed = tc.TypedComm.from_torch(timeout=60)
untimed = tc.TypedComm.from_torch(dist.new_group(list(range(size))))  # no timeout, own channel
assert timed.allgather(rank) == untimed.allgather(rank) == list(range(size))
if rank == size - 1:
    os._exit(3)  # as the OOM killer would: no goodbye
for comm in (timed, untimed):
    started = time.monotonic()
    try:
        comm.allgather(rank)
        raise AssertionError("an allgather with a dead peer returned")
    except tc.CollectiveTimeout as exc:
        assert exc.failure and time.monotonic() - started < 15, (exc, exc.failure)
        assert " failed in the torch backend before completing" in str(exc), str(exc)
    try:
        comm.allgather(rank)
        raise AssertionError("a broken communicator ran a call")
    except tc.CollectiveTimeout as exc:
        assert "failed in the backend" in str(exc) and exc.failure, str(exc)
print(f"SPMD-OK gloo_dead_peer rank {rank}/{size}", flush=True)
gloo_job.leave("gloo_dead_peer", ranks_done=size - 1)
