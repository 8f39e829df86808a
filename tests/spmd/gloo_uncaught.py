"""A gloo job whose last rank raises an uncaught exception between two collectives: its
excepthook writes a farewell to the channel's store before the process ends, so its peers'
error names the exception and where it was raised, with a timeout or with none (gloo fails the
call when the rank's connections close).

Run by tests/test_diag_torch.py as ``python gloo_uncaught.py RANK SIZE PORT`` in SIZE processes.
The survivors print ``SPMD-OK gloo_uncaught rank R/N``, then ``gloo_job.leave``.
"""

import os
import sys

import torch.distributed as dist

import gloo_job
import typedcoll as tc

FILE = os.path.basename(__file__)
rank, size = gloo_job.join(sys.argv)
timed = tc.TypedComm.from_torch(timeout=60)
untimed = tc.TypedComm.from_torch(dist.new_group(list(range(size))))  # no timeout, own channel
assert timed.allgather(rank) == untimed.allgather(rank) == list(range(size))
RAISE_LINE = sys._getframe().f_lineno + 2
if rank == size - 1:
    raise ValueError("request 17 has no KV blocks")
for comm in (timed, untimed):
    try:
        comm.allgather(rank)
        raise AssertionError("an allgather with an ended peer returned")
    except tc.CollectiveTimeout as exc:
        text = str(exc)
        assert exc.missing and size - 1 in exc.missing, text
        assert f"  ended by an uncaught exception: rank {size - 1}\n" \
               f"    rank {size - 1}: ValueError: request 17 has no KV blocks (raised at " \
               f"{FILE}:{RAISE_LINE} in <module>)\n" in text, text
print(f"SPMD-OK gloo_uncaught rank {rank}/{size}", flush=True)
gloo_job.leave("gloo_uncaught", ranks_done=size - 1)
