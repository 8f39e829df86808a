"""Diagnostics in one process: hang reports, decisions, dumps and logs over in-memory ranks.

Ranks are threads (``typedcoll.testing.run``), so these run in milliseconds; the same code paths
over MPI are in test_diag_mpi.py. Expected texts are pinned; call-site lines are found by the
``# mark:`` comments below, so editing this file does not break them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import msgspec
import pytest

import typedcoll as tc
import typedcoll.diagnostics as diag
from typedcoll.core.protocol import ERROR_HOOKS, NEW_PROTOCOL_HOOKS
from typedcoll.core.recorder import RecordEntry
from typedcoll.diagnostics import hang, log, side, watcher
from typedcoll.diagnostics.model import FORMAT, VERSION, Dump
from typedcoll.diagnostics.trace import main as trace_main
from typedcoll.testing import run

FILE = os.path.basename(__file__)
MARKS: Dict[str, int] = {m.group(1): n for n, text in enumerate(Path(__file__).read_text()
                                                                .splitlines(), 1)
                         for m in [re.search(r"# mark: (\w+)", text)] if m}


def at(mark: str) -> str:
    return f"{FILE}:{MARKS[mark]}"


class RankState(msgspec.Struct):
    rank: int


class TimeoutFlag(msgspec.Struct):
    on: bool


@pytest.fixture(autouse=True)
def installed():
    diag.install()


def errors_of(excinfo) -> Dict[int, BaseException]:
    """rank -> its exception, from testing.run's ExceptionGroup."""
    out = {}
    for e in excinfo.value.exceptions:
        note = next(n for n in e.__notes__ if n.startswith("(rank "))
        out[int(note[6:note.index(" of")])] = e
    return out


def normal(text: str) -> str:
    """The first line and the side channel's report, durations replaced by N (they vary).

    ``typedcoll.testing`` adds its own in-process lines before the report: not ours to pin.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("hang report"))
    text = "\n".join(lines[:1] + lines[start:])
    text = re.sub(r"answered in [0-9.]+ s", "answered in N s", text)
    return re.sub(r"(in flight for|completed) ([0-9.]+) s", r"\1 N s", text)


# --- install ---------------------------------------------------------------------------------
def test_import_installs_nothing():
    code = ("import sys, threading, typedcoll, typedcoll.diagnostics.trace\n"
            "assert 'mpi4py' not in sys.modules and 'torch' not in sys.modules\n"
            "from typedcoll.core.protocol import ERROR_HOOKS, NEW_PROTOCOL_HOOKS\n"
            "assert not ERROR_HOOKS and not NEW_PROTOCOL_HOOKS, (ERROR_HOOKS, NEW_PROTOCOL_HOOKS)\n"
            "assert sys.excepthook is sys.__excepthook__\n"
            "assert [t.name for t in threading.enumerate()] == ['MainThread']\n"
            "typedcoll.diagnostics.install(); typedcoll.diagnostics.install()\n"
            "assert len(NEW_PROTOCOL_HOOKS) == len(ERROR_HOOKS) == 1\n"
            "assert [t.name for t in threading.enumerate()] == "
            "['MainThread', 'typedcoll-diagnostics', 'typedcoll-signals']\n"
            "assert sys.excepthook is not sys.__excepthook__\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_install_is_idempotent_from_any_thread():
    threads = [threading.Thread(target=diag.install) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    diag.install()
    assert NEW_PROTOCOL_HOOKS.count(NEW_PROTOCOL_HOOKS[-1]) == 1
    assert len([h for h in ERROR_HOOKS if h.__module__.startswith("typedcoll")]) == 1
    names = [t.name for t in threading.enumerate()]
    assert names.count("typedcoll-diagnostics") == names.count("typedcoll-signals") == 1


@pytest.mark.parametrize("poll", ["late", "stuck"])
def test_a_signal_is_taken_whatever_the_side_channel_polls_do(poll):
    # On a loaded host every poll can start late; an MPI call after a peer died may never
    # return. Either way the signal must still be read, or SIGTERM never dumps nor ends the
    # process.
    code = ("import os, sys, threading, time, weakref\n"
            "from typedcoll.diagnostics import watcher\n"
            "serve_calls = [0]\n"
            "class Slow:\n"
            "    interval = 0.001\n"
            "    def serve(self, answer, channel):\n"
            "        serve_calls[0] += 1\n"
            "        if sys.argv[1] == 'stuck':\n"
            "            threading.Event().wait()\n"
            "        time.sleep(0.003)\n"
            "class Channel:\n"
            "    users = 1\n"
            "taken = threading.Event()\n"
            "wfd = watcher.start(lambda c, q: None, lambda signum: taken.set(), lambda: None)\n"
            "channel = Channel()\n"
            "watcher._Watcher.polled[1] = (weakref.ref(channel), Slow())\n"
            "watcher._Watcher.due[1] = 0.0\n"
            "watcher.wake()\n"
            "want = 10 if sys.argv[1] == 'late' else 0\n"
            "deadline = time.monotonic() + 30\n"  # a starved process polls late, but polls
            "while serve_calls[0] <= want and time.monotonic() < deadline:\n"
            "    time.sleep(0.01)\n"
            "assert channel is not None and serve_calls[0] > want, serve_calls\n"
            "os.write(wfd, bytes([15]))\n"
            "assert taken.wait(5.0), 'the signal byte was never read'\n")
    subprocess.run([sys.executable, "-c", code, poll], check=True, timeout=60)


def test_a_sigterm_handler_installed_after_typedcolls_keeps_the_process(tmp_path):
    # An engine's graceful shutdown: its own handler, installed later, decides; typedcoll still
    # dumps from its signal thread but must not end the process.
    code = ("import os, signal, threading, time\n"
            "import typedcoll.diagnostics as diag\n"
            "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
            "diag.install()\n"
            "took = threading.Event()\n"
            "signal.signal(signal.SIGTERM, lambda *a: took.set())\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "dump = os.path.join(os.environ['TYPEDCOLL_TRACE_DIR'], 'rank0.json')\n"
            "deadline = time.monotonic() + 30\n"  # a loaded host dumps late, but dumps
            "while not (took.is_set() and os.path.exists(dump)) and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "assert took.is_set() and os.path.exists(dump)\n"
            "time.sleep(3)\n"  # and the process lives on after its dump
            "print('still running', flush=True)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "TYPEDCOLL_TRACE_DIR": str(tmp_path)})
    assert res.returncode == 0 and "still running" in res.stdout, res


def test_sigterm_ends_the_process_when_its_dump_never_finishes(tmp_path):
    # The main thread is stuck in C with SIGTERM blocked there (so no Python handler runs) and
    # the dump blocks forever: the process must still end, as SIGTERM's default would end it.
    code = ("import ctypes, os, signal, threading, time\n"
            "import typedcoll.diagnostics as diag\n"
            "from typedcoll.diagnostics import dumps\n"
            "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
            "dumps.SIGTERM_GRACE = 1.0\n"
            "dumps.build_dump = lambda *a, **k: threading.Event().wait()\n"
            "diag.install()\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
            "def kill():\n"
            "    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})\n"
            "    time.sleep(0.2)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "threading.Thread(target=kill).start()\n"
            "ctypes.CDLL(None).sleep(60)\n"
            "print('the main thread returned', flush=True)\n")
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "TYPEDCOLL_TRACE_DIR": str(tmp_path)})
    assert res.returncode == 128 + 15 and time.monotonic() - started < 30, res
    assert "the main thread returned" not in res.stdout, res


# --- hang reports ------------------------------------------------------------------------------
def elsewhere(comm, reported):
    """Rank 1 stays away (at its ``sleep`` mark) until both its peers have their reports."""
    comm.note("can_queue", comm.rank != 1)  # mark: note
    comm.note("batch", 8)
    for step in range(3):
        comm.allgather(RankState(comm.rank))  # mark: loop
    if comm.rank == 1:
        reported.wait()  # mark: sleep
        return None
    try:
        comm.allgather(RankState(comm.rank))  # mark: late
    finally:
        reported.wait()
    return None


def away():
    """What ``elsewhere`` waits on, for its three ranks: bounded, so nothing outlives a test."""
    return threading.Barrier(3, timeout=30)


def test_hang_report_names_the_absent_rank_where_it_is_and_what_differs():
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(3, elsewhere, away(), timeout=0.3)
    errors = errors_of(excinfo)
    assert sorted(errors) == [0, 2]
    for r, err in errors.items():
        assert isinstance(err, tc.CollectiveTimeout) and err.missing == (1,)
        assert normal(str(err)) == "\n".join([
            f"collective #3 on WORLD: allgather[RankState] at {at('late')} did not complete "
            f"within 0.3 s",
            "hang report (side channel: 2 of 2 peers answered in N s):",
            "  never arrived at collective #3 on WORLD: rank 1",
            f"    rank 1: now at {at('sleep')} in elsewhere (thread rank-1)",
            f"      last started: allgather[RankState] on WORLD seq=2 at {at('loop')}, its 3rd "
            f"call: completed",
            "  arrived: ranks 0,2",
            "  decisions that differ:",
            f"    can_queue at {at('note')} — ranks 0,2: True; rank 1: False",
        ])


def test_hang_report_describes_ranks_alike_once_and_caps_the_places():
    p = run(1, lambda comm: comm._p)[0]
    places = {r: ("a.py:1" if r < 9 else f"b.py:{r}") for r in range(1, 20)}
    lines = hang._grouped(p, list(places), lambda r: [f"    {hang._WHO}: now at {places[r]}",
                                                      "      last started: x"])
    shown = [f"    rank {r}: now at b.py:{r}" for r in range(9, 9 + hang.MAX_DETAILED - 1)]
    assert lines == (["    ranks 1-8: now at a.py:1", "      last started: x"]
                     + [line for text in shown for line in (text, "      last started: x")]
                     + [f"    ... and ranks 16-19 (at most {hang.MAX_DETAILED} descriptions)"])


def out_of_step(comm, reported):
    """Rank 1 stays away (``out_of_step_stay``) while rank 2 skips the state allgather for the
    stats barrier; all three wait until ranks 0 and 2 have their reports."""
    comm.set_step(4)
    try:
        if comm.rank == 0:
            comm.allgather(RankState(comm.rank), name="rank_state")  # mark: out_of_step_state
        elif comm.rank == 2:
            comm.barrier(name="stats")  # mark: out_of_step_stats
    finally:
        reported.wait()  # mark: out_of_step_stay


def test_a_peer_that_arrived_at_another_call_is_named_with_it():
    """Not only "arrived": a peer at another call as the same collective means the ranks are
    out of step, which the absent rank's arrival would turn into a DesyncError."""
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(3, out_of_step, away(), timeout=0.3)
    errors = errors_of(excinfo)
    assert sorted(errors) == [0, 2]
    state = (f"allgather[RankState] name='rank_state' at {at('out_of_step_state')}, its 1st "
             f"call, step 4")
    stats = f"barrier name='stats' at {at('out_of_step_stats')}, its 1st call, step 4"
    for r, mine, theirs in ((0, state, stats), (2, stats, state)):
        err = errors[r]
        assert isinstance(err, tc.CollectiveTimeout) and err.missing == (1,), err
        lines = normal(str(err)).splitlines()
        at_arrived = lines.index("  arrived: ranks 0,2")
        assert lines[at_arrived + 1:] == [
            "  at another call as collective #0: rank " + str(2 - r) + " (the ranks are out "
            "of step)",
            f"    this rank: {mine}",
            f"    rank {2 - r}: {theirs}",
        ], "\n".join(lines)


def in_a_role_branch(comm, reported):
    """The last rank stays away while the root and the receivers meet in a bcast written in
    a role branch's arms, an elif's three at four ranks: several lines, one call."""
    try:
        if comm.rank == 0:
            comm.bcast(RankState(0), root=0)
        elif comm.rank == 1 and comm.size == 4:
            comm.bcast(None, root=0, schema=RankState)
        elif comm.rank != comm.size - 1:
            comm.bcast(None, root=0, schema=RankState)
    finally:
        reported.wait()


@pytest.mark.parametrize("size", [3, 4])
def test_a_role_branchs_arms_are_one_call_in_a_hang_report(size):
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(size, in_a_role_branch, threading.Barrier(size, timeout=30), timeout=0.3)
    errors = errors_of(excinfo)
    assert sorted(errors) == list(range(size - 1))
    for err in errors.values():
        assert isinstance(err, tc.CollectiveTimeout) and err.missing == (size - 1,), err
        assert str(err).endswith(f"\n  arrived: ranks 0-{size - 2}"), str(err)


def branch_and_a_skip(comm, reported):
    """The root and rank 1 meet in a role branch's two arms while rank 2 skipped to the stats
    barrier and rank 3 stays away."""
    try:
        if comm.rank == 0:
            comm.bcast(RankState(0), root=0)
        elif comm.rank == 1:
            comm.bcast(None, root=0, schema=RankState)
        elif comm.rank == 2:
            comm.barrier(name="stats")
    finally:
        reported.wait()


def test_only_the_rank_at_another_call_is_named_beside_a_role_branch():
    """The root and its receiver are one call though on two lines: each names rank 2 alone."""
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(4, branch_and_a_skip, threading.Barrier(4, timeout=30), timeout=0.3)
    errors = errors_of(excinfo)
    assert sorted(errors) == [0, 1, 2]
    for r in (0, 1):
        assert "  at another call as collective #0: rank 2 (the ranks are out of step)\n" \
            in str(errors[r]), str(errors[r])
    assert "  at another call as collective #0: ranks 0-1 (the ranks are out of step)\n" \
        in str(errors[2]), str(errors[2])


def test_peers_at_this_ranks_call_add_no_line():
    p = run(1, lambda comm: comm._p)[0]
    assert hang._other_calls(p, 0, [], {}) == []


def one_short(comm, reported):
    """Rank 1 moves on and stays there (its ``moved_on`` mark) until rank 0 has its report."""
    for step in range(2):
        comm.allgather(RankState(comm.rank))  # mark: short_loop
    if comm.rank == 0:
        try:
            comm.allgather(RankState(comm.rank))  # mark: extra
        finally:
            reported.set()
    else:
        reported.wait(30)  # mark: moved_on


def test_a_rank_one_call_short_is_named_with_where_it_moved_on_to():
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(2, one_short, threading.Event(), timeout=0.3)
    (err,) = errors_of(excinfo).values()
    lines = normal(str(err)).splitlines()
    assert lines[2:6] == [
        "  never arrived at collective #2 on WORLD: rank 1",
        f"    rank 1: now at {at('moved_on')} in one_short (thread rank-1)",
        f"      last started: allgather[RankState] on WORLD seq=1 at {at('short_loop')}, its 2nd "
        f"call: completed",
        "  arrived: rank 0",
    ]


def test_a_hang_where_every_rank_started_says_where_each_peer_is(monkeypatch):
    asked = hang.ask_peers

    def as_if_started(p, seq, reason, dump, grace=hang.GRACE):
        # rank 1 as it would answer had it entered the collective and stalled in it
        answers, why = asked(p, seq, reason, dump, grace)
        return {r: msgspec.structs.replace(s, comm=msgspec.structs.replace(s.comm, seq=seq + 1))
                for r, s in (answers or {}).items()}, why
    monkeypatch.setattr(hang, "ask_peers", as_if_started)
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(2, one_short, threading.Event(), timeout=0.3, name="stalled")
    (err,) = errors_of(excinfo).values()
    assert normal(str(err)).splitlines()[1:] == [
        "hang report (side channel: 1 of 1 peer answered in N s):",
        "  every rank has started collective #2: it is slow, or the transport is stuck; where "
        "each peer is now:",
        f"    rank 1: now at {at('moved_on')} in one_short (thread rank-1)",
        f"      last started: allgather[RankState] on stalled seq=1 at {at('short_loop')}, its "
        f"2nd call: completed",
        "  arrived: ranks 0-1",
    ]


def test_a_peer_that_came_late_is_named_and_this_rank_is_not_said_to_have(monkeypatch):
    # Rank 1 started collective #2 after rank 0 gave up (it held the GIL past the deadline),
    # read its give-up and failed as abandoned before answering. Rank 0's report said "rank 1
    # already failed it: this rank came late", of the rank that had waited its whole timeout.
    asked = hang.ask_peers

    def as_if_late(p, seq, reason, dump, grace=hang.GRACE):
        answers, why = asked(p, seq, reason, dump, grace)
        error = (f"CollectiveTimeout: collective #{seq} on stalled: allgather[RankState] at "
                 f"x.py:1 is abandoned: rank 0 gave up waiting at collective #{seq}")
        return {r: msgspec.structs.replace(s, comm=msgspec.structs.replace(
            s.comm, seq=seq + 1, last=msgspec.structs.replace(
                s.comm.last, seq=seq, state="failed", error=error)))
            for r, s in (answers or {}).items()}, why
    monkeypatch.setattr(hang, "ask_peers", as_if_late)
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(2, one_short, threading.Event(), timeout=0.3, name="stalled")
    (err,) = errors_of(excinfo).values()
    lines = normal(str(err)).splitlines()
    assert lines[2] == ("  every rank has started collective #2, rank 1 only after a rank had "
                        "given up on it (it came late: its call failed as abandoned); where "
                        "each peer is now:"), lines
    assert not any("this rank came late" in line for line in lines), lines


def silent(comm, forgotten, reported):
    """Rank 1 stops answering before rank 0's second call, and stays away until its report."""
    comm.allgather(RankState(comm.rank))  # mark: together
    if comm.rank == 1:
        watcher.forget(comm._p.channel)  # as if its process had died: nobody answers for it
        forgotten.set()
        reported.wait(30)
        return
    forgotten.wait(30)
    try:
        comm.allgather(RankState(comm.rank))
    finally:
        reported.set()


RANK_STATUS = diag.model.RankStatus(rank=3)


@pytest.mark.parametrize("world_ranks, said", [
    ([1, 3], "request from rank 0 (world rank 1)"),  # COMM_WORLD.split(1) of ranks 1 and 3
    ([0, 1], "request from rank 0"),
    (None, "request from rank 0")])
def test_a_dump_asked_for_on_a_sub_communicator_names_the_askers_world_rank(
        monkeypatch, world_ranks, said):
    # Dumps are listed by world rank: "request from rank 0" read as world rank 0, which had
    # asked nothing.
    monkeypatch.setattr(diag.state, "rank_status", lambda channel, instance: RANK_STATUS)
    monkeypatch.setattr(diag.state, "world_ranks", lambda channel: world_ranks)
    monkeypatch.setattr(diag.state, "trace_dir", lambda: "/nowhere")
    monkeypatch.setattr(diag._Installed, "requested_dumps", [])
    monkeypatch.setattr(diag.log, "event", lambda *args, **kwargs: None)
    query = side.Query(nonce=1, asker=0, instance=0, seq=4, dump=True, reason="it timed out")
    channel = SimpleNamespace(transport=SimpleNamespace(rank=1))
    assert diag._answer(channel, query) is RANK_STATUS  # type: ignore[arg-type]
    assert diag._Installed.requested_dumps == [(said, "it timed out")]


def test_a_rank_that_does_not_answer_is_named_unresponsive_with_what_is_known():
    started = time.monotonic()
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(2, silent, threading.Event(), threading.Event(), timeout=0.3)
    (err,) = errors_of(excinfo).values()
    assert time.monotonic() - started < 0.3 + hang.GRACE + 5.0  # not a whole watchdog's wait
    assert err.missing == (1,)
    assert normal(str(err)).splitlines()[1:] == [
        "hang report (side channel: 0 of 1 peer answered within 1 s):",
        "  unresponsive: rank 1 (no answer within 1 s: it released this communicator already "
        "(a `with` block left by an exception releases it on that rank alone), or it is stuck "
        "in a C call that holds the GIL, dead, or running without typedcoll diagnostics)",
        "    rank 1: it never answered this rank's side channel",
        f"    last collective every rank took part in: allgather[RankState] on WORLD seq=0 at "
        f"{at('together')}, its 1st call: completed N s ago",
        "  arrived: rank 0",
    ]


def test_the_store_protocol_works_over_a_torch_store(monkeypatch):
    # What a torch channel runs (its Store is the group's, under a prefix of its own), here over
    # an in-process HashStore shared by the in-memory ranks.
    torch_dist = pytest.importorskip("torch.distributed")
    stores: Dict[int, object] = {}

    def make_side(channel):
        store = stores.setdefault(id(channel.transport.world), torch_dist.HashStore())
        return side.StoreSide(channel, store, 0.01)
    monkeypatch.setattr(side, "make_side", make_side)
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(3, elsewhere, away(), timeout=0.3)
    assert len(stores) == 1
    for err in errors_of(excinfo).values():
        assert err.missing == (1,)
        assert f"    rank 1: now at {at('sleep')} in elsewhere (thread rank-1)" in str(err)


def twins(comm, reported):
    """Two communicators of one name over the same ranks: rank 1 never joins the second."""
    first, second = comm.dup(name="twin"), comm.dup(name="twin")
    first.allgather(RankState(comm.rank))  # mark: twin_first
    if comm.rank == 0:
        try:
            second.allgather(RankState(comm.rank))
        finally:
            reported.set()
    else:
        reported.wait(30)  # mark: twin_wait


def test_communicators_of_one_name_are_told_apart_by_their_ids_in_a_hang_report():
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(2, twins, threading.Event(), timeout=0.3)
    (err,) = errors_of(excinfo).values()
    assert normal(str(err)).splitlines()[2:6] == [
        "  never arrived at collective #0 on twin#2: rank 1",
        f"    rank 1: now at {at('twin_wait')} in twins (thread rank-1)",
        f"      last started: allgather[RankState] on twin seq=0 at {at('twin_first')}, its 1st "
        f"call: completed",
        "      on twin#2: issued 0 collectives",
    ]


def test_a_communicator_collected_mid_parse_is_kept_without_describing_its_calls(tmp_path):
    # Protocol.__del__ runs wherever the collector interrupts, even inside arms.branch_of,
    # which holds its lock while it parses a file: what a collected communicator leaves for
    # the farewell must be kept without taking that lock (it froze the rank for good).
    import importlib.util
    from typedcoll.core import arms
    from typedcoll.diagnostics import ending
    source = tmp_path / "fresh_calls.py"
    source.write_text("def call(comm):\n    return comm.bcast(7, root=0)\n")
    spec = importlib.util.spec_from_file_location("fresh_calls", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    protocols = []
    run(1, lambda comm: protocols.append(comm._p) or module.call(comm))  # mark: fresh_call
    arms._BRANCHES.__init__()  # described afresh: the file must be parsed to describe the call
    arms._FILES.clear()
    kept = []
    with arms._LOCK:  # as while another call's file is parsed
        keeper = threading.Thread(target=lambda: kept.append(ending._Stop.of(protocols[0], None)))
        keeper.start()
        keeper.join(10)
        assert not keeper.is_alive(), "keeping a collected communicator waited for the lock"
    (stop,) = kept
    last = stop.last()
    # The module's one-line function is a thin wrapper: the call is where it is called.
    assert (last.op, last.site, last.seq, last.state) == ("bcast", at("fresh_call"), 0,
                                                          "completed")


def test_with_the_recorder_off_the_report_still_counts_collectives(monkeypatch, tmp_path):
    monkeypatch.setenv("TYPEDCOLL_TRACE_BUFFER", "0")
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(2, one_short, threading.Event(), timeout=0.3)
    (err,) = errors_of(excinfo).values()
    assert normal(str(err)).splitlines()[2:5] == [
        "  never arrived at collective #2 on WORLD: rank 1",
        f"    rank 1: now at {at('moved_on')} in one_short (thread rank-1)",
        "      on WORLD: issued 2 collectives",
    ]
    dumped = threading.Event()

    def body(comm):
        comm.allgather(comm.rank)
        if comm.rank == 0:
            out = diag.dump_traces("manual", directory=str(tmp_path / "all"))
            dumped.set()
            return out
        dumped.wait(30)  # rank 1's communicator lives, one collective in, until rank 0 dumped
        return None
    run(2, body, name="unrecorded")
    dump = msgspec.json.decode((tmp_path / "all" / "rank0.json").read_bytes(), type=Dump)
    # A dump lists every live communicator of the process, and an earlier test's in-memory job
    # may not be collected yet: this job's are the ones named for it.
    dump.comms = [c for c in dump.comms if c.id == "unrecorded"]
    assert sorted(c.rank for c in dump.comms) == [0, 1]
    for c in dump.comms:
        assert (c.entries, c.capacity, c.recorded) == ([], 0, 0)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "rank0.json").write_bytes(msgspec.json.encode(dump))
    assert trace_main([str(tmp_path / "job")]) == 0


# --- decisions in a DesyncError --------------------------------------------------------------
def gate(comm):
    comm.note("can_queue", comm.rank != 2)  # mark: gate_note
    comm.note("batch", 8)
    if comm.rank == 2:
        comm.allgather(TimeoutFlag(True))  # mark: flag
    comm.allgather(RankState(comm.rank))  # mark: state


def test_desync_lists_the_decisions_that_differ():
    with pytest.raises(BaseExceptionGroup) as excinfo:
        run(4, gate)
    errors = errors_of(excinfo)
    assert sorted(errors) == [0, 1, 2, 3]
    for err in errors.values():
        assert isinstance(err, tc.DesyncError)
        assert str(err).splitlines()[-2:] == [
            "  decisions that differ:",
            f"    can_queue at {at('gate_note')} — ranks 0-1,3: True; rank 2: False"]
        assert err.decisions == (("can_queue", at("gate_note"),
                                  [("ranks 0-1,3", "True"), ("rank 2", "False")]),)


def test_note_records_the_latest_value_site_and_step():
    def body(comm):
        comm.set_step(7)
        comm.note("k", 1)
        comm.note("k", {"why": "x"})  # mark: latest
        return comm._p.decisions()
    ((note,),) = run(1, body)
    assert note == tc.Note(key="k", value={"why": "x"}, site=at("latest"), step=7)


# --- dumps -------------------------------------------------------------------------------------
def test_dump_traces_without_a_directory_writes_nothing(monkeypatch):
    monkeypatch.delenv("TYPEDCOLL_TRACE_DIR", raising=False)
    assert diag.dump_traces("manual") is None


def test_dump_traces_never_raises(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert diag.dump_traces("manual", directory=str(blocker / "sub")) is None
    assert "typedcoll diagnostics: could not write the trace dump (manual)" \
        in capsys.readouterr().err


def test_a_dump_holds_entries_notes_stacks_and_where_each_rank_is(tmp_path):
    def body(comm):
        comm.set_step(4)
        comm.note("can_queue", comm.rank == 0)
        comm.allgather(RankState(comm.rank))
        comm.allgather(RankState(comm.rank), name="vote")
        comm.allgather(comm.rank)
        path = None
        if comm.rank == 0:
            path = diag.dump_traces("manual", "why", directory=str(tmp_path))  # mark: dumping
        comm.barrier()  # rank 1's communicator lives until the dump is written
        return path
    path, _ = run(2, body, name="dumped")
    assert path == str(tmp_path / "rank0.json")
    assert not list(tmp_path.glob("*.tmp.*"))
    dump = msgspec.json.decode(Path(path).read_bytes(), type=Dump)
    assert (dump.format, dump.version, dump.reason, dump.message) == (FORMAT, VERSION, "manual",
                                                                      "why")
    assert dump.events[-1] == "manual" and dump.pid == os.getpid()
    mine = {c.rank: c for c in dump.comms if c.id == "dumped"}  # this job's, by its name
    assert sorted(mine) == [0, 1]  # in-memory ranks: one process holds both
    c = mine[0]
    assert (c.size, c.seq, c.step, c.transport, c.world_ranks) == (2, 3, 4, "memory", [0, 1])
    assert mine[1].where.startswith(f"{FILE}:") and mine[1].where.endswith(" in body")
    entries = [e for e in c.entries if e.op != "create"]
    assert [(e.seq, e.op, e.schema, e.name, e.step, e.state) for e in entries] == [
        (0, "allgather", "RankState", None, 4, "completed"),
        (1, "allgather", "RankState", "vote", 4, "completed"),
        (2, "allgather", "int", None, 4, "completed")]
    assert all(e.t_end_ns is not None and e.t_end_ns >= e.t_start_ns for e in entries)
    assert [(n.key, n.value, n.step) for n in c.notes] == [("can_queue", True, 4)]
    assert c.where == f"{at('dumping')} in body"
    names = [t.name for t in dump.threads]
    assert names[0] == "MainThread" and "rank-0" in names and "typedcoll-diagnostics" in names
    rank0 = next(t for t in dump.threads if t.name == "rank-0")
    assert any(f.endswith(f"{FILE}:{MARKS['dumping']} in body") for f in rank0.frames)


def test_a_timed_out_rank_dumps_with_what_it_saw_of_its_peers(tmp_path, monkeypatch):
    monkeypatch.setenv("TYPEDCOLL_TRACE_DIR", str(tmp_path))
    with pytest.raises(BaseExceptionGroup):
        run(2, silent, threading.Event(), threading.Event(), timeout=0.3,
            name="timed_out")
    dump = msgspec.json.decode((tmp_path / "rank0.json").read_bytes(), type=Dump)
    world = next(c for c in dump.comms if c.id == "timed_out" and c.rank == 0)
    (peer,) = world.peers
    assert (peer.rank, peer.answered, peer.status) == (1, False, None) and peer.asked_ns > 0
    assert world.entries[-1].state == "failed"
    assert world.entries[-1].error.startswith("CollectiveTimeout: collective #1 on timed_out")


# --- logs -----------------------------------------------------------------------------------------
@pytest.fixture
def clean_logger():
    saved = (log.LOGGER.level, list(log.LOGGER.handlers), log.LOGGER.propagate)
    yield log.LOGGER
    log.LOGGER.setLevel(saved[0])
    log.LOGGER.handlers[:] = saved[1]
    log.LOGGER.propagate = saved[2]


def test_one_json_line_per_rank_per_error(caplog, clean_logger):
    with caplog.at_level(logging.ERROR, logger="typedcoll"):
        with pytest.raises(BaseExceptionGroup):
            run(4, gate)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "typedcoll"]
    assert sorted(line["rank"] for line in lines) == [0, 1, 2, 3]
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["ts"])
        assert (line["level"], line["event"], line["error"], line["comm"], line["seq"]) == (
            "error", "collective_error", "DesyncError", "WORLD", 0)
        assert line["pid"] == os.getpid() and line["host"]
        assert line["comm_rank"] == line["rank"] and line["comm_size"] == 4
        assert line["kinds"] == ["call site", "schema"]
        assert line["decisions"] == [["can_queue", at("gate_note"),
                                      [["ranks 0-1,3", "True"], ["rank 2", "False"]]]]
        assert line["message"].startswith("collective #0 on WORLD diverged")


@pytest.mark.parametrize("level, events", [
    ("off", set()),
    ("error", {"collective_error"}),
    ("info", {"collective_error", "comm_created"}),
    ("debug", {"collective_error", "comm_created", "collective"}),
])
def test_every_log_level_means_something(level, events, monkeypatch, capsys, clean_logger):
    monkeypatch.setenv("TYPEDCOLL_LOG", level)
    assert log.configure() is None
    capsys.readouterr()

    def body(comm):
        comm.allgather(RankState(comm.rank))
        comm.allgather(RankState(comm.rank), step=comm.rank)  # a desync: one error per rank
    with pytest.raises(BaseExceptionGroup):
        run(2, body)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()
             if line.startswith("{")]
    assert {line["event"] for line in lines} == events
    if level == "debug":
        (one, other) = [x for x in lines if x["event"] == "collective"]
        assert (one["seq"], one["op"], one["schema"], one["site"].split(":")[0]) == (
            0, "allgather", "RankState", FILE)
        assert one["us"] >= 0
    assert len([x for x in lines if x["event"] == "collective_error"]) == (0 if level == "off"
                                                                          else 2)


def test_an_unknown_log_level_is_refused(monkeypatch, capsys, clean_logger):
    monkeypatch.setenv("TYPEDCOLL_LOG", "verbose")
    assert log.configure() == ("TYPEDCOLL_LOG: expected one of off, error, info, debug, got "
                               "'verbose'; the setting is ignored")
    assert "typedcoll diagnostics: TYPEDCOLL_LOG: expected one of" in capsys.readouterr().err


def test_a_recorded_creation_reads_as_creation_not_its_sentinel_number():
    from typedcoll.core.recorder import RecordEntry
    created = RecordEntry(seq=2 ** 64 - 1, op="create", schema="tuple[bool, float]",
                          site="prog.py:4")
    text = hang.entry_text(created, "WORLD", 0)
    assert text == "create on WORLD (creation) at prog.py:4: completed", text  # not its settings
    later = hang.entry_text(RecordEntry(seq=3, op="barrier", site="prog.py:9"), "WORLD", 0)
    assert " seq=3 at prog.py:9" in later, later


def test_an_uncaught_exception_is_told_by_its_first_line_and_where_it_left_the_callers_code():
    from typedcoll.diagnostics.state import uncaught_text

    def schedule():
        raise ValueError("request 17 has no KV blocks\nsecond line")

    try:
        schedule()
    except ValueError as exc:
        line = exc.__traceback__.tb_next.tb_lineno
        assert uncaught_text(ValueError, exc, exc.__traceback__) == (
            f"ValueError: request 17 has no KV blocks (raised at test_diag.py:{line} in "
            f"schedule)")
        long = uncaught_text(RuntimeError, RuntimeError("x" * 400), None)
        assert long == "RuntimeError: " + "x" * 297 + "..." and len(long) == 314
        assert uncaught_text(KeyboardInterrupt, KeyboardInterrupt(), None) == \
            "KeyboardInterrupt"


def test_a_sub_communicators_id_holds_its_members_world_ranks(monkeypatch):
    """What every member gives alike: names from one split differ only by color."""
    from typedcoll.diagnostics import state
    monkeypatch.setattr(state, "process_world_size", lambda: 4)
    assert state._with_members("COMM_WORLD.split(0)", [0, 2]) == "COMM_WORLD.split(0)[0,2]"
    assert state._with_members("COMM_WORLD.split(0)", [0, 1]) == "COMM_WORLD.split(0)[0-1]"
    assert state._with_members("COMM_WORLD.dup", [0, 1, 2, 3]) == "COMM_WORLD.dup"  # the world's
    assert state._with_members("group[1,3]", [1, 3]) == "group[1,3]"  # named by them already
    assert state._with_members("tp", None) == "tp"  # members unknown


def root_or_op_differs(comm, aspect):
    for it in range(3):
        comm.set_step(it)
        odd = comm.rank == 2 and it == 2
        comm.bcast([it, comm.rank] if comm.rank in (0, 2) else None,
                   root=2 if aspect == "root" and odd else 0)
        comm.allreduce(it, op="max" if aspect == "reduce op" and odd else "sum")


@pytest.mark.parametrize("aspect", ["root", "reduce op"])
def test_a_call_that_differs_only_in_its_root_or_reduce_op_diverges_offline_as_live(aspect):
    """The records keep root and reduce op: without them the analyzer saw a call every rank
    started and none finished, and blamed no one. Receivers that name no class are read as
    taking the root's, live and offline, so the root alone is the kind."""
    from typedcoll.diagnostics.analysis import analyze
    from typedcoll.diagnostics.dumps import build_dump
    with pytest.raises(ExceptionGroup) as excinfo:
        run(3, root_or_op_differs, aspect, name=f"differs-{aspect}")
    live = errors_of(excinfo)
    assert {type(e) for e in live.values()} == {tc.DesyncError}
    assert {tuple(k.value for k in e.kinds) for e in live.values()} == {(aspect,)}
    doc = build_dump("test")
    docs = {r: msgspec.structs.replace(doc, rank=r, comms=[
        c for c in doc.comms if c.id == f"differs-{aspect}" and c.rank == r]) for r in range(3)}
    found = analyze(docs).first
    assert found is not None and list(found.kinds) == list(live[0].kinds), found
    assert [g.ranks for g in found.groups] == [g.ranks for g in live[0].groups] == [(0, 1), (2,)]
    assert [(g.envelope.root, g.envelope.reduce_op) for g in found.groups] == \
        [(g.envelope.root, g.envelope.reduce_op) for g in live[0].groups]


def test_a_wait_past_a_peers_issued_count_is_one_it_never_joins():
    # A peer issued 3 collectives (#0-#2) and ended: this rank waits for it only inside #3 or
    # later, and not once that call has completed or failed.
    started = RecordEntry(seq=3, op="allgather", state="started")
    assert hang.waits_past(4, started, False, 3)
    assert not hang.waits_past(3, RecordEntry(seq=2, op="allgather"), False, 3)  # all joined
    assert not hang.waits_past(4, RecordEntry(seq=3, op="allgather"), True, 3)  # completed
    assert not hang.waits_past(4, RecordEntry(seq=3, op="bcast", state="failed"), True, 3)
    assert not hang.waits_past(3, RecordEntry(seq=2, op="allgather", state="started"), True, 3)
    # Without a recorder: issued past the peer's count and inside a collective.
    assert hang.waits_past(4, None, True, 3) and not hang.waits_past(4, None, False, 3)


def test_a_farewell_from_a_peer_without_normal_ends_reads_as_an_exception():
    old = msgspec.msgpack.encode([2, "ValueError: boom (raised at a.py:3 in f)"])
    message = msgspec.msgpack.Decoder(side.Ended).decode(old)
    assert (message.rank, message.normal, message.seqs) == (2, False, ())
    normal = side.Ended(1, "its program ended", True, ((4, 7),))
    assert msgspec.msgpack.Decoder(side.Ended).decode(msgspec.msgpack.encode(normal)) == normal
