"""A gloo job whose last rank never creates its TypedComm (it sleeps, then leaves): its peers'
creation raises CollectiveTimeout within the communicator's timeout, naming the rank that never
came, instead of waiting in gloo's connection for the group's 30 minutes; the same for the
torch drop-in, whose bound is its group's own timeout.

Run by tests/test_diag_torch.py as ``python gloo_absent_creator.py RANK SIZE PORT`` in SIZE
processes. The others print ``SPMD-OK gloo_absent_creator rank R/N``; every rank then
``gloo_job.leave``s.
"""

import datetime
import sys
import time

import torch.distributed as dist

import gloo_job
import typedcoll as tc
from typedcoll.core.verdict import CREATION_MIN_TIMEOUT

rank, size = gloo_job.join(sys.argv)
short = dist.new_group(list(range(size)), timeout=datetime.timedelta(seconds=12))
store = dist.distributed_c10d._get_default_store()
absent = size - 1
if rank != absent:
    for label, make, bound in (
            ("typed", lambda: tc.TypedComm.from_torch(timeout=1), CREATION_MIN_TIMEOUT),
            ("drop-in", lambda: tc.compat.torch(short), 12.0)):
        started = time.monotonic()
        try:
            make()
            raise AssertionError(f"{label}: created without rank {absent}")
        except tc.CollectiveTimeout as exc:
            took = time.monotonic() - started
            assert bound - 1 <= took < bound + 10, (label, took)
            assert exc.missing == (absent,), (label, exc.missing, str(exc))
            assert f"rank(s) {absent} of {size} never came" in str(exc), str(exc)
    print(f"SPMD-OK gloo_absent_creator rank {rank}/{size}", flush=True)
gloo_job.leave("gloo_absent_creator", ranks_done=size)
