"""Early return, break and continue under rank-local conditions skip the collectives after them."""

import torch.distributed as dist


class Worker:
    def __init__(self, world_size, group):
        self.world_size = world_size
        self.group = group
        self.pending = []

    def add(self, item):
        self.pending.append(item)

    def step(self, tensor):
        if not self.pending:
            return None
        dist.all_reduce(tensor, group=self.group)  # expect: collective-under-rank-local-gate
        return tensor

    def single_rank_shortcut(self, tensor):
        if self.world_size == 1:
            return tensor
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def balanced_exit(self, payload):
        if not self.pending:
            dist.all_gather_object([None] * self.world_size, None)
            return None
        dist.all_gather_object([None] * self.world_size, payload)
        return payload

    def per_request(self, requests, tensor):
        for request in requests:
            if request.skip:
                continue
            dist.all_reduce(tensor)  # expect: collective-under-rank-local-gate

    def until_full(self, requests, tensor):
        for request in range(self.world_size):
            dist.barrier()  # expect: collective-under-rank-local-gate
            if len(self.pending) > 8:
                break


class Receiver:
    """A rank that leaves a loop early goes on after it: what the loop built after the exit's
    gate (a count, a list, a flag a helper returns) is this rank's own."""

    def __init__(self, inbox, comm):
        self.inbox = inbox
        self.comm = comm

    def counted(self):
        n = 0
        for _ in range(8):
            if self.inbox.empty():
                break
            n += 1
        if n:
            self.comm.barrier()  # expect: collective-under-rank-local-gate

    def drained(self):
        got = []
        while True:
            try:
                got.append(self.inbox.get_nowait())
            except Exception:
                break
        if not got:
            return
        self.comm.allgather(len(got))  # expect: collective-under-rank-local-gate

    def skipped(self):
        n = 0
        for _ in range(8):
            if self.inbox.empty():
                continue
            n += 1
        if n:
            self.comm.barrier()  # expect: collective-under-rank-local-gate

    def _any(self):
        found = False
        for _ in range(4):
            if self.inbox.empty():
                break
            found = True
        return found

    def through_a_helper(self):
        if self._any():
            self.comm.barrier()  # expect: collective-under-rank-local-gate

    def counted_alike(self, items):
        n = 0
        for item in items:
            if item is None:
                break
            n += 1
        self.comm.allgather(n)
        return n
