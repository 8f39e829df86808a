"""A caught exception is rank-local: handlers, and code after a handler that exits, are gated."""

import torch.distributed as dist

SHARDS = ("a.bin", "b.bin")


def load(path):
    with open(path) as f:
        return f.read()


def report_failure(path):
    try:
        load(path)
    except OSError:
        dist.barrier()  # expect: collective-under-rank-local-gate


def skip_on_failure():
    for path in SHARDS:
        try:
            load(path)
        except OSError:
            continue
        dist.barrier()  # expect: collective-under-rank-local-gate


def always_synchronises(path):
    try:
        load(path)
    finally:
        dist.barrier()


def reraises(path):
    try:
        load(path)
    except OSError:
        raise
    dist.barrier()


class NothingWaiting(LookupError):
    pass


class Batcher:
    def __init__(self, comm, rounds):
        self.comm = comm
        self.rounds = rounds
        self.waiting = []

    def add(self, request):
        self.waiting.append(request)

    def step(self):
        # A raise its own try catches skips the rest of the try on the ranks that raise.
        try:
            if not self.waiting:
                raise LookupError("nothing waiting")
            total = self.comm.allreduce(1)  # expect: collective-under-rank-local-gate
        except LookupError:
            total = 0
        return total

    def step_in_a_loop(self):
        try:
            for _ in range(self.rounds):
                if not self.waiting:
                    raise KeyError("empty")  # a LookupError: the handler below catches it
                self.comm.allgather(1)  # expect: collective-under-rank-local-gate
        except LookupError:
            pass

    def caught_elsewhere(self):
        # An exception no handler here catches ends that rank: a crash, not a skipped collective.
        try:
            if not self.waiting:
                raise RuntimeError("nothing waiting")
            self.comm.allreduce(len(self.waiting))
        except ValueError:
            pass
        self.comm.Barrier()

    def own_exception(self):
        try:
            if not self.waiting:
                raise NothingWaiting()  # its declared base, LookupError, is handled below
            self.comm.Barrier()  # expect: collective-under-rank-local-gate
        except LookupError:
            pass

    def handler_raises_again(self):
        # The handler passes the exception on: the rank that raised still ends, a crash.
        try:
            if not self.waiting:
                raise ValueError("nothing waiting")
            self.comm.Barrier()
        except ValueError as error:
            raise RuntimeError("step failed") from error
