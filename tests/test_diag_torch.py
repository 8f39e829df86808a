"""Hang reports over gloo with no setup: the question goes through the group's Store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed")

PROGRAM = Path(__file__).resolve().parent / "spmd" / "diag_gloo.py"
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("size", [2, 4, 8])
def test_gloo_hang_report_names_the_absent_rank_and_where_it_is(size, monkeypatch):
    from typedcoll.transports.torch import free_port
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("TYPEDCOLL_TRACE_DIR", None)
    procs = [subprocess.Popen([sys.executable, str(PROGRAM), str(r), str(size), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, start_new_session=True) for r in range(size)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60 + 15 * size)[0])  # torch imports
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("diag_gloo hung:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
    for r, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {r}:\n{out[-6000:]}"
        checks = 0 if r == size - 1 else 1
        assert f"SPMD-OK diag_gloo rank {r}/{size} checks {checks}" in out, out


@pytest.mark.parametrize("size", [2, 4])
def test_a_dead_gloo_peer_is_a_collective_error_not_a_runtime_error(size):
    from typedcoll.transports.torch import free_port
    program = Path(__file__).resolve().parent / "spmd" / "gloo_dead_peer.py"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(program), str(r), str(size), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, start_new_session=True) for r in range(size)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60 + 15 * size)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("gloo_dead_peer hung:\n" + "\n".join(p.communicate()[0][-3000:]
                                                         for p in procs))
    assert procs[-1].returncode == 3, outputs[-1]
    for r, (proc, out) in enumerate(zip(procs[:-1], outputs)):
        assert proc.returncode == 0 and f"SPMD-OK gloo_dead_peer rank {r}/{size}" in out, \
            f"rank {r}:\n{out[-6000:]}"
