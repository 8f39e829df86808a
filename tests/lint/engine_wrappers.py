# lint-config: {"wrappers": ["sync_batch_stats", "*_tp_vote"]}
"""Engine wrappers declared by configuration; the defaults cover *_allgather and broadcast_pyobj.

A wrapper defined in the analysed files is followed instead: what it does decides.
"""

from engine.utils import broadcast_pyobj


class Loop:
    def __init__(self, dist, stats, group):
        self.dist = dist
        self.stats = stats
        self.group = group
        self.requests = []

    def add(self, request):
        self.requests.append(request)

    def step(self):
        if self.requests:
            self.stats.sync_batch_stats(len(self.requests))  # expect: collective-under-rank-local-gate
            self.dist.tp_allgather(len(self.requests))  # expect: collective-under-rank-local-gate
            broadcast_pyobj(self.requests, 0, self.group)  # expect: collective-under-rank-local-gate
            self.stats.scheduler_tp_vote(True)  # expect: collective-under-rank-local-gate
            self.stats.record(len(self.requests))
            local_allgather(self.requests)
            counted_allgather(self.dist, len(self.requests))  # expect: collective-under-rank-local-gate


def local_allgather(items):
    """Named like a collective, but only copies: followed, nothing reached."""
    return [list(items)]


def counted_allgather(dist, count):
    return dist.allgather(count)
