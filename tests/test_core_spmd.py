"""The core's SPMD programs (tests/spmd/), each at 1, 2 and 4 ranks under mpiexec.

Every run is bounded by a timeout, so a hang fails the test; every rank checks its own results
and prints a marker, and a failed check on one rank aborts all of them (``python -m mpi4py``).
"""

from __future__ import annotations

import pytest

SIZES = [1, 2, 4]


@pytest.mark.parametrize("nranks", SIZES)
def test_ops(spmd, nranks):
    spmd("core_ops", nranks, timeout=120)


@pytest.mark.parametrize("nranks", SIZES)
def test_errors(spmd, nranks):
    spmd("core_errors", nranks, timeout=120)


@pytest.mark.parametrize("nranks", [2, 4])
def test_timeout(spmd, nranks):
    # The program ends with os._exit after its markers; 60 s bounds a wrongly blocking rank.
    spmd("core_timeout", nranks, timeout=60, uniform=False)


@pytest.mark.parametrize("nranks", SIZES)
def test_property_matches_mpi4py(spmd, nranks):
    result = spmd("core_property", nranks, timeout=90)
    assert "hypothesis: derandomized" in result.stdout
