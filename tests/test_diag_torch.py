"""Hang reports over gloo with no setup (the question goes through the group's Store), and what
a dead gloo peer makes its peers raise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

pytest.importorskip("torch.distributed")

SPMD = Path(__file__).resolve().parent / "spmd"
REPO = Path(__file__).resolve().parent.parent


def run_gloo(program: str, size: int) -> List[Tuple[int, str]]:
    """Run ``tests/spmd/<program>.py RANK SIZE PORT`` in ``size`` processes: each one's (exit
    status, output), in rank order; the test fails if any is still running after the limit."""
    from typedcoll.transports.gloo import free_port
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("TYPEDCOLL_TRACE_DIR", None)
    procs = [subprocess.Popen([sys.executable, str(SPMD / f"{program}.py"), str(r), str(size),
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, start_new_session=True) for r in range(size)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60 + 15 * size)[0])  # torch imports
    except subprocess.TimeoutExpired:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it exited: no group is left to signal
                pass
        pytest.fail(f"{program} hung:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


@pytest.mark.parametrize("size", [2, 4, 8])
def test_gloo_hang_report_names_the_absent_rank_and_where_it_is(size):
    for r, (returncode, out) in enumerate(run_gloo("diag_gloo", size)):
        assert returncode == 0, f"rank {r}:\n{out[-6000:]}"
        checks = 0 if r == size - 1 else 1
        assert f"SPMD-OK diag_gloo rank {r}/{size} checks {checks}" in out, out


@pytest.mark.parametrize("size", [2, 4])
def test_a_dead_gloo_peer_is_a_collective_error_not_a_runtime_error(size):
    ranks = run_gloo("gloo_dead_peer", size)
    assert ranks[-1][0] == 3, ranks[-1][1]
    for r, (returncode, out) in enumerate(ranks[:-1]):
        assert returncode == 0 and f"SPMD-OK gloo_dead_peer rank {r}/{size}" in out, \
            f"rank {r}:\n{out[-6000:]}"


def test_a_gloo_peer_ended_by_an_uncaught_exception_is_named_with_it():
    ranks = run_gloo("gloo_uncaught", 3)
    assert ranks[-1][0] != 0 and "ValueError: request 17 has no KV blocks" in ranks[-1][1], \
        ranks[-1][1]
    for r, (returncode, out) in enumerate(ranks[:-1]):
        assert returncode == 0 and f"SPMD-OK gloo_uncaught rank {r}/3" in out, \
            f"rank {r}:\n{out[-6000:]}"


def test_a_rank_that_never_creates_its_comm_fails_creation_on_the_others_in_time():
    ranks = run_gloo("gloo_absent_creator", 3)
    for r, (returncode, out) in enumerate(ranks):
        assert returncode == 0, f"rank {r}:\n{out[-6000:]}"
    for r, (_, out) in enumerate(ranks[:-1]):
        assert f"SPMD-OK gloo_absent_creator rank {r}/3" in out, f"rank {r}:\n{out[-6000:]}"


def test_a_rank_that_never_creates_a_second_comm_is_the_only_one_named_absent():
    ranks = run_gloo("gloo_absent_second_creator", 3)
    for r, (returncode, out) in enumerate(ranks):
        assert returncode == 0 and f"SPMD-OK gloo_absent_second_creator rank {r}/3" in out, \
            f"rank {r}:\n{out[-6000:]}"


def test_untimed_calls_wait_past_the_groups_own_timeout():
    for r, (returncode, out) in enumerate(run_gloo("gloo_untimed_wait", 2)):
        assert returncode == 0 and f"SPMD-OK gloo_untimed_wait rank {r}/2" in out, \
            f"rank {r}:\n{out[-6000:]}"


class _RacingWork:
    """A gloo collective whose wait slice runs out as it completes: the first wait raises
    torch's "Operation timed out!" though the operation is done by the time anyone asks, and
    a wait after that reports how it really ended (``outcome``: None, or what it raised)."""

    def __init__(self, outcome: "Exception | None") -> None:
        self.outcome = outcome
        self.waits = 0

    def wait(self, timeout: object) -> bool:
        self.waits += 1
        if self.waits == 1:
            raise RuntimeError("Operation timed out!")
        if self.outcome is not None:
            raise self.outcome
        return True

    def is_completed(self) -> bool:
        return self.waits >= 1


def test_a_collective_completing_as_its_wait_slice_runs_out_is_not_a_failure():
    from typedcoll.transports.gloo import wait_work
    work = _RacingWork(None)
    wait_work(work, None, alarm=lambda: "")
    assert work.waits == 2


def test_a_collective_that_failed_as_its_wait_slice_ran_out_reports_its_own_failure():
    from typedcoll.core.transport import TransportFailure
    from typedcoll.transports.gloo import wait_work
    work = _RacingWork(RuntimeError("Connection closed by peer [127.0.0.1]:4242"))
    with pytest.raises(TransportFailure, match="Connection closed by peer"):
        wait_work(work, None, alarm=lambda: "")


class _DeadStore:
    """The job's store after the rank that hosted it died: every request fails."""

    def add(self, key: str, value: int) -> int:
        raise RuntimeError("Broken pipe")

    def check(self, keys: List[str]) -> bool:
        raise RuntimeError("Broken pipe")


class _NeverDone:
    """A collective waiting for neighbours that are alive but gave up: it never completes."""

    def wait(self, timeout: object) -> bool:
        raise RuntimeError("Operation timed out!")

    def is_completed(self) -> bool:
        return False


def test_a_store_that_stays_unreachable_ends_an_untimed_wait(monkeypatch):
    """A rank whose neighbours are alive waited, with no deadline, until they exited when the
    store's host died: the alarm swallowed the store's errors. A store that fails to answer for
    STORE_LOST_S is now the failure the wait reports (one failed read is not)."""
    import itertools
    import types

    from typedcoll.core.transport import TransportFailure
    from typedcoll.transports import torch as torch_transport
    from typedcoll.transports.gloo import wait_work
    clock = itertools.count(0.0)
    monkeypatch.setattr(torch_transport.time, "monotonic", lambda: next(clock))
    transport = types.SimpleNamespace(store=_DeadStore(), rank=1, size=3, _store_lost_at=None)
    alarm = types.MethodType(torch_transport.TorchTransport._peer_failure, transport)
    assert alarm() == ""  # a first failed read: it may pass
    assert "store has not answered" in alarm() and "Broken pipe" in alarm()
    transport._store_lost_at = None
    with pytest.raises(TransportFailure, match="the rank that hosted it"):
        wait_work(_NeverDone(), None, alarm)
