"""Teardown resets what set-up stored: `destroy()` runs on every rank, when the object's service
ends, so the None it stores is the same on every rank (vLLM's CudaCommunicator.destroy)."""

import time

import torch.distributed as dist


class Communicator:
    def __init__(self, group, use_custom):
        self.group = group
        self.custom = object() if use_custom else None
        self.stamp = None
        self.pending = []

    def all_reduce(self, tensor):
        if self.custom is not None:
            return tensor
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def stamped_reduce(self, tensor):
        if self.stamp is None:
            dist.all_reduce(tensor, group=self.group)  # expect: collective-under-rank-local-gate
        return tensor

    def drained_reduce(self, tensor):
        if self.pending:
            dist.all_reduce(tensor, group=self.group)  # expect: collective-under-rank-local-gate
        return tensor

    def destroy(self):
        if self.custom is not None:
            self._release()
        # what a teardown stores from a rank-local value is still per rank
        self.stamp = time.time()
        # a change in place keeps the history of every call before it
        self.pending.clear()

    def _release(self):
        self.custom = None

    def record(self, item):
        self.pending.append(item)


class Stream:
    def __init__(self, group):
        self.group = group
        self.open = True

    def receive(self, item):
        # closed by the ranks that received the end marker: not a teardown every rank runs
        if item is None:
            self.close()

    def close(self):
        self.open = False

    def flush(self, tensor):
        if self.open:
            dist.all_reduce(tensor, group=self.group)  # expect: collective-under-rank-local-gate


class Workspace:
    def __init__(self, group):
        self.group = group
        self.buffer = object()

    def destroy(self):
        self.buffer = None

    def reduce(self, tensor):
        if self.buffer is None:
            return tensor
        dist.all_reduce(tensor, group=self.group)
        return tensor


class Owner:
    def __init__(self):
        self.workspace = None

    def ensure(self, group):
        if self.workspace is None:
            self.workspace = Workspace(group)

    def shutdown(self):
        # a teardown releasing what it holds: the workspace's destroy ends alike everywhere
        if self.workspace is not None:
            self.workspace.destroy()


class Handle:
    def __init__(self, group):
        self.group = group
        self.handle = group

    def reduce(self, tensor):
        if self.handle is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def destroy(self):
        # deleting the attribute resets it, as storing None would (vLLM's `del self.cpu_group`)
        del self.handle


class Evicting:
    def __init__(self, group):
        self.group = group
        self.cache = object()

    def evict(self):
        # outside a teardown, a deleted attribute is per-rank state like an assigned one
        del self.cache

    def reduce(self, tensor):
        if self.cache is not None:
            dist.all_reduce(tensor, group=self.group)  # expect: collective-under-rank-local-gate
        return tensor
