from .utils import sync


def step(pending, t):
    if pending:
        sync(t)  # expect: collective-under-rank-local-gate
