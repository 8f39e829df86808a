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
