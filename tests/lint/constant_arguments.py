"""A helper whose arm its callers pick with a constant is read for the constant each call passes:
`self._share(x, True)` broadcasts and `self._share(None, False)` does not, so a rank branch
between them is unbalanced, and a per-rank gate over a call whose constant skips the collective
gates nothing (SGLang's `writing_check(write_back=True)`)."""

import torch.distributed as dist


class Worker:
    def __init__(self, group, rank):
        self.group = group
        self.rank = rank
        self.pending = []

    def add(self, request):
        self.pending.append(request)

    def _share(self, obj, is_src):
        if is_src:
            box = [obj]
            dist.broadcast_object_list(box, src=0, group=self.group)
            return box[0]
        return None

    def _share_both(self, obj, is_src):
        box = [obj if is_src else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _poll(self, blocking=False, count=None):
        if blocking:
            self.pending.clear()
            return 0
        if count is None:
            total = [len(self.pending)]
            dist.all_reduce(total, group=self.group)
            count = total[0]
        return count

    def source_only(self, batch):
        if self.rank == 0:
            out = self._share(batch, True)  # expect: collective-under-unbalanced-rank-branch
        else:
            out = self._share(None, is_src=False)  # expect: collective-under-unbalanced-rank-branch
        return out

    def both_sides(self, batch):
        if self.rank == 0:
            out = self._share_both(batch, True)
        else:
            out = self._share_both(None, is_src=False)
        return out

    def same_constant(self, batch):
        if self.rank == 0:
            out = self._share(batch, True)
        else:
            out = self._share(None, True)
        return out

    def blocking_drain(self):
        if self.pending:
            self._poll(blocking=True)
        return self._poll()

    def counted_drain(self):
        if self.pending:
            self._poll(count=3)
        return self._poll()

    def voting_drain(self):
        if self.pending:
            self._poll()  # expect: collective-under-rank-local-gate
        return self._poll()
