"""Later operands of and/or, and the branches of a conditional expression, are gated too."""

from mpi4py import MPI

comm = MPI.COMM_WORLD


def and_or(pending):
    if pending and comm.allgather(len(pending)):  # expect: collective-under-rank-local-gate
        return True
    return False


def conditional_expression(pending):
    sizes = comm.allgather(len(pending)) if pending else None  # expect: collective-under-rank-local-gate
    root_value = comm.bcast(pending, root=0) if comm.rank == 0 else comm.bcast(None, root=0)
    return sizes, root_value
