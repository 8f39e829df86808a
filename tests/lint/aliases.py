"""A collective reached through a name bound to it: a bound method, a ``functools.partial``, or
a ``self`` attribute set to either; what the name runs decides, as for a lambda."""

import functools
from functools import partial

import torch.distributed as dist


class Coordinator:
    def __init__(self, comm, dp_group):
        self.comm = comm
        self.dp_group = dp_group
        self._vote = comm.allreduce
        self._gather = partial(self._gather_sizes, tag=1)
        self.pending = []

    def submit(self, request):
        self.pending.append(request)

    def _gather_sizes(self, size, tag):
        return self.comm.allgather((tag, size))

    def partial_vote(self, tensor):
        vote = functools.partial(dist.all_reduce, group=self.dp_group)
        if self.pending:
            vote(tensor)  # expect: collective-under-rank-local-gate
        vote(tensor)  # every rank: no gate

    def bound_vote(self):
        gather = self.comm.allgather
        if self.pending:
            gather(len(self.pending))  # expect: collective-under-rank-local-gate

    def stored_vote(self):
        if self.pending:
            self._vote(len(self.pending))  # expect: collective-under-rank-local-gate

    def stored_partial(self):
        if self.pending:
            self._gather(len(self.pending))  # expect: collective-under-rank-local-gate

    def symmetric(self):
        sizes = self._gather(len(self.pending))
        if max(sizes)[1]:
            self._vote(1)
        log = self.pending.append  # not a collective: calling it gates nothing
        if self.pending:
            log(None)
