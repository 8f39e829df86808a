from . import helpers
from . import helpers as renamed


def step(pending, t):
    if pending:
        helpers.vote(t)  # expect: collective-under-rank-local-gate
    if pending:
        renamed.vote(t)  # expect: collective-under-rank-local-gate
