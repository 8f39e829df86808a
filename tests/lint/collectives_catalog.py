"""Each recognised family of collectives, under the same rank-local gate."""

import torch
import torch.distributed as dist
from mpi4py import MPI
from torch.distributed import all_reduce


def mpi_methods(comm, buf, pending):
    if pending:
        comm.allgather(buf)  # expect: collective-under-rank-local-gate
        comm.Allreduce(buf, buf)  # expect: collective-under-rank-local-gate
        comm.Bcast(buf, root=0)  # expect: collective-under-rank-local-gate
        comm.Iallreduce(buf, buf)  # expect: collective-under-rank-local-gate
        comm.reduce(buf, root=0)  # expect: collective-under-rank-local-gate
        comm.Split(0, 0)  # expect: collective-under-rank-local-gate
        MPI.COMM_WORLD.barrier()  # expect: collective-under-rank-local-gate


def torch_functions(t, objs, pending):
    if pending:
        dist.all_gather_object(objs, t)  # expect: collective-under-rank-local-gate
        dist.broadcast_object_list(objs, src=0)  # expect: collective-under-rank-local-gate
        torch.distributed.all_reduce(t)  # expect: collective-under-rank-local-gate
        all_reduce(t)  # expect: collective-under-rank-local-gate
        dist.barrier()  # expect: collective-under-rank-local-gate
        dist.new_group([0, 1])  # expect: collective-under-rank-local-gate


def typedcoll_calls(comm, flush, pending):
    if pending:
        comm.allgather(1)  # expect: collective-under-rank-local-gate
        comm.split(0)  # expect: collective-under-rank-local-gate
        comm.dup()  # expect: collective-under-rank-local-gate
        flush.flush(step=1)  # expect: collective-under-rank-local-gate
        flush.post("stats", 1)


def point_to_point(comm, pending):
    if pending:
        comm.send(pending, dest=1)  # expect: collective-under-rank-local-gate


def text_split_beside_a_communicator_split(comm, line, pending):
    if pending:
        line.split(":")
        comm.split(1, 0)  # expect: collective-under-rank-local-gate
