"""The core's SPMD programs (tests/spmd/core_*.py) under mpiexec, each bounded by a timeout.

Every rank checks its own results and prints a marker; a failed check on one rank aborts all of
them (``python -m mpi4py``). The same programs run in CI's pure-Python leg.
"""

from __future__ import annotations

import pytest

SIZES = [1, 2, 4]


@pytest.mark.parametrize("timeout", ["none", "30"])
@pytest.mark.parametrize("nranks", SIZES)
def test_ops_match_mpi4py(spmd, nranks, timeout):
    spmd("core_ops", nranks, timeout=240, args=[timeout])


@pytest.mark.parametrize("nranks", [2, 4])
def test_errors(spmd, nranks):
    spmd("core_errors", nranks, timeout=180)


@pytest.mark.parametrize("nranks", [2, 4])
def test_timeouts(spmd, nranks):
    # The program ends with os._exit after its markers; 90 s bounds a wrongly blocking rank.
    spmd("core_timeout", nranks, timeout=90, uniform=False)
