"""``zeros_like(x)`` takes x's shape, dtype and device, never its values: a tensor whose items a
rank wrote (vLLM's ``in_the_same_node_as``) still gives zeros alike on every rank."""

import torch
import torch.distributed as dist


def same_node(pg, world_size, source_rank=0):
    rank = dist.get_rank(group=pg)
    flags = torch.tensor([0] * world_size, dtype=torch.int32)
    if rank == source_rank:
        flags[rank] = 1
    if isinstance(pg, dist.ProcessGroup):
        dist.all_reduce(flags, group=pg)
        total = flags
    else:
        total = torch.zeros_like(flags)
        for i in range(world_size):
            total += pg.broadcast_obj(flags, src=i)
    return [x == 1 for x in total.tolist()]


def set_up(pg, world_size):
    if all(same_node(pg, world_size)):
        dist.barrier(group=pg)


def shape_of_local_data(pg, pending):
    counts = torch.zeros(pending.qsize())
    counts[0] = 1
    if torch.zeros_like(counts).numel():
        dist.barrier(group=pg)  # expect: collective-under-rank-local-gate


def grown_in_place(pg, pending):
    sizes = []
    sizes.append(pending.qsize())
    if torch.ones_like(sizes).numel() > 1:
        dist.barrier(group=pg)  # expect: collective-under-rank-local-gate


def values_written_stay_local(pg, pending):
    flags = torch.zeros(4)
    flags[0] = pending.qsize()
    if flags.sum():
        dist.barrier(group=pg)  # expect: collective-under-rank-local-gate
