"""The same operation on two communicators is two different collectives: a branch that picks one
communicator on some ranks and another on the rest leaves each group's peers waiting."""

import torch.distributed as dist
from torch.distributed import ProcessGroup


class Worker:
    def __init__(self, tp_comm, dp_comm, tp_group, dp_group, use_tp):
        self.use_tp = use_tp
        self.tp_comm = tp_comm
        self.dp_comm = dp_comm
        self.tp_group = tp_group
        self.dp_group = dp_group
        self.pending = []

    def add(self, request):
        self.pending.append(request)

    def step(self):
        if self.pending:
            self.tp_comm.allgather(len(self.pending))  # expect: collective-under-rank-local-gate
        else:
            self.dp_comm.allgather(0)  # expect: collective-under-rank-local-gate

    def torch_groups(self, tensor):
        if self.pending:
            dist.all_reduce(tensor, group=self.tp_group)  # expect: collective-under-rank-local-gate
        else:
            dist.all_reduce(tensor, group=self.dp_group)  # expect: collective-under-rank-local-gate

    def same_communicator(self):
        if self.pending:
            self.tp_comm.allgather(len(self.pending))
        else:
            self.tp_comm.allgather(0)

    def same_group(self, tensor):
        if self.pending:
            dist.all_reduce(tensor, group=self.tp_group)
        else:
            dist.all_reduce(tensor * 0, group=self.tp_group)

    def default_group(self, tensor):
        # Only communicators written out on both sides are compared: tp_group may be the world.
        if self.pending:
            dist.all_reduce(tensor, group=self.tp_group)
        else:
            dist.all_reduce(tensor)

    def through_a_helper(self):
        # Names in another function are not comparable with this one's: sync's comm may be
        # self.tp_comm.
        if self.pending:
            sync(self.tp_comm, len(self.pending))
        else:
            self.tp_comm.allgather(0)

    def helper_against_a_choice(self):
        # Every path of the second side matches the first: sync names no communicator here.
        if self.pending:
            sync(self.tp_comm, len(self.pending))
        elif self.use_tp:
            self.tp_comm.allgather(0)
        else:
            self.dp_comm.allgather(0)


def sync(comm, value):
    return comm.allgather(value)


def exchange_name(pg, name):
    # A group every member passes is of one kind on all of them: a test of its type (or of
    # whether a rank got one at all) is taken alike by every rank that takes part.
    if isinstance(pg, ProcessGroup):
        box = [name]
        dist.broadcast_object_list(box, src=0, group=pg)
        return box[0]
    return pg.broadcast_obj(name, src=0)


def reduce_if_member(tensor, group):
    if group is not None:
        reduce_on(tensor, group)
    return tensor


def reduce_on(tensor, group):
    dist.all_reduce(tensor, group=group)


def reduce_some(tensor, group, count):
    # the group is symmetric, the count a parameter nobody analysed passes
    for _ in range(count):
        dist.all_reduce(tensor, group=group)  # expect: collective-under-rank-local-gate


def barrier_when_probed(comm):
    # the communicator is symmetric; what a probe on it answers is not
    if comm.Iprobe(source=0):
        comm.Barrier()  # expect: collective-under-rank-local-gate
