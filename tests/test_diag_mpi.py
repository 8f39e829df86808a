"""Diagnostics over MPI, end to end: hang reports with no setup, a killed rank, dumps, signals.

Every multi-rank run is bounded (``run_spmd``, or the same kill-the-group timeout below), so a
diagnostics bug that hangs fails its test instead of CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import REPO, SpmdResult, run_spmd
from typedcoll.demo.launch import find_mpiexec
from typedcoll.diagnostics.trace import main as trace_main

SPMD = Path(__file__).resolve().parent / "spmd"


def program(name: str) -> str:
    return (SPMD / f"{name}.py").read_text()


def dumps(directory: Path) -> dict:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in directory.glob("rank*.json")}


@pytest.mark.parametrize("nranks", [2, 4])
def test_hang_report_with_no_setup_names_the_absent_rank_and_where_it_is(spmd, nranks,
                                                                         monkeypatch):
    monkeypatch.delenv("TYPEDCOLL_TRACE_DIR", raising=False)
    spmd("diag_hang", nranks, timeout=60, uniform=False)


def test_desync_decisions_in_the_error_the_log_the_dumps_and_trace(spmd, tmp_path, capsys):
    trace = tmp_path / "trace"
    res = spmd("diag_desync", 3, timeout=60, env={"TYPEDCOLL_TRACE_DIR": str(trace)})
    lines = [json.loads(line) for line in res.stderr.splitlines()
             if line.startswith('{"ts"')]
    assert sorted(line["rank"] for line in lines) == [0, 1, 2], res
    assert {line["event"] for line in lines} == {"collective_error"}
    assert all(line["host"] and line["pid"] and line["comm"] == "COMM_WORLD" for line in lines)
    docs = dumps(trace)
    assert sorted(docs) == [0, 1, 2], res
    for rank, doc in docs.items():
        assert (doc["version"], doc["rank"], doc["reason"]) == (2, rank, "DesyncError")
        (world,) = doc["comms"]
        assert [e["seq"] for e in world["entries"] if e["op"] != "create"] == [0, 1, 2, 3]
        assert world["entries"][-1]["state"] == "failed"
        assert all(e["t_end_ns"] for e in world["entries"])
        assert world["notes"][0]["key"] == "timed_out"
        assert doc["threads"][0]["name"] == "MainThread" and doc["threads"][0]["frames"]
    capsys.readouterr()
    assert trace_main([str(trace)]) == 1
    out = capsys.readouterr().out
    assert "  collective #3 on COMM_WORLD diverged (call site, schema):\n" \
           "    ranks 0-1: allgather[RankState] at " in out
    assert "    rank 2:    allgather[TimeoutFlag] at " in out
    assert "    decisions that differ:\n      timed_out at diag_desync.py:" not in out  # renamed
    assert "    decisions that differ:\n      timed_out at spmd_" in out
    assert " — ranks 0-1: False; rank 2: True\n" in out


def run_kept(script: Path, nranks: int, env: dict, timeout: float) -> SpmdResult:
    """Under hydra's ``-disable-auto-cleanup``: one rank's death does not end the others.

    Each rank runs under ``sh -c``: hydra's proxy SIGKILLs every rank when it reaps a child that
    a signal killed, whatever the cleanup option, so the shell turns the rank's death by
    SIGKILL into an exit status. Hydra then only sends the survivors' process groups SIGUSR1,
    which the shells trap (a trapped signal is reset in the rank) and MPICH and typedcoll's
    handler take without ending the process.
    """
    run_env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    run_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])
    cmd = [find_mpiexec(), "-disable-auto-cleanup", "-n", str(nranks), "sh", "-c",
           'trap : USR1; "$@"; exit $?', "sh", sys.executable, str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return SpmdResult(proc.returncode, out, err, False)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return SpmdResult(-9, out, err, True)


def test_a_killed_rank_is_named_unresponsive_and_the_survivors_dump(tmp_path, capsys):
    version = subprocess.run([find_mpiexec(), "--version"], capture_output=True, text=True,
                             timeout=30)
    if "HYDRA" not in version.stdout + version.stderr:
        pytest.skip("needs MPICH hydra's -disable-auto-cleanup")
    trace = tmp_path / "trace"
    script = tmp_path / "diag_killed.py"
    script.write_text(program("diag_killed"))
    res = run_kept(script, 3, {"TYPEDCOLL_TRACE_DIR": str(trace)}, timeout=60)
    assert not res.timed_out, res
    assert "SPMD-OK diag_killed rank 0/3" in res.stdout, res
    assert "SPMD-OK diag_killed rank 2/3" in res.stdout, res
    docs = dumps(trace)
    assert sorted(docs) == [0, 2], res
    for doc in docs.values():
        world = doc["comms"][0]
        peers = {p["rank"]: p for p in world["peers"]}
        assert peers[1]["answered"] is False and peers[1]["status"] is None
        last = world["entries"][-1]
        assert (last["seq"], last["state"]) == (20, "failed"), last
    capsys.readouterr()
    assert trace_main([str(trace)]) == 1
    out = capsys.readouterr().out
    assert ("collective #20 on COMM_WORLD did not complete, and rank 1 left no dump: whether it "
            "started it is unknown") in out
    assert "  rank 1: no dump (killed, or ran without TYPEDCOLL_TRACE_DIR)" in out


def test_an_uncaught_timeout_ends_the_job(tmp_path):
    started = time.monotonic()
    # abort_on_error=False: the excepthook must end the job, not `python -m mpi4py`.
    res = run_spmd(program("diag_exit"), 2, timeout=40, tmp_path=tmp_path, abort_on_error=False)
    elapsed = time.monotonic() - started
    assert not res.timed_out and res.returncode != 0, res
    assert elapsed < 0.5 + 10, (elapsed, res)
    assert "typedcoll.CollectiveTimeout: collective #1 on COMM_WORLD: allgather[int] at " in \
        res.stderr, res
    assert "  never arrived at collective #1 on COMM_WORLD: rank 1\n" in res.stderr
    assert " in <module> (thread MainThread)\n" in res.stderr


@pytest.mark.parametrize("nranks", [3, 4])
def test_a_rank_ended_by_an_uncaught_exception_is_named_with_it(tmp_path, nranks):
    # abort_on_error=False: `python -m mpi4py` would abort the job before any report.
    res = run_spmd(program("diag_uncaught"), nranks, timeout=60, tmp_path=tmp_path,
                   abort_on_error=False)
    assert not res.timed_out, res
    for r in range(nranks - 1):
        assert f"SPMD-OK diag_uncaught rank {r}/{nranks}" in res.stdout, res
    assert f"ValueError: request 17 has no KV blocks on rank {nranks - 1}" in res.stderr, res


def test_a_rank_ending_while_its_peers_wait_without_a_timeout_ends_the_job(tmp_path):
    started = time.monotonic()
    res = run_spmd(program("diag_uncaught"), 4, timeout=60, tmp_path=tmp_path,
                   abort_on_error=False, args=["untimed"])
    elapsed = time.monotonic() - started
    assert not res.timed_out and res.returncode != 0, res
    assert elapsed < 30, (elapsed, res)
    assert "ValueError: request 17 has no KV blocks on rank 3" in res.stderr, res
    assert ("typedcoll diagnostics: this rank is ending (uncaught ValueError) and ranks 0-2 of "
            "COMM_WORLD wait for it in collective #1, which has no timeout: ending the job"
            in res.stderr), res


@pytest.mark.parametrize("nranks, mode", [(2, "untimed"), (4, "untimed"), (4, "collected"),
                                           (3, "finalize"), (3, "worker")])
def test_a_rank_ending_normally_while_its_peers_wait_without_a_timeout_ends_the_job(
        tmp_path, nranks, mode):
    started = time.monotonic()
    res = run_spmd(program("diag_ended"), nranks, timeout=60, tmp_path=tmp_path,
                   abort_on_error=False, args=[mode])
    elapsed = time.monotonic() - started
    assert not res.timed_out and res.returncode != 0, res
    assert elapsed < 30, (elapsed, res)
    last = nranks - 1
    reports = [line for line in res.stderr.splitlines()
               if line.startswith(f"typedcoll diagnostics: rank {last} of COMM_WORLD ended")]
    assert reports, res
    for line in reports:  # each waiting rank that printed before the abort names itself
        assert line in [f"typedcoll diagnostics: rank {last} of COMM_WORLD ended normally after "
                        f"1 collective on it, and rank {r}, this one, waits for it in collective "
                        f"#1, which has no timeout: ending the job" for r in range(last)], line
    assert "  this rank: allgather[int] seq=1 at " in res.stderr, res
    how = ("it called MPI.Finalize()" if mode == "finalize" else
           "its program ended without an uncaught exception")
    assert (f"  rank {last}: {how}; its last collective: allgather[int] on COMM_WORLD seq=0 "
            f"at ") in res.stderr, res


def test_a_rank_ending_normally_is_named_in_its_peers_hang_report(spmd):
    spmd("diag_ended", 3, timeout=60, uniform=False, abort_on_error=False, args=["timed"])


def test_ranks_ending_normally_one_after_another_report_nothing(spmd):
    res = spmd("diag_ended", 4, timeout=60, abort_on_error=False, args=["symmetric"])
    assert res.returncode == 0, res
    assert "typedcoll diagnostics" not in res.stderr, res
    for r in range(4):  # the collective every rank makes at exit, after its farewell
        assert f"at exit {r}: [0, 1, 2, 3]" in res.stdout, res


UNCAUGHT = """\
import typedcoll as tc
import typedcoll.diagnostics
from mpi4py import MPI

typedcoll.diagnostics.install()
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=5)
comm.allgather(comm.rank)


def fail():
    raise RuntimeError("the caller's own error")  # line 11


fail()
"""


def test_a_dump_on_an_uncaught_exception_says_where_the_caller_was_not_typedcoll(tmp_path):
    """In the excepthook the caller's frames have unwound: its stack is typedcoll's alone. The
    rank was where the exception left the caller's code."""
    script = tmp_path / "user.py"
    script.write_text(UNCAUGHT)
    env = dict(os.environ, TYPEDCOLL_TRACE_DIR=str(tmp_path / "trace"), TYPEDCOLL_LOG="off",
               PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=60)  # a singleton MPI job: one rank, no launcher
    assert "RuntimeError: the caller's own error" in res.stderr, res
    doc = dumps(tmp_path / "trace")[0]
    assert doc["reason"] == "uncaught RuntimeError"
    assert [c["where"] for c in doc["comms"]] == ["user.py:11 in fail"], doc["comms"]


def test_sigusr1_dumps_a_rank_stuck_in_mpi_and_it_continues(tmp_path):
    trace = tmp_path / "trace"
    res = run_spmd(program("diag_signals"), 2, timeout=40, tmp_path=tmp_path,
                   env={"TYPEDCOLL_TRACE_DIR": str(trace), "DIAG_SIGNAL": "USR1"})
    assert res.returncode == 0 and "live dump ok" in res.stdout, res
    assert "rank 0 continued" in res.stdout and "rank 1 continued" in res.stdout


def test_sigterm_dumps_a_rank_stuck_in_mpi_and_it_still_ends(tmp_path):
    # What Slurm or torchrun send: the dump must be written while the rank is blocked in MPI,
    # then the previous (default) handler must still end the process.
    trace = tmp_path / "trace"
    res = run_spmd(program("diag_signals"), 2, timeout=60, tmp_path=tmp_path,
                   abort_on_error=False,
                   env={"TYPEDCOLL_TRACE_DIR": str(trace), "DIAG_SIGNAL": "TERM"})
    # Rank 1 ended: the launcher reports its signal, or (MPICH now and then returns 0 when
    # rank 0 exits first) rank 0 saw it gone before it exited itself.
    assert not res.timed_out, res
    assert res.returncode != 0 or "rank 0: rank 1 ended" in res.stdout, res
    doc = json.loads((trace / "rank1.json").read_text())
    last = doc["comms"][0]["entries"][-1]
    assert doc["reason"] == "SIGTERM", doc
    assert (last["op"], last["state"], last["seq"]) == ("barrier", "started", 1), last
    stuck = [t for t in doc["threads"] if t["name"] == "MainThread"]
    assert stuck and stuck[0]["collective"] == "COMM_WORLD", doc["threads"]


def test_the_tp_dp_layouts_dumps_align_in_the_trace(spmd, tmp_path, capsys):
    """Both splits have a color-0 communicator on some ranks: their ids hold their members,
    so the trace aligns each one across its members and finds nothing in a clean run."""
    trace = tmp_path / "trace"
    spmd("diag_tpdp", 4, timeout=90, env={"TYPEDCOLL_TRACE_DIR": str(trace)})
    assert sorted(dumps(trace)) == [0, 1, 2, 3]
    capsys.readouterr()
    assert trace_main([str(trace)]) == 0
    out = capsys.readouterr().out
    for comm in ("COMM_WORLD.split(0)[0-1]", "COMM_WORLD.split(1)[2-3]",
                 "COMM_WORLD.split(0)[0,2]", "COMM_WORLD.split(1)[1,3]"):
        assert f"{comm} (2 ranks" in out, out
