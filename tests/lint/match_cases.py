"""A match with no case for every subject has one more path, the fall-through: a rank whose
subject matches no case skips the collectives the cases issue."""

import torch.distributed as dist


class Worker:
    def __init__(self):
        self.inbox = []

    def receive(self, message):
        self.inbox.append(message)

    def no_default(self):
        kind = self.inbox[0] if self.inbox else "idle"
        match kind:
            case "work":
                dist.barrier()  # expect: collective-under-rank-local-gate
            case "control":
                dist.barrier()  # expect: collective-under-rank-local-gate

    def guarded_capture(self):
        match len(self.inbox):
            case 1:
                dist.barrier()  # expect: collective-under-rank-local-gate
            case n if n > 4:
                dist.barrier()  # expect: collective-under-rank-local-gate

    def wildcard(self):
        kind = self.inbox[0] if self.inbox else "idle"
        match kind:
            case "work":
                dist.barrier()
            case _:
                dist.barrier()

    def capture(self):
        match len(self.inbox):
            case 0:
                dist.barrier()
            case "x" | _:
                dist.barrier()
