"""Diagnostics end to end: dumps from real multi-rank runs, hang reports, signals, logs.

Every multi-rank run goes through ``run_spmd`` with a hard timeout, so a diagnostics bug that
hangs fails the test instead of CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import typedcoll as tc
from launch import run_spmd
from typedcoll._trace import main as trace_main

PRELUDE = """
import json, os, signal, sys, time
import msgspec
import typedcoll as tc
from mpi4py import MPI

class RankState(msgspec.Struct):
    rank: int

class TimeoutFlag(msgspec.Struct):
    on: bool
"""

DESYNC = PRELUDE + """
comm = tc.TypedComm(MPI.COMM_WORLD)
for step in range(3):
    comm.allgather(RankState(comm.rank), step=step)
try:
    if comm.rank == 2:
        comm.allgather(TimeoutFlag(True), step=3)   # the rank-local branch
    comm.allgather(RankState(comm.rank), step=3)
except tc.DesyncError:
    # Every rank logs and dumps before any rank's uncaught error aborts the job.
    MPI.COMM_WORLD.Barrier()
    raise
"""

# Rank 1 skips collective #3 on COMM_WORLD and blocks (no timeout) in a barrier of another
# communicator, which rank 0 never calls: rank 0 times out and must name rank 1 and that barrier.
HANG = PRELUDE + """
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT)
side = tc.TypedComm(MPI.COMM_WORLD, name="side")
for step in range(3):
    comm.allgather(RankState(comm.rank), step=step)
if comm.rank == 1:
    side.barrier()
comm.allgather(RankState(comm.rank), step=3)
"""


def dumps(directory: Path) -> dict:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in directory.glob("rank*.json")}


def test_desync_dumps_every_rank_and_trace_finds_it(tmp_path, capsys):
    trace = tmp_path / "trace"
    res = run_spmd(DESYNC, 3, timeout=60, tmp_path=tmp_path,
                   env={"TYPEDCOLL_TRACE_DIR": str(trace)})
    assert not res.timed_out and res.returncode != 0, res
    docs = dumps(trace)
    assert sorted(docs) == [0, 1, 2], res
    for rank, doc in docs.items():
        assert doc["format"] == "typedcoll-trace" and doc["version"] == 1 and doc["rank"] == rank
        assert doc["events"][0] == "DesyncError"
        (world,) = doc["comms"]
        assert world["id"] == "COMM_WORLD" and world["seq"] == 4 and world["size"] == 3
        assert [e["seq"] for e in world["entries"]] == [0, 1, 2, 3]
        assert world["entries"][3]["state"] == "failed"
    # One structured line per rank per error, with the error's fields.
    lines = [json.loads(line) for line in res.stderr.splitlines()
             if line.startswith('{"event":"collective_error"')]
    assert sorted(line["rank"] for line in lines) == [0, 1, 2], res
    assert {tuple(line["kinds"]) for line in lines} == {("schema",)}
    assert lines[0]["seq"] == 3 and lines[0]["error"] == "DesyncError"
    assert [g["ranks"] for g in lines[0]["groups"]] == [[0, 1], [2]]
    capsys.readouterr()
    assert trace_main([str(trace)]) == 1
    out = capsys.readouterr().out
    assert ("collective #3 on COMM_WORLD diverged (schema):\n"
            "    ranks 0-1: allgather[RankState] at " in out)
    assert "    rank 2:    allgather[TimeoutFlag] at " in out


def test_hang_report_names_the_missing_rank_and_the_job_ends(tmp_path, capsys):
    trace = tmp_path / "trace"
    timeout = 2.0
    start = time.monotonic()
    # abort_on_error=False: our own excepthook must end the job, not `python -m mpi4py`.
    res = run_spmd(HANG.replace("TIMEOUT", str(timeout)), 2, timeout=40, tmp_path=tmp_path,
                   env={"TYPEDCOLL_TRACE_DIR": str(trace)}, abort_on_error=False)
    elapsed = time.monotonic() - start
    assert not res.timed_out and res.returncode != 0, res
    assert elapsed < timeout + 8, (elapsed, res)
    assert "did not complete within 2 s\nhang report (status files in " in res.stderr, res
    assert "  not arrived at collective #3 on COMM_WORLD: rank 1\n" \
           "    rank 1: last started barrier at " in res.stderr
    assert "(#0 on side), in flight for " in res.stderr
    assert "; issued 3 collectives on COMM_WORLD\n  arrived: rank 0" in res.stderr
    docs = dumps(trace)
    assert sorted(docs) == [0, 1], res
    assert docs[0]["reason"] == "uncaught CollectiveTimeout"
    assert docs[1]["reason"] == "request from rank 0"  # dumped while stuck in MPI
    capsys.readouterr()
    assert trace_main([str(trace)]) == 1
    out = capsys.readouterr().out
    assert "collective #3 on COMM_WORLD is missing ranks: rank 1 never started it" in out
    assert "collective #0 on side is missing ranks: rank 0 never started it" in out


def test_hang_report_without_trace_dir_says_the_side_channel_is_off(tmp_path):
    res = run_spmd(HANG.replace("TIMEOUT", "1.0"), 2, timeout=40, tmp_path=tmp_path,
                   abort_on_error=False)
    assert not res.timed_out and res.returncode != 0, res
    assert "hang report: the side channel is off; set TYPEDCOLL_TRACE_DIR" in res.stderr, res


KILLED = PRELUDE + """
comm = tc.TypedComm(MPI.COMM_WORLD)
comm.allgather(RankState(comm.rank), step=0)
if comm.rank == 1:
    time.sleep(0.6)  # let every status file show #0
    os.kill(os.getpid(), signal.SIGKILL)
comm.allgather(RankState(comm.rank), step=1)  # ranks 0 and 2 block here, inside MPI
"""


def test_killed_rank_leaves_the_others_dumps(tmp_path, capsys):
    # MPICH hydra SIGKILLs every rank the moment one dies, leaving nothing to dump (documented).
    # mpiexec.gforker, like Slurm or torchrun, signals the survivors first (SIGINT, then
    # SIGQUIT): their diagnostics threads must dump although the main threads are stuck in MPI.
    gforker = Path(sys.executable).parent / "mpiexec.gforker"
    if not gforker.exists():
        pytest.skip("needs the mpich wheel's mpiexec.gforker")
    trace = tmp_path / "trace"
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    env = dict(os.environ, TYPEDCOLL_TRACE_DIR=str(trace), PYTHONUNBUFFERED="1")
    proc = subprocess.run([str(gforker), "-n", "3", sys.executable, str(script)], env=env,
                          capture_output=True, text=True, timeout=40)
    docs = dumps(trace)
    assert sorted(docs) == [0, 2], (proc.stdout, proc.stderr)
    assert {docs[0]["reason"], docs[2]["reason"]} <= {"SIGINT", "uncaught KeyboardInterrupt"}
    for doc in (docs[0], docs[2]):
        last = doc["comms"][0]["entries"][-1]
        assert (last["seq"], last["state"]) == (1, "started"), last
    capsys.readouterr()
    assert trace_main([str(trace)]) == 1
    out = capsys.readouterr().out
    assert "collective #1 on COMM_WORLD is missing ranks: rank 1 never started it" in out
    assert "  rank 1: no dump (killed, or ran without TYPEDCOLL_TRACE_DIR)" in out


def test_sigusr1_dumps_a_rank_stuck_in_mpi_and_it_continues(tmp_path):
    trace = tmp_path / "trace"
    code = PRELUDE + """
comm = tc.TypedComm(MPI.COMM_WORLD)
pids = comm.allgather(os.getpid(), step=7)
if comm.rank == 0:
    time.sleep(0.5)  # rank 1 is now blocked inside MPI in the barrier below
    os.kill(pids[1], signal.SIGUSR1)
    path = os.path.join(os.environ["TYPEDCOLL_TRACE_DIR"], "rank1.json")
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    doc = json.load(open(path))
    last = doc["comms"][0]["entries"][-1]
    assert doc["reason"] == "SIGUSR1", doc
    assert (last["op"], last["state"], last["seq"]) == ("barrier", "started", 1), last
    print("live dump ok", flush=True)
comm.barrier()
print(f"rank {comm.rank} continued", flush=True)
"""
    res = run_spmd(code, 2, timeout=40, tmp_path=tmp_path,
                   env={"TYPEDCOLL_TRACE_DIR": str(trace)})
    assert res.returncode == 0 and "live dump ok" in res.stdout, res
    assert "rank 0 continued" in res.stdout and "rank 1 continued" in res.stdout


def test_sigterm_dumps_a_rank_stuck_in_mpi_and_it_still_ends(tmp_path):
    # What Slurm or torchrun send: the dump must be written while the rank is blocked in MPI,
    # then the previous (default) handler must still end the process. hydra kills the other
    # ranks as soon as one dies, so the dump file itself is checked here, after the job.
    trace = tmp_path / "trace"
    code = PRELUDE + """
import threading
comm = tc.TypedComm(MPI.COMM_WORLD)
comm.allgather(comm.rank, step=7)
if comm.rank == 1:
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    comm.barrier()  # rank 0 never joins: rank 1 is blocked inside MPI when the signal comes
else:
    time.sleep(30)  # ended by the launcher once rank 1 is gone
"""
    res = run_spmd(code, 2, timeout=40, tmp_path=tmp_path, abort_on_error=False,
                   env={"TYPEDCOLL_TRACE_DIR": str(trace)})
    assert not res.timed_out and res.returncode != 0, res
    doc = json.loads((trace / "rank1.json").read_text())
    last = doc["comms"][0]["entries"][-1]
    assert doc["reason"] == "SIGTERM", doc
    assert (last["op"], last["state"], last["seq"]) == ("barrier", "started", 1), last


def test_buffer_off_still_dumps_without_entries(tmp_path, capsys):
    trace = tmp_path / "trace"
    res = run_spmd(DESYNC, 3, timeout=60, tmp_path=tmp_path,
                   env={"TYPEDCOLL_TRACE_DIR": str(trace), "TYPEDCOLL_TRACE_BUFFER": "0"})
    assert not res.timed_out and "DesyncError" in res.stderr, res
    docs = dumps(trace)
    assert sorted(docs) == [0, 1, 2]
    for doc in docs.values():
        (world,) = doc["comms"]
        assert world["entries"] == [] and world["capacity"] == 0 and world["seq"] == 4
    capsys.readouterr()
    assert trace_main([str(trace)]) == 0
    assert "no entries to compare (flight recorder off" in capsys.readouterr().out


def test_debug_log_lines_per_collective(tmp_path):
    code = PRELUDE + """
comm = tc.TypedComm(MPI.COMM_WORLD)
comm.allgather(RankState(comm.rank), step=5)
comm.bcast(RankState(0), root=0)
comm.barrier()
"""
    res = run_spmd(code, 1, timeout=30, tmp_path=tmp_path, env={"TYPEDCOLL_LOG": "debug"})
    assert res.returncode == 0, res
    lines = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert [(x["seq"], x["op"], x["schema"], x["step"]) for x in lines] == [
        (0, "allgather", "RankState", 5), (1, "bcast", "RankState", None),
        (2, "barrier", "", None)], res
    assert lines[0]["site"].startswith("spmd_") and lines[0]["comm"] == "COMM_WORLD"


def test_dump_traces_without_a_directory_writes_nothing():
    assert tc.dump_traces("manual") is None


def test_dump_traces_never_raises(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert tc.dump_traces("manual", directory=str(blocker / "sub")) is None
    assert "typedcoll diagnostics: could not write the trace dump (manual)" \
        in capsys.readouterr().err


def test_dump_traces_writes_a_versioned_dump(tmp_path):
    path = tc.dump_traces("manual", "why", directory=str(tmp_path))
    assert path == str(tmp_path / "rank0.json")
    doc = json.loads(Path(path).read_text())
    assert (doc["format"], doc["version"], doc["reason"], doc["message"]) == \
        ("typedcoll-trace", 1, "manual", "why")
    assert not list(tmp_path.glob("*.tmp.*"))
