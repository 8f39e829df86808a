"""A try's else runs only where no handler ran, a loop's else only where no break left the loop:
a rank-local exception or break skips the collectives in them."""

import torch.distributed as dist


class Worker:
    def __init__(self, sock, rounds):
        self.sock = sock
        self.rounds = rounds
        self.pending = {}
        self.waiting = []

    def add(self, key, request):
        self.pending[key] = request
        self.waiting.append(key)

    def receive(self):
        try:
            requests = self.sock.recv_pyobj()
        except OSError:
            requests = None
        else:
            dist.barrier()  # expect: collective-under-rank-local-gate
        return requests

    def lookup(self, key):
        try:
            request = self.pending[key]
        except KeyError:
            request = None
        else:
            dist.all_reduce(request)  # expect: collective-under-rank-local-gate
        return request

    def first_waiting(self):
        for slot in range(self.rounds):
            if self.waiting and self.waiting[0] == slot:
                break
        else:
            dist.barrier()  # expect: collective-under-rank-local-gate

    def count_up(self):
        step = 0
        while step < self.rounds:
            if step in self.waiting:
                break
            step += 1
        else:
            dist.barrier()  # expect: collective-under-rank-local-gate

    def reraises(self, key):
        try:
            request = self.pending[key]
        except KeyError:
            raise RuntimeError(key)
        else:
            dist.barrier()
        return request

    def symmetric_break(self):
        for slot in range(self.rounds):
            if slot == 2:
                break
        else:
            dist.barrier()
