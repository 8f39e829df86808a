"""Typed point to point over MPI: tests/spmd/compat_p2p.py at 2 and 4 ranks, bounded."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("nranks", [2, 4])
def test_p2p_over_mpi(spmd, nranks):
    spmd("compat_p2p", nranks, timeout=120)
