"""A gloo job whose last rank dies between two collectives: its peers raise CollectiveTimeout
saying the backend failed the call (never gloo's bare RuntimeError), long before the timeout
and with none at all, and every later call on that communicator is refused. gloo itself fails
the call only on the ranks that exchange with the dead one directly: the others learn it from
their report (at 4 ranks, rank 1 does).

Run by tests/test_diag_torch.py as ``python gloo_dead_peer.py RANK SIZE PORT`` in SIZE
processes. The survivors print ``SPMD-OK gloo_dead_peer rank R/N``, then leave with os._exit(0)
once all are done with the store (rank 0 serves it).
"""

import os
import sys
import time

import torch.distributed as dist

import typedcoll as tc

rank, size, port = (int(x) for x in sys.argv[1:4])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=size)
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
store = dist.distributed_c10d._get_default_store()
store.add("gloo_dead_peer_done", 1)
while rank == 0 and int(store.add("gloo_dead_peer_done", 0)) < size - 1:
    time.sleep(0.05)
os._exit(0)
