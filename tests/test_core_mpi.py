"""The core's SPMD programs (tests/spmd/core_*.py) under mpiexec, each bounded by a timeout.

Every rank checks its own results and prints a marker; a failed check on one rank aborts all of
them (``python -m mpi4py``). The same programs run in CI's pure-Python leg. The MPI
transport's waits are tested in process, on stand-in requests.
"""

from __future__ import annotations

import time
import types

import pytest

from typedcoll.core.transport import TransportTimeout

SIZES = [1, 2, 4]


@pytest.mark.parametrize("timeout", ["none", "30"])
@pytest.mark.parametrize("nranks", SIZES)
def test_ops_match_mpi4py(spmd, nranks, timeout):
    spmd("core_ops", nranks, timeout=240, args=[timeout])


@pytest.mark.parametrize("timeout", ["none", "30"])
def test_random_array_allgathers_match_mpi4py(spmd, timeout):
    spmd("core_arrays", 4, timeout=180, args=[timeout])


@pytest.mark.parametrize("nranks", [2, 4])
def test_errors(spmd, nranks):
    spmd("core_errors", nranks, timeout=180)


@pytest.mark.parametrize("nranks", [2, 4])
def test_timeouts(spmd, nranks):
    # The program ends with os._exit after its markers; 90 s bounds a wrongly blocking rank.
    spmd("core_timeout", nranks, timeout=90, uniform=False)


def test_a_communicator_left_alone_hands_no_message_to_a_later_one(spmd):
    # Ends with os._exit after its markers (abandoned exchanges stay pending in MPI).
    spmd("core_release", 4, timeout=120)


@pytest.mark.parametrize("program,args", [("core_ops", ["none"]), ("core_ops", ["30"]),
                                          ("core_errors", []), ("core_arrays", ["none"])])
def test_the_c_and_python_paths_meet_in_one_job(spmd, program, args):
    """Half the ranks on the C fast path, half on the pure-Python steps, in one job: they speak
    one protocol and reach the same verdicts (the programs check every rank's results and
    messages, and compare them across ranks)."""
    spmd(program, 4, timeout=240, args=args,
         rank_env=[{"TYPEDCOLL_PURE_PYTHON": "1"} if r % 2 else {} for r in range(4)])


@pytest.mark.parametrize("program,args", [("core_ops", ["30"]), ("core_errors", [])])
def test_both_paths_meet_where_the_last_round_of_the_exchange_is_partial(spmd, program, args):
    """6 ranks, no power of two: the exchange's last round (distance 4) carries 2 of the 4
    slots a full round would (the C engine and its Python twin size those messages alike)."""
    spmd(program, 6, timeout=300, args=args,
         rank_env=[{"TYPEDCOLL_PURE_PYTHON": "1"} if r % 2 else {} for r in range(6)])


class _Requests:
    """Stands for MPI's requests in ``mpi_waits``: complete at the ``done``-th test."""

    def __init__(self, done: int) -> None:
        self.tests, self.done = 0, done
        self.Request = self  # mpi_waits calls MPI.Request.Testall(requests)

    def Testall(self, requests: object) -> bool:  # noqa: N802 (MPI's name)
        self.tests += 1
        return self.tests >= self.done


def _waits(monkeypatch, done: int, slept: list):
    from typedcoll.transports import mpi_waits
    fake = _Requests(done)
    monkeypatch.setattr(mpi_waits, "MPI", fake)
    monkeypatch.setattr(mpi_waits, "_YIELD_SECONDS", 0.0)
    monkeypatch.setattr(mpi_waits, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=slept.append))
    return mpi_waits, fake


def test_a_wait_where_every_rank_is_present_yields_and_never_sleeps(monkeypatch):
    # MPICH moves a large message only inside MPI calls, a piece per test: the 2 ms sleeps
    # between tests of a timed wait made a 24 MB all-gather at 4 ranks take 3.7 s where the
    # blocking form took 0.13 s. MPI's own collectives after an agreed verdict (every rank is
    # in them) yield between tests instead, up to the deadline.
    slept: list = []
    mpi_waits, fake = _waits(monkeypatch, 5000, slept)
    mpi_waits.wait_all([], time.monotonic() + 60, present=True)
    assert fake.tests == 5000 and slept == []
    # a peer that left mid-transfer: still bounded by the deadline
    mpi_waits, fake = _waits(monkeypatch, 10 ** 12, slept)
    with pytest.raises(TransportTimeout):
        mpi_waits.wait_all([], time.monotonic() + 0.05, present=True)
    assert slept == []
    mpi_waits._ABANDONED.pop()
    # waiting for a rank that may never come (the exchange) sleeps with backoff
    mpi_waits, fake = _waits(monkeypatch, 5000, slept)
    mpi_waits.wait_all([], time.monotonic() + 60)
    assert fake.tests == 5000 and slept and max(slept) <= mpi_waits._MAX_SLEEP
