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
