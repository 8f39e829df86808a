"""An in-place collective leaves its result in the buffers that receive it; the buffers it
sends keep the rank's own data. A gate on a send buffer after the call is still rank-local."""

import torch
import torch.distributed as dist
from mpi4py import MPI


def dp_padding(batch, world_size, hidden):
    local_num_tokens = torch.tensor([len(batch)])
    global_num_tokens = torch.empty(world_size, dtype=torch.int64)
    dist.all_gather_into_tensor(global_num_tokens, local_num_tokens)
    if local_num_tokens.item() > 0:  # this rank's own count: an empty batch skips the reduce
        dist.all_reduce(hidden)  # expect: collective-under-rank-local-gate
    if global_num_tokens.sum() > 0:  # every rank's counts, the same everywhere
        dist.all_reduce(hidden)
    return global_num_tokens


def gathered_list(batch, world_size, hidden):
    mine = torch.tensor([len(batch)])
    everyone = [torch.empty(1) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    if mine.item() > 0:
        dist.all_reduce(hidden)  # expect: collective-under-rank-local-gate
    if max(t.item() for t in everyone) > 0:
        dist.all_reduce(hidden)


def mpi_buffers(comm, pending):
    send = torch.tensor([len(pending)]).numpy()
    recv = torch.empty(1).numpy()
    comm.Allreduce(send, recv, op=MPI.MAX)
    if send[0] > 0:
        comm.Barrier()  # expect: collective-under-rank-local-gate
    if recv[0] > 0:
        comm.Barrier()
    counts = torch.empty(comm.size).numpy()
    comm.Allgather(send, recvbuf=counts)
    if counts.sum() > 0:
        comm.Barrier()


def sent(pending):
    count = torch.tensor([len(pending)])
    dist.send(count, dst=1)
    if count.item() > 0:
        dist.barrier()  # expect: collective-under-rank-local-gate


def by_keyword(pending, hidden):
    flag = torch.tensor([len(pending)])
    dist.all_reduce(tensor=flag)  # the output, named: every rank's sum
    if flag.item() > 0:
        dist.all_reduce(hidden)
    mine = [len(pending)]
    dist.send_object_list(object_list=mine, dst=1)  # sent, not received: still this rank's
    if mine[0] > 0:
        dist.barrier()  # expect: collective-under-rank-local-gate
