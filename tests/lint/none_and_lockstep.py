"""Whether a value is set, apart from what it holds; what lockstep code stores; a method that only
bears a collective's name; rank-named parameters of set-up methods.

Engines build per-rank objects (a message queue's writer on one rank and its readers on the
others; a communicator on each rank's own device) and then route on whether they exist.
"""

import torch
import torch.distributed as dist

_TP = None


class Router:
    def __init__(self, group, use_custom, local_rank):
        self.group = group
        self.device = torch.device(f"cuda:{local_rank}")
        self.custom = None
        if use_custom:
            self.custom = CustomReducer(group, self.device)  # a per-device object, set everywhere
        self.stats = None

    def all_reduce(self, tensor):
        if self.custom is None:
            dist.all_reduce(tensor, group=self.group)
            return tensor
        return self.custom.reduce(tensor)

    def lazy_stats(self, tensor):
        # set on first use on every rank alike: a gate that asks only whether it is set
        if self.stats is None:
            dist.all_reduce(tensor, group=self.group)
            self.stats = (tensor, 0)
        return self.stats

    def by_value(self, tensor):
        # what the object is, unlike whether it exists, differs by rank
        if self.device == self.custom.device:
            dist.all_reduce(tensor, group=self.group)  # expect: collective-under-unbalanced-rank-branch
        return tensor

    def destroy(self):
        if self.custom is not None:
            self.custom = None


class CustomReducer:
    def __init__(self, group, device):
        self.group = group
        self.device = device

    def reduce(self, tensor):
        return tensor


class Lazy:
    def __init__(self, group, pending):
        self.group = group
        self.pool = None
        self.pending = pending

    def maybe_open(self):
        if self.pending:
            self.pool = Pool()  # set on the ranks with work only

    def reduce(self, tensor):
        if self.pool is None:
            dist.all_reduce(tensor, group=self.group)  # expect: collective-under-rank-local-gate
        return tensor


class Pool:
    pass


def initialize(group, use_custom, local_rank):
    global _TP
    _TP = Router(group, use_custom, local_rank)


def destroy_model_parallel():
    # a teardown under a test of whether the object exists still runs alike everywhere
    global _TP
    if _TP and _TP is not None:
        _TP.destroy()
    _TP = None


class Deferred:
    """A list only extended with broadcast requests, and cut by its own length, in code that
    issues a collective on every call: every rank holds the same list."""

    def __init__(self, comm, receiver):
        self.comm = comm
        self.receiver = receiver
        self.deferred = []

    def ingest(self, local):
        self.deferred.extend(self.comm.bcast(local, root=0))
        count = len(self.deferred)
        batch = self.deferred[:count]
        del self.deferred[:count]
        for request in batch:
            self.comm.allreduce(request)

    def keep_mine(self, rank):
        # attention DP: a rank keeps the requests assigned to it, so the list is its own
        mine = [r for r in self.comm.bcast(None, root=0) if r.rank == rank]
        if mine:
            self.comm.barrier()  # expect: collective-under-unbalanced-rank-branch


class SyncInfo:
    """An analysed method that only bears a collective's name is followed, not trusted by it."""

    def __init__(self, count):
        self.count = count

    def all_gather(self, device, group, use_all_reduce=False):
        tensor = torch.tensor([self.count], device=device)
        if use_all_reduce:
            dist.all_reduce(tensor, group=group)
        else:
            dist.all_gather_into_tensor(torch.empty(4, device=device), tensor, group=group)


def prepare(server_args, group, count, pending):
    info = SyncInfo(count)
    info.all_gather(device="cpu", group=group, use_all_reduce=server_args.enable_dp_lm_head)
    if pending:
        info.all_gather(device="cpu", group=group)  # expect: collective-under-rank-local-gate


class Worker:
    def __init__(self, rank):
        self.is_leader = rank == 0  # a set-up method's rank is still the rank

    def step(self, meta):
        if self.is_leader:
            dist.broadcast_object_list([meta], src=0)  # expect: collective-under-unbalanced-rank-branch
        return meta
