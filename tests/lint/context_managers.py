"""A context manager's collectives run where its `with` runs: `__enter__` and `__exit__` of an
analysed class (and a generator under `contextlib.contextmanager`) are part of the branch that
enters it."""

import contextlib

import torch.distributed as dist


class Synced:
    """Every rank waits for the others on the way in and on the way out."""

    def __init__(self, group):
        self.group = group

    def __enter__(self):
        dist.barrier(group=self.group)
        return self

    def __exit__(self, *exc):
        dist.barrier(group=self.group)
        return False


class Timed:
    """No collective: entering it on one rank alone is harmless."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class AsyncSynced:
    def __init__(self, group):
        self.group = group

    async def __aenter__(self):
        dist.barrier(group=self.group)
        return self

    async def __aexit__(self, *exc):
        return False


@contextlib.contextmanager
def synced(group):
    dist.barrier(group=group)
    yield
    dist.barrier(group=group)


class Worker:
    def __init__(self, group, rank):
        self.group = group
        self.rank = rank

    def leader_only(self, batch):
        if self.rank == 0:
            with Synced(self.group):  # expect: collective-under-unbalanced-rank-branch
                batch.append(1)
        return batch

    def every_rank(self, batch):
        with Synced(self.group):
            if self.rank == 0:
                batch.append(1)
        return batch

    def both_arms(self, batch):
        if self.rank == 0:
            with Synced(self.group):
                batch.append(1)
        else:
            with Synced(self.group):
                batch.append(2)
        return batch

    def timed_on_the_leader(self, batch):
        if self.rank == 0:
            with Timed():
                batch.append(1)
        return batch

    async def leader_only_async(self, batch):
        if self.rank == 0:
            async with AsyncSynced(self.group):  # expect: collective-under-unbalanced-rank-branch
                batch.append(1)
        return batch

    def leader_only_generator(self, batch):
        if self.rank == 0:
            with synced(self.group):  # expect: collective-under-unbalanced-rank-branch
                batch.append(1)
        return batch
