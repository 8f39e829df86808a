"""Rank identity is a role: a branch on it is fine when both sides issue the same collectives."""

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()


def broadcast_config(path):
    if rank == 0:
        config = open(path).read()
        config = comm.bcast(config, root=0)
    else:
        config = comm.bcast(None, root=0)
    if config:
        comm.Barrier()
    return config


def point_to_point(payload):
    if rank == 0:
        comm.send(payload, dest=1)
    elif rank == 1:
        payload = comm.recv(source=0)
    return payload


def only_root_talks(payload):
    if rank == 0:
        print(payload)
        comm.bcast(payload, root=0)  # expect: collective-under-unbalanced-rank-branch


def leaves_early():
    if rank != 0:
        return
    comm.Barrier()  # expect: collective-under-unbalanced-rank-branch


def per_rank_loop():
    for _ in range(rank):
        comm.Barrier()  # expect: collective-under-unbalanced-rank-branch


class Stage:
    def __init__(self, pp_rank, tp_group):
        self.pp_rank = pp_rank
        self.tp_group = tp_group

    def first_stage_reduce(self, value):
        # every member of a tensor-parallel group sits on the same pipeline stage
        if self.pp_rank == 0:
            value = self.tp_group.allreduce(value)
        return value
