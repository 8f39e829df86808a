"""A tensor a function hands to an all-reduce or a broadcast has one dtype, shape and device on
every rank (the collective needs it): a test of those picks the same route everywhere. Its
values, and layout such as contiguity, are the rank's own."""

import torch
import torch.distributed as dist

MAX_BYTES = 1 << 20


def all_reduce(tensor, group=None):
    if tensor.is_cpu or tensor.nbytes > MAX_BYTES:
        dist.all_reduce(tensor, group=group)
        return tensor
    if tensor.device.type == "cuda" and tensor.dim() == 2 and tensor.shape[0] > 8:
        custom_reduce(tensor, group)
        return tensor
    if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
        dist.barrier(group=group)
    return tensor


def custom_reduce(tensor, group):
    dist.all_reduce(tensor, group=group)


def reduce_if_positive(tensor, group=None):
    if tensor.sum() > 0:
        dist.all_reduce(tensor, group=group)  # expect: collective-under-rank-local-gate


def reduce_if_contiguous(tensor, group=None):
    if tensor.is_contiguous():
        dist.all_reduce(tensor, group=group)  # expect: collective-under-rank-local-gate
    else:
        dist.barrier(group=group)  # expect: collective-under-rank-local-gate


def reduce_replaced(tensor, rows, group=None):
    tensor = rows
    if tensor.shape[0] > 8:
        dist.barrier(group=group)  # expect: collective-under-rank-local-gate
    dist.all_reduce(tensor, group=group)


def gather_objects(tensor, group=None):
    # an object all-gather puts no shape on what each rank hands in
    if tensor.shape[0] > 8:
        dist.barrier(group=group)  # expect: collective-under-rank-local-gate
    out = [None]
    dist.all_gather_object(out, tensor, group=group)
    return out


def fits(tensor):
    return tensor.numel() * tensor.element_size() <= MAX_BYTES


def all_reduce_or_broadcast(tensor, group=None):
    # The helper's parameter is the same tensor at its every analysed call: its size is too.
    if fits(tensor):
        dist.all_reduce(tensor, group=group)
        return tensor
    dist.broadcast(tensor, src=0, group=group)
    return tensor


def count(tensor):
    return tensor.numel()


def barrier_if_large(tensor, rows, group=None):
    # count() is also called with a tensor no collective takes: its result is rank-local there.
    if count(rows) > 8:
        dist.barrier(group=group)  # expect: collective-under-rank-local-gate
    if count(tensor) > 8:
        dist.barrier(group=group)  # expect: collective-under-rank-local-gate
    dist.all_reduce(tensor, group=group)


def gather_rows(tensor, tp_group):
    # an all-gather of a tensor (not of objects, not uneven) needs one shape on every rank too
    if tensor.shape[0] > 8:
        tp_group.barrier()
    return tp_group.all_gather(tensor, dim=0)


def sum_objects(value, comm):
    # mpi4py's lowercase allreduce pickles any object: nothing about shapes is agreed
    if value.shape[0] > 8:
        comm.Barrier()  # expect: collective-under-rank-local-gate
    return comm.allreduce(value)


class Gatherer:
    def __init__(self, comm, slot_bytes):
        self.comm = comm
        self.slot_bytes = slot_bytes

    def __call__(self, local, out):
        # the tensor is not the first argument when the communicator is
        if local.nbytes <= self.slot_bytes:
            dist.barrier()
        nvlink_comm.all_gather_push(self.comm, local, out)
        return out


class nvlink_comm:  # noqa: N801 -- stands for an extension module's functions
    @staticmethod
    def all_gather_push(comm, local, out):
        comm.Allgather(local, out)
