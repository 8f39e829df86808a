"""Shared fixtures: run an SPMD program from tests/spmd/ and require every rank's OK marker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch import SpmdResult, run_spmd

SPMD_DIR = Path(__file__).resolve().parent / "spmd"


# Programs that leave with os._exit(0) while a timed-out collective is still pending: Open MPI's
# launcher reports "exited without calling finalize" and fails the job even though every rank
# finished its checks, and MPICH's kills (SIGKILL: exit status 9) the ranks still on their way out
# when the first leaves, so for those the markers are the verdict.
EXITS_WITHOUT_FINALIZE = 'exited without calling "finalize"'
KILLED_ON_THE_WAY_OUT = 9


def check_spmd(result: SpmdResult, program: str, nranks: int, uniform: bool = True) -> None:
    assert not result.timed_out, f"{program} at {nranks} ranks hung: {result!r}"
    skipped_finalize = ((EXITS_WITHOUT_FINALIZE in result.stdout + result.stderr
                         or result.returncode == KILLED_ON_THE_WAY_OUT)
                        and "os._exit(0)" in (SPMD_DIR / f"{program}.py").read_text())
    assert result.returncode == 0 or skipped_finalize, \
        f"{program} at {nranks} ranks failed: {result!r}"
    markers = re.findall(rf"SPMD-OK {re.escape(program)} rank (\d+)/{nranks} checks (\d+)(?!\d)",
                         result.stdout)
    assert sorted(int(r) for r, _ in markers) == list(range(nranks)), repr(result)
    if uniform:
        assert len({checks for _, checks in markers}) == 1, repr(result)


@pytest.fixture
def spmd(tmp_path):
    """``spmd(program, nranks, timeout)``: run tests/spmd/<program>.py, check every rank's
    marker."""

    def run(program: str, nranks: int, timeout: float = 60.0, uniform: bool = True,
            **kwargs) -> SpmdResult:
        code = (SPMD_DIR / f"{program}.py").read_text()
        result = run_spmd(code, nranks, timeout=timeout, tmp_path=tmp_path, **kwargs)
        check_spmd(result, program, nranks, uniform)
        return result

    return run
