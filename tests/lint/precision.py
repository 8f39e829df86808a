"""Calls named like collectives that are not: none of these may be reported."""

import functools
import re
import sys

import numpy as np


def generator():
    while True:
        received = yield
        if received is None:
            return


def everything_local(items, sock, lines):
    if items:
        total = functools.reduce(lambda a, b: a + b, items)
        gen = generator()
        next(gen)
        gen.send(total)
        sock.send(b"ping")
        sys.stdout.flush()
        match = re.match(r"(\d+)", lines[0])
        if match:
            match.group(1)
        parts = lines[0].split(",")
        np.broadcast(np.zeros(2), np.zeros(2))
        return parts
    return None


class Front:
    """Delegation to another object with a method of the same name is not a call to this one."""

    def __init__(self, comm, backend):
        self.comm = comm
        self.backend = backend

    def submit(self, item):
        self.comm.Barrier()
        if item:
            self.backend.submit(item)

    def __exit__(self, *exc):
        self.comm.Barrier()

    def close(self, manager):
        if manager is not None:
            manager.__exit__(None, None, None)


# A GPU kernel's barrier synchronises its threads, not processes.
import cutlass.cute as cute  # noqa: E402
from flydsl.expr import gpu  # noqa: E402


def kernel_barriers(rank, pending):
    if rank == 0 or pending:
        cute.arch.barrier()
        gpu.barrier()


# str.split on names whose words say communicator: a separator, never a color and a key.
def split_text(group_name, distributed_init_method, pending, comm):
    if pending:
        host, port = distributed_init_method.split(":")[1:]
        prefix = group_name.split(sep="_")[0]
        return host, port, prefix
    return None


# The tqdm-on-rank-0 pattern written as an expression: the same items on every rank.
class GraphRunner:
    def __init__(self, tp_rank, shapes, comm):
        self.tp_rank, self.shapes, self.comm = tp_rank, shapes, comm

    def capture(self):
        import tqdm
        capture_range = tqdm.tqdm(self.shapes) if self.tp_rank == 0 else self.shapes
        for _ in capture_range:
            self.comm.barrier()
