"""Calls that reach a collective through the call graph, gated in the caller."""

from mpi4py import MPI


def sync_flags(comm, flag):
    return any(comm.allgather(flag))


def two_levels_down(comm, flag):
    return sync_flags(comm, flag)


class Executor:
    def __init__(self, comm):
        self.comm = comm
        self.waiting = []

    def submit(self, request):
        self.waiting.append(request)

    def _vote(self, flag):
        return sync_flags(self.comm, flag)

    def _publish(self):
        self.comm.bcast(None, root=0)

    def step(self):
        if self.waiting:
            self._vote(True)  # expect: collective-under-rank-local-gate
        self._publish()

    def nested(self):
        def flush():
            self.comm.Barrier()

        for request in self.waiting:
            flush()  # expect: collective-under-rank-local-gate

    def deep(self):
        if len(self.waiting) > 3:
            two_levels_down(self.comm, False)  # expect: collective-under-rank-local-gate


def main():
    executor = Executor(MPI.COMM_WORLD)
    executor.step()
    executor.deep()


class LambdaVote:
    def __init__(self, comm):
        self.comm = comm
        self.pending = []

    def add(self, request):
        self.pending.append(request)

    def step(self):
        vote = lambda: self.comm.allgather(1)  # noqa: E731
        if self.pending:
            vote()  # expect: collective-under-rank-local-gate
        every_rank = lambda flag: self.comm.allgather(flag)  # noqa: E731
        every_rank(bool(self.pending))
