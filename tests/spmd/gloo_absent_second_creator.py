"""A gloo job whose last rank never creates a second TypedComm over a group the others share
with it: the others' creation times out, and rank 0, which gives up first, names the last rank
alone as never arrived (``missing``) and every other rank as arrived. Before, a creation's
number (2**64 - 1 on the wire) was compared with each peer's count of collectives, so no peer
ever counted as arrived: each rank named all its peers as absent. The other creators wait
longer, so that none has left the creation when rank 0 asks (a rank that has left holds no
such communicator to be found in), and name the last rank among those missing.

Run by tests/test_diag_torch.py as ``python gloo_absent_second_creator.py RANK SIZE PORT`` in
SIZE processes. Every rank prints ``SPMD-OK gloo_absent_second_creator rank R/N``, then
``gloo_job.leave``s.
"""

import sys
import time

import torch.distributed as dist

import gloo_job
import typedcoll as tc

rank, size = gloo_job.join(sys.argv)
store = dist.distributed_c10d._get_default_store()
absent = size - 1
first = tc.TypedComm.from_torch(timeout=5)
first.barrier()
if rank != absent:
    try:
        tc.TypedComm.from_torch(timeout=1 if rank == 0 else 20)  # a creation waits 10 s at least
        raise AssertionError(f"created without rank {absent}")
    except tc.CollectiveTimeout as exc:
        text = str(exc)
        assert "18446744073709551615" not in text, text
        if rank == 0:
            assert exc.missing == (absent,), (exc.missing, text)
            assert f"  never arrived at creation on WORLD#2: rank {absent}\n" in text, text
            assert f"  arrived: ranks 0-{size - 2}" in text or size == 2, text
        else:
            assert exc.missing is not None and absent in exc.missing, (exc.missing, text)
    store.add("second/reported", 1)
else:  # stays, answering its peers' questions, until every peer has its report
    while int(store.add("second/reported", 0)) < size - 1:
        time.sleep(0.05)
print(f"SPMD-OK gloo_absent_second_creator rank {rank}/{size}", flush=True)
gloo_job.leave("gloo_absent_second_creator", ranks_done=size)
