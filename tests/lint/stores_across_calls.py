"""A value every rank received is still per rank once only some ranks store it: under a gate
that issues no collective itself (the value came from before it), or in a helper that only some
ranks call. A helper that reaches a collective under such a gate is a finding at its call, and
the state it keeps is not reported again."""

import torch
import torch.distributed as dist


def probe_passes(device):
    free, _ = torch.cuda.mem_get_info(device)  # this rank's own device
    return free > 1 << 30


def agreed_size(group, device):
    if not probe_passes(device):
        return None
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, device, group=group)  # expect: collective-under-rank-local-gate
    return len(sizes)


class Worker:
    def __init__(self, group):
        self.group = group
        self.chosen = None
        self.noted = None
        self.shared = None
        self.sync = None

    def _note(self, value):
        self.noted = value

    def step(self, local_flag):
        value = [local_flag]
        dist.broadcast_object_list(value, src=0, group=self.group)
        if local_flag:
            self.chosen = value[0]
        if local_flag:
            self._note(value[0])
        self._keep(value[0])

    def _keep(self, value):
        self.shared = value

    def both_arms(self, local_flag):
        if local_flag:
            out = [1]
            dist.broadcast_object_list(out, src=0, group=self.group)
        else:
            out = [None]
            dist.broadcast_object_list(out, src=0, group=self.group)
        self.shared = out[0]

    def later(self):
        if self.chosen is None:
            dist.barrier(group=self.group)  # expect: collective-under-rank-local-gate
        if self.noted is None:
            dist.barrier(group=self.group)  # expect: collective-under-rank-local-gate
        if self.shared is None:
            dist.barrier(group=self.group)

    def setup_buffers(self, device):
        size = agreed_size(self.group, device)
        if size is None:
            return
        dist.barrier(group=self.group)  # expect: collective-under-rank-local-gate

    def _lazy_sync(self):
        if self.sync is None:
            self.sync = [0]
            dist.all_reduce(self.sync, group=self.group)
            return False
        self.sync = None
        return True

    def progress(self, local_flag):
        if local_flag:
            return self._lazy_sync()  # expect: collective-under-rank-local-gate
        return False
