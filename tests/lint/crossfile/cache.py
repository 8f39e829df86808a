"""A host cache whose progress vote runs only for requests this rank is prefetching."""

import torch
import torch.distributed as dist


class PrefetchCache:
    def __init__(self, group):
        self.group = group
        self.ongoing = {}

    def start(self, request):
        self.ongoing[request] = 0

    def _vote_done(self, done):
        flag = torch.tensor([int(done)])
        dist.all_reduce(flag, group=self.group)
        return flag.item() == 1

    def check_progress(self, request):
        if request not in self.ongoing:
            return True
        return self._vote_done(self.ongoing[request] > 3)  # expect: collective-under-rank-local-gate
