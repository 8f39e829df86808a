"""What the gloo programs in this folder share: joining the job and leaving it.

tests/test_diag_torch.py runs each as ``python <program>.py RANK SIZE PORT`` in SIZE processes.
A program calls ``join`` first and ``leave`` last. Rank 0 serves the group's store, and a peer's
hang report asks the others through it, so no rank may go while a peer still needs the store:
every rank counts itself done there and waits (bounded) until every rank expected has, then rank
0 leaves last. ``os._exit`` ends each process without gloo's teardown, which would wait for the
collectives a test left pending on purpose.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, NoReturn, Tuple

import torch.distributed as dist

DONE_WAIT_S = 30.0


def join(argv: List[str]) -> Tuple[int, int]:
    """Join the default gloo group from ``argv`` (RANK SIZE PORT); return (rank, size)."""
    rank, size, port = (int(x) for x in argv[1:4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    return rank, size


def leave(program: str, ranks_done: int) -> NoReturn:
    """Count this rank done, wait until ``ranks_done`` ranks are (or DONE_WAIT_S passed), then
    end the process with status 0. Ranks that end otherwise (an exception, os._exit) do not
    count: ``ranks_done`` says how many call this."""
    store = dist.distributed_c10d._get_default_store()
    key = f"{program}/done"
    store.add(key, 1)
    deadline = time.monotonic() + DONE_WAIT_S
    while int(store.add(key, 0)) < ranks_done and time.monotonic() < deadline:
        time.sleep(0.05)
    if dist.get_rank() == 0:
        time.sleep(0.5)  # the store's server leaves last
    sys.stdout.flush()
    os._exit(0)
