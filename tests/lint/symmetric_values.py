"""Values every rank holds alike gate nothing: constants, set-up configuration, collective results."""

import torch
import torch.distributed as dist
from mpi4py import MPI

ROUNDS = 3
comm = MPI.COMM_WORLD


class Trainer:
    def __init__(self, config, world_size):
        self.config = config
        self.world_size = world_size
        self.log_every = config.log_every
        self.history = []

    def record(self, loss):
        self.history.append(loss)

    def step(self, local_loss):
        if self.log_every > 0:
            comm.allreduce(local_loss)
        for _ in range(self.world_size):
            comm.Barrier()
        votes = comm.allgather(local_loss > 1.0)
        if any(votes):
            comm.bcast("diverged", root=0)
        total = sum(votes)
        if total > ROUNDS:
            comm.Barrier()
        decision = comm.bcast(local_loss if comm.rank == 0 else None, root=0)
        if decision:
            comm.Barrier()

    def in_place(self, flag):
        t = torch.tensor([int(flag)])
        dist.all_reduce(t)
        if t.item() > 0:
            dist.barrier()

    def per_rank_history(self):
        if self.history:
            comm.Barrier()  # expect: collective-under-rank-local-gate

    def own_slot(self, counts):
        gathered = comm.allgather(counts)
        if gathered[comm.rank] > 0:
            comm.Barrier()  # expect: collective-under-unbalanced-rank-branch
