"""The trace analyzer: pure logic on hand-built dumps, the CLI on files, and hostile inputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import msgspec
import pytest

from typedcoll import MismatchKind
from typedcoll.diagnostics import trace
from typedcoll.diagnostics.analysis import analyze, clean, consistent_text
from typedcoll.diagnostics.model import Dump
from typedcoll.diagnostics.trace import TraceInputError, main, parse_dump


def entry(seq: int, op: str = "allgather", schema: str = "RankState", site: str = "loop.py:10",
          step: Optional[int] = None, state: str = "completed", occurrence: int = 0,
          **more: Any) -> Dict[str, Any]:
    return {"seq": seq, "op": op, "schema": schema, "fingerprint": schema.lower()[:8],
            "site": site, "name": None, "occurrence": occurrence, "step": step, "bytes": 7,
            "state": state, "t_start_ns": 1_000 * seq, "t_end_ns": 1_000 * seq + 500,
            "error": None, **more}


def dump(rank: int, comms: List[Dict[str, Any]], reason: str = "DesyncError") -> Dict[str, Any]:
    return {"format": "typedcoll-trace", "version": 2, "rank": rank, "world_size": 4,
            "host": "node0", "pid": 100 + rank, "time_ns": 0, "reason": reason, "message": "",
            "events": [reason], "threads": [], "comms": comms}


def comm(rank: int, size: int, entries: List[Dict[str, Any]], seq: Optional[int] = None,
         comm_id: str = "COMM_WORLD", notes: Optional[List[Dict[str, Any]]] = None,
         where: str = "?") -> Dict[str, Any]:
    return {"id": comm_id, "name": comm_id, "rank": rank, "size": size,
            "world_ranks": list(range(size)), "transport": "mpi",
            "seq": seq if seq is not None else (entries[-1]["seq"] + 1 if entries else 0),
            "timeout": None, "where": where, "capacity": 2000, "recorded": len(entries),
            "entries": entries, "notes": notes or [], "peers": []}


def dumps_of(*docs: Dict[str, Any]) -> Dict[int, Dump]:
    return {d["rank"]: msgspec.convert(d, Dump) for d in docs}


def steady(n: int) -> List[Dict[str, Any]]:
    return [entry(s, step=s) for s in range(n)]


# --- analysis ----------------------------------------------------------------------------------
def test_consistent_dumps_have_no_finding():
    report = analyze(dumps_of(*(dump(r, [comm(r, 3, steady(5))]) for r in range(3))))
    assert report.consistent and report.first is None
    assert report.comms[0].compared == (0, 4)


def test_first_divergence_groups_ranks_like_a_live_desync_with_decisions():
    docs = []
    for r in range(4):
        es = steady(3)
        es.append(entry(3, schema="TimeoutFlag", site="py_executor.py:4438", step=3) if r == 3
                  else entry(3, site="adp_router.py:88", step=3))
        es.append(entry(4, op="barrier", schema="", site="loop.py:20"))
        notes = [{"key": "can_queue", "value": r != 3, "site": "py_executor.py:5285",
                  "step": 3}, {"key": "batch", "value": 8, "site": "x.py:1", "step": 3}]
        docs.append(dump(r, [comm(r, 4, es, notes=notes)]))
    report = analyze(dumps_of(*docs))
    assert not report.consistent
    div = report.comms[0].divergence
    assert div is not None and div.seq == 3
    assert div.kinds == [MismatchKind.CALL, MismatchKind.SCHEMA]
    assert [g.ranks for g in div.groups] == [(0, 1, 2), (3,)]
    assert div.text == (
        "collective #3 on COMM_WORLD diverged (call site, schema):\n"
        "  ranks 0-2: allgather[RankState] at adp_router.py:88, step 3\n"
        "  rank 3:    allgather[TimeoutFlag] at py_executor.py:4438, step 3\n"
        "  decisions that differ:\n"
        "    can_queue at py_executor.py:5285 — ranks 0-2: True; rank 3: False")
    assert div.decisions == [("can_queue", "py_executor.py:5285",
                              [("ranks 0-2", "True"), ("rank 3", "False")])]
    assert report.first is div


def test_op_and_step_divergence_kinds():
    a = dump(0, [comm(0, 2, [entry(0, step=1)])])
    b = dump(1, [comm(1, 2, [entry(0, op="gather", step=2)])])
    div = analyze(dumps_of(a, b)).comms[0].divergence
    assert div is not None and div.kinds == [MismatchKind.OP, MismatchKind.STEP]


def test_root_and_reduce_op_divergence_kinds():
    def dumps(field: str, values: List[Any], op: str) -> Dict[int, Dump]:
        return dumps_of(*(dump(r, [comm(r, 3, [entry(0, op=op, **{field: v})])])
                          for r, v in enumerate(values)))
    root = analyze(dumps("root", [0, 0, 2], "gather")).first
    assert root is not None and root.kinds == [MismatchKind.ROOT]
    assert [g.ranks for g in root.groups] == [(0, 1), (2,)]
    assert "root=2 at loop.py:10" in root.text, root.text
    reduce_op = analyze(dumps("reduce_op", ["sum", "max", "sum"], "allreduce")).first
    assert reduce_op is not None and reduce_op.kinds == [MismatchKind.REDUCE_OP]
    assert "op=max at loop.py:10" in reduce_op.text, reduce_op.text


def test_a_role_branch_completed_live_is_no_divergence_and_anything_else_is():
    """A root and its receivers in the two arms of one role branch (core.arms) show two sites;
    a completed call was accepted live, so the analysis accepts it too."""
    def bcast(r: int, state: str = "completed", key: str = "m.py:3 bcast #1") -> Dict[str, Any]:
        arm = 0 if r == 0 else 1
        return entry(0, op="bcast", site=f"m.py:{4 + 3 * arm}", state=state,
                     branch={"key": key, "arm": arm})
    ok = analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(r)])]) for r in range(3))))
    assert ok.consistent and ok.first is None
    failed = analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(r, "failed")])]) for r in range(3))))
    other = analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(r, key=f"m.py:{r} bcast #1")])])
                               for r in range(3))))
    for report in (failed, other):
        div = report.comms[0].divergence
        assert div is not None and div.kinds == [MismatchKind.CALL]


def test_a_role_branch_that_raised_a_ranks_own_failure_live_is_no_divergence():
    """A receiver's bad root in a role branch: live, the arms paired and every rank raised that
    rank's error (PeerError; EncodeError on it). The dumps show two sites: no divergence."""
    def bcast(r: int, error: str) -> Dict[str, Any]:
        arm = 0 if r == 0 else 1
        return entry(0, op="bcast", site=f"m.py:{4 + 3 * arm}", state="failed", error=error,
                     branch={"key": "m.py:3 bcast #1", "arm": arm})
    failure = "collective #0 on COMM_WORLD: rank 2 failed its bcast contribution at m.py:7: x"
    errors = [f"PeerError: {failure}", f"PeerError: {failure}", f"EncodeError: {failure}"]

    def report_of(errors: List[str]) -> Any:  # the ranks then go on to a completed call
        return analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(r, errors[r]), entry(1)])])
                                  for r in range(3))))
    report = report_of(errors)
    assert report.consistent and report.first is None
    errors[0] = "DesyncError: collective #0 on COMM_WORLD diverged (call site)"
    report = report_of(errors)
    div = report.comms[0].divergence
    assert div is not None and div.kinds == [MismatchKind.CALL]


def test_a_role_wrapper_made_for_two_callers_diverges_offline_as_it_does_live():
    """The entries keep the callers of a call in a role branch (core.callers): a rank whose
    broadcast_object was called from another line is another call, in a dump as live."""
    def bcast(r: int, line: int) -> Dict[str, Any]:
        arm = 0 if r == 0 else 1
        return entry(0, op="bcast", site=f"m.py:{4 + 3 * arm}",
                     branch={"key": "m.py:3 bcast #1", "arm": arm},
                     callers=[{"site": f"sched.py:{line}"}])
    same = analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(r, 90)])]) for r in range(3))))
    assert same.consistent and same.first is None
    div = analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(r, 91 if r == 2 else 90)])])
                             for r in range(3)))).comms[0].divergence
    assert div is not None and div.kinds == [MismatchKind.CALL]
    assert div.text.splitlines()[3] == \
        "  rank 2: bcast[RankState] at m.py:7 called from sched.py:91"


def test_two_thin_wrappers_at_one_site_diverge_offline_as_they_do_live():
    """A dispatcher's one line reaches two thin wrappers: the entries' ``via`` tells the calls
    apart, in plain calls and in a role branch's arms."""
    def vote(r: int) -> Dict[str, Any]:
        return entry(0, site="dist.py:40", via=f"Dist.{'timeout' if r == 2 else 'batch'}_vote "
                                                 f"(dist.py:{50 if r == 2 else 44})")
    div = analyze(dumps_of(*(dump(r, [comm(r, 3, [vote(r)])]) for r in range(3)))).comms[0] \
        .divergence
    assert div is not None and div.kinds == [MismatchKind.CALL]
    assert div.text.splitlines()[1:] == [
        "  ranks 0-1: allgather[RankState] at dist.py:40 through Dist.batch_vote (dist.py:44)",
        "  rank 2:    allgather[RankState] at dist.py:40 through Dist.timeout_vote (dist.py:50)",
        "  only the thin wrappers differ: the ranks reached this line through different ones "
        "(a dispatcher, a decorator's frame, a worker thread, a subclass's override, a proxy "
        "only some ranks use), so a rank skipped or added a call before this one, or these are "
        "one collective: then give this call the same name= on every rank"]

    def bcast(r: int) -> Dict[str, Any]:
        arm = 0 if r == 0 else 1
        return entry(0, op="bcast", site=f"m.py:{4 + 3 * arm}", branch={"key": "k", "arm": arm},
                     via=f"Sizes.bcast ({'b' if r == 2 else 'a'}.py:6)")
    div = analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(r)])]) for r in range(3)))).comms[0] \
        .divergence
    assert div is not None and div.kinds == [MismatchKind.CALL]


def test_receivers_that_name_no_schema_take_the_roots_class():
    """``comm.bcast(x if rank == 0 else None)``: the receivers' records name no schema, as
    live they take the root's class; so do receivers in a role branch's other arm."""
    def bcast(r: int, schema: str, site: str = "m.py:4", **more: Any) -> Dict[str, Any]:
        return entry(0, op="bcast", schema=schema if r == 0 else "", site=site, **more)
    ok = analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(r, "Plan")])]) for r in range(3))))
    assert ok.consistent and ok.first is None
    branch = analyze(dumps_of(*(dump(r, [comm(r, 3, [bcast(
        r, "int", site=f"m.py:{4 + 3 * (r > 0)}", branch={"key": "m.py:3 bcast #1",
                                                          "arm": int(r > 0)})])])
        for r in range(3))))
    assert branch.consistent
    # Named schemas that differ, and ranks in other ops, are still divergences.
    two = [entry(0, op="bcast", schema=["Plan", "", "Stats"][r]) for r in range(3)]
    named = analyze(dumps_of(*(dump(r, [comm(r, 3, [two[r]])]) for r in range(3))))
    div = named.comms[0].divergence
    assert div is not None and div.kinds == [MismatchKind.SCHEMA]
    mixed = [entry(0, op="bcast" if r else "allgather", schema="Plan" if r == 1 else "")
             for r in range(3)]
    other = analyze(dumps_of(*(dump(r, [comm(r, 3, [mixed[r]])]) for r in range(3))))
    assert other.comms[0].divergence is not None


def test_rank_whose_count_stops_earlier_is_missing_with_where_it_was():
    docs = [dump(r, [comm(r, 3, steady(6 if r != 1 else 4),
                          where="prog.py:30 in main" if r == 1 else "?")]) for r in range(3)]
    report = analyze(dumps_of(*docs))
    missing = report.comms[0].missing
    assert missing is not None and missing.seq == 4 and missing.missing == [1]
    assert missing.kinds == [MismatchKind.MISSING_RANKS]
    assert report.comms[0].divergence is None
    assert missing.text.splitlines()[0] == \
        "collective #4 on COMM_WORLD is missing ranks: rank 1 never started it"
    assert ("  rank 1: stops at #3 (allgather[RankState] at loop.py:10, step 3: completed); "
            "at dump time at prog.py:30 in main") in missing.text


def test_a_missing_rank_is_shown_with_the_decisions_that_differ():
    """Rank 2 had an empty batch and skipped #4; its peers went on into it. The finding names
    what rank 2 decided, as a live hang report does, and leaves out what every rank noted
    alike."""
    docs = []
    for r in range(3):
        notes = [{"key": "has_batch", "value": r != 2, "site": "worker.py:77", "step": 4},
                 {"key": "tp_size", "value": 8, "site": "worker.py:12", "step": 0}]
        docs.append(dump(r, [comm(r, 3, steady(6 if r != 2 else 4), notes=notes)]))
    missing = analyze(dumps_of(*docs)).comms[0].missing
    assert missing is not None and missing.missing == [2]
    assert missing.decisions == [("has_batch", "worker.py:77",
                                  [("ranks 0-1", "True"), ("rank 2", "False")])]
    assert missing.text.splitlines()[-2:] == [
        "  decisions that differ:",
        "    has_batch at worker.py:77 — ranks 0-1: True; rank 2: False"]


def test_a_rank_without_a_dump_is_shown_as_its_peers_last_heard_it():
    """Rank 2 ended (or was killed) without a dump while ranks 0-1 waited in #4; rank 0's hang
    report had asked it over the side channel, and its dump keeps the answer: where rank 2
    was, what it had issued and what it had decided."""
    timed_out = dict(state="failed", error="CollectiveTimeout: collective #4 timed out")
    notes = [{"key": "has_batch", "value": True, "site": "worker.py:77", "step": 4}]
    docs = [dump(r, [comm(r, 3, steady(4) + [entry(4, step=4, **timed_out)], notes=notes)])
            for r in range(2)]
    state = {"id": "COMM_WORLD", "name": "COMM_WORLD", "instance": 1, "rank": 2, "size": 3,
             "seq": 4, "last": entry(3, step=3),
             "notes": [{"key": "has_batch", "value": False, "site": "worker.py:77", "step": 4}]}
    heard = {"rank": 2, "answered": True, "asked_ns": 9, "seen_ns": 10,
             "status": {"rank": 2, "where": "worker.py:90 in idle_loop", "comms": [state]}}
    docs[0]["comms"][0]["peers"] = [heard, {**heard, "seen_ns": 1, "status": {
        "rank": 2, "where": "older.py:1 in f", "comms": [state]}}]
    missing = analyze(dumps_of(*docs)).comms[0].missing
    assert missing is not None and missing.no_dump == [2] and missing.missing == []
    assert missing.text.splitlines()[-4:] == [
        "  rank 2: no dump (killed, or ran without TYPEDCOLL_TRACE_DIR)",
        "  rank 2, as rank 0 last heard from it: issued #3 (allgather[RankState] at loop.py:10, "
        "step 3: completed); at worker.py:90 in idle_loop",
        "  decisions that differ:",
        "    has_batch at worker.py:77 — ranks 0-1: True; rank 2: False"]


def test_a_collective_every_member_started_but_that_did_not_complete_is_a_finding():
    """A timeout every rank reported, the late one included: every count is level, yet the
    newest collective failed; it is no "consistent" run."""
    timed_out = dict(state="failed", error="CollectiveTimeout: collective #4 timed out")
    docs = [dump(r, [comm(r, 3, steady(4) + [entry(4, step=4, **timed_out)])]) for r in range(3)]
    report = analyze(dumps_of(*docs))
    assert not report.consistent and report.first is not None
    assert report.first.seq == 4 and report.first.text.splitlines() == [
        "collective #4 on COMM_WORLD did not complete: every member started it",
        "  ranks 0-2: failed (CollectiveTimeout: collective #4 timed out)"]


def test_a_rank_whose_call_failed_as_abandoned_came_late_though_its_peers_ended_after():
    """Rank 2 started #4 inside its peers' hang-report wait, after their deadline: their ends
    come after its start, but its own verdict said it came late."""
    timed_out = dict(state="failed", error="CollectiveTimeout: collective #4 timed out")
    docs = [dump(r, [comm(r, 3, steady(4) + [entry(4, step=4, **timed_out)])]) for r in range(3)]
    docs[2]["comms"][0]["entries"][-1]["error"] = (
        "CollectiveTimeout: collective #4 on COMM_WORLD: allgather[int] at x.py:1 is abandoned: "
        "rank 0 gave up waiting")
    report = analyze(dumps_of(*docs))
    assert report.first is not None and report.first.text.splitlines()[0] == (
        "collective #4 on COMM_WORLD did not complete: rank 2 started it after a peer had given "
        "up waiting (it came late: its call failed as abandoned; its peers waited for it)")


def test_a_rank_that_started_after_every_peer_gave_up_came_late():
    """Its own dump, written as it gave up in turn, replaced the one its peers' questions made:
    every count is level, but it started #4 after every peer had ended it, so it came late
    (no transport stalled)."""
    timed_out = dict(state="failed", error="CollectiveTimeout: collective #4 timed out")
    docs = [dump(r, [comm(r, 3, steady(4) + [entry(4, **timed_out)])]) for r in range(3)]
    late = docs[2]["comms"][0]["entries"][-1]
    late.update(t_start_ns=3_000_000_000, t_end_ns=7_000_000_000)
    report = analyze(dumps_of(*docs))
    assert report.first is not None and report.first.text.splitlines()[0] == (
        "collective #4 on COMM_WORLD did not complete: rank 2 started it 3.0 s after every peer "
        "had given up waiting (it came late: its peers waited for it)")


def test_findings_on_a_sub_communicator_say_how_it_numbers_its_ranks():
    """World ranks 1 and 3 are ranks 0 and 1 of their split: a finding says so, as live
    errors do, so that "rank 1" can be found."""
    split = "COMM_WORLD.split(1)[1,3]"
    docs = []
    for r, world in enumerate([1, 3]):
        c = comm(r, 2, steady(3 if r == 0 else 2), comm_id=split)
        c["world_ranks"] = [1, 3]
        docs.append(dump(world, [c]))
    report = analyze(dumps_of(*docs))
    assert report.first is not None and report.first.text.splitlines()[0] == (
        f"collective #2 on {split} (ranks 0-1 here are world ranks 1,3) is missing ranks: rank 1 "
        f"never started it")


def test_member_without_a_dump_is_missing():
    es = steady(3)
    es[-1].update(state="failed", error="CollectiveTimeout: collective #2 on COMM_WORLD: ...")
    report = analyze(dumps_of(dump(0, [comm(0, 3, es)])))
    missing = report.comms[0].missing
    assert missing is not None and missing.seq == 2 and missing.no_dump == [1, 2]
    assert "  ranks 1-2: no dump (killed, or ran without TYPEDCOLL_TRACE_DIR)" in missing.text


def test_an_idle_communicator_beside_a_rank_without_a_dump_is_no_finding():
    """Rank 3 left no dump; every rank holds a dup on which nothing was issued. The dumped
    members of the dup are level at count 0: no collective on it waits for rank 3, so the
    finding is COMM_WORLD's #4, where rank 3 left the others waiting."""
    timed_out = dict(state="failed", error="CollectiveTimeout: collective #4 timed out")
    docs = [dump(r, [comm(r, 4, steady(4) + [entry(4, **timed_out)]),
                     comm(r, 4, [], comm_id="COMM_WORLD.dup", where="scen.py:49 in <module>")],
                 reason="CollectiveTimeout") for r in range(3)]
    report = analyze(dumps_of(*docs))
    dup = {c.comm: c for c in report.comms}["COMM_WORLD.dup"]
    assert dup.missing is None and dup.divergence is None
    assert consistent_text(dup) == \
        "consistent: nothing was issued on it by ranks 0-2 (the others left no dump)"
    first = report.first
    assert first is not None and (first.comm, first.seq) == ("COMM_WORLD", 4)
    assert (first.missing, first.no_dump) == ([], [3])


def test_communicator_never_used_by_one_rank():
    a = dump(0, [comm(0, 2, steady(2)), comm(0, 2, [], comm_id="side")])
    b = dump(1, [comm(1, 2, steady(2)), comm(1, 2, [entry(0, op="barrier", schema="",
                                                         state="started")], comm_id="side")])
    side = {c.comm: c for c in analyze(dumps_of(a, b)).comms}["side"]
    assert side.missing is not None and side.missing.missing == [0]
    assert "rank 0: issued no collective" in side.missing.text


def test_ring_windows_compare_only_what_every_rank_still_holds():
    a = dump(0, [comm(0, 2, steady(10)[6:])])
    b = dump(1, [comm(1, 2, steady(10)[2:])])
    assert analyze(dumps_of(a, b)).comms[0].compared == (6, 9)


def test_buffer_off_dumps_compare_sequence_numbers_only():
    report = analyze(dumps_of(*(dump(r, [comm(r, 2, [], seq=5)]) for r in range(2))))
    assert report.consistent and report.comms[0].compared is None


def test_an_unused_communicator_says_nothing_was_issued_not_that_the_recorder_is_off(
        tmp_path, capsys):
    write(tmp_path, [dump(r, [comm(r, 2, steady(2)), comm(r, 2, [], comm_id="side"),
                              comm(r, 2, [], seq=3, comm_id="unrecorded")]) for r in range(2)])
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "side (2 ranks; compared collectives none):\n  consistent: nothing was issued on " \
           "it\n" in out
    assert "unrecorded (2 ranks; compared collectives none):\n  consistent sequence numbers; " \
           "no entries to compare (flight recorder off, TYPEDCOLL_TRACE_BUFFER=0?)\n" in out


def test_creation_entries_are_not_aligned_and_read_as_creation(tmp_path, capsys):
    create = entry(2 ** 64 - 1, op="create", schema="tuple[bool, float]", t_start_ns=0)
    write(tmp_path, [dump(r, [comm(r, 2, [create] + steady(2), seq=2)]) for r in range(2)])
    assert main([str(tmp_path), "--last", "3"]) == 0
    out = capsys.readouterr().out
    assert "(2 ranks; compared collectives #0-#1):\n  consistent" in out
    # The settings are typedcoll's own: the op alone names the call.
    assert "    COMM_WORLD creation create at loop.py:10: completed" in out


def test_last_entries_merge_communicators_in_time_order():
    a = dump(0, [comm(0, 2, steady(3)),
                 comm(0, 2, [dict(entry(0, op="barrier"), t_start_ns=1500)], comm_id="side")])
    b = dump(1, [comm(1, 2, steady(3)),
                 comm(1, 2, [dict(entry(0, op="barrier"), t_start_ns=1500)], comm_id="side")])
    report = analyze(dumps_of(a, b), last=3)
    assert [(c, e.seq) for c, e in report.last[0].entries] == [
        ("COMM_WORLD", 1), ("side", 0), ("COMM_WORLD", 2)]


def test_clean_strips_control_characters_and_bounds_length():
    assert clean("a\x1b[31mb\nc\x00") == "a?[31mb?c?"
    assert clean("x" * 10_000) == "x" * 199 + "…"


# --- reading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    (b'{"format": "typedcoll-trace", "version": 2, "rank": 0, "comms": [{"id"',
     "truncated or not JSON"),
    (b'{"format": "chrome-trace", "traceEvents": []}', "not a typedcoll trace dump"),
    (b'[1, 2, 3]', "not a typedcoll trace dump"),
    (b'{"format": "typedcoll-trace", "version": 1, "rank": 0}', "unsupported dump version 1"),
    (b'{"format": "typedcoll-trace", "version": 2, "rank": "zero"}', "malformed typedcoll dump"),
])
def test_unreadable_dumps_name_the_file(data, message):
    with pytest.raises(TraceInputError, match=rf"^rank0\.json: .*{message}"):
        parse_dump(data, "rank0.json")


def write(directory: Path, docs: List[Dict[str, Any]]) -> None:
    for d in docs:
        (directory / f"rank{d['rank']}.json").write_text(json.dumps(d))


HOSTILE = [
    (lambda d: d["comms"][0].update(size=10 ** 12),
     "communicator 'COMM_WORLD': size 1000000000000 outside 1..1048576"),
    (lambda d: d["comms"][0].update(rank=5), "communicator 'COMM_WORLD': rank 5 outside 0..1"),
    (lambda d: d["comms"][0].update(seq=2 ** 70), "malformed typedcoll dump"),
    (lambda d: d["comms"][0].update(seq=-1), "seq -1 outside 0..2**64-1"),
    (lambda d: d["comms"][0].update(world_ranks=[0]), "world_ranks must hold 2 ranks"),
    (lambda d: d["comms"][0]["entries"][0].update(seq=-5), "entry seq -5 outside"),
    (lambda d: d["comms"][0]["entries"].append(dict(d["comms"][0]["entries"][1], step=9)),
     "communicator 'COMM_WORLD': two entries numbered #1"),
    (lambda d: d.update(rank=2 ** 40), "rank 1099511627776 outside 0..1048575"),
    (lambda d: d.update(comms=d["comms"] * 5000), "5000 communicators, over the 4096"),
]


@pytest.mark.parametrize("edit, message", HOSTILE)
def test_hostile_numbers_are_refused_before_anything_is_sized_by_them(tmp_path, capsys, edit,
                                                                      message):
    doc = dump(0, [comm(0, 2, steady(3))])
    edit(doc)
    (tmp_path / "rank0.json").write_text(json.dumps(doc))
    started = time.monotonic()
    assert main([str(tmp_path)]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert err.startswith(f"typedcoll trace: error: {tmp_path / 'rank0.json'}: ") and \
        message in err, err


def test_huge_sequence_numbers_do_not_spin(tmp_path, capsys):
    top = 2 ** 63 - 1
    write(tmp_path, [dump(0, [comm(0, 2, [entry(top - 1), entry(top)], seq=top + 1)]),
                     dump(1, [comm(1, 2, [entry(3)], seq=4)])])
    started = time.monotonic()
    assert main([str(tmp_path)]) == 1
    assert time.monotonic() - started < 5
    out = capsys.readouterr().out
    assert "collective #4 on COMM_WORLD is missing ranks: rank 1 never started it" in out


def test_a_fifo_named_like_a_dump_is_refused_without_blocking(tmp_path, capsys):
    write(tmp_path, [dump(1, [comm(1, 2, steady(1))])])
    os.mkfifo(tmp_path / "rank0.json")
    started = time.monotonic()
    assert main([str(tmp_path)]) == 2
    assert time.monotonic() - started < 5
    assert "rank0.json: not a regular file (a FIFO, device or directory named like a dump); " \
        "refused" in capsys.readouterr().err


def test_a_file_over_the_limit_is_refused_from_its_size(tmp_path, capsys, monkeypatch):
    path = tmp_path / "rank0.json"
    with open(path, "wb") as fh:  # sparse: a terabyte on paper, nothing on disk
        fh.truncate(2 ** 40)
    started = time.monotonic()
    assert main([str(tmp_path)]) == 2
    assert time.monotonic() - started < 5
    assert f"rank0.json: {2 ** 40} bytes, over the {trace.MAX_FILE_BYTES} bytes a dump may " \
        f"have; refused" in capsys.readouterr().err


def test_windows_keep_only_the_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(trace, "WINDOW", 3)
    write(tmp_path, [dump(r, [comm(r, 2, steady(10))]) for r in range(2)])
    dumps = trace.load_dir(str(tmp_path))
    assert [e.seq for e in dumps[0].comms[0].entries] == [7, 8, 9]


def test_a_dump_under_another_rank_s_name_is_refused(tmp_path, capsys):
    (tmp_path / "rank3.json").write_text(json.dumps(dump(0, [comm(0, 2, steady(1))])))
    assert main([str(tmp_path)]) == 2
    assert "rank3.json: the dump says it is rank 0's" in capsys.readouterr().err


def test_two_dumps_of_one_member_or_two_sizes_are_refused(tmp_path, capsys):
    write(tmp_path, [dump(0, [comm(0, 2, steady(1))]), dump(1, [comm(0, 2, steady(1))])])
    assert main([str(tmp_path)]) == 2
    assert "communicator 'COMM_WORLD' rank 0 is also in" in capsys.readouterr().err
    write(tmp_path, [dump(1, [comm(1, 3, steady(1))])])
    assert main([str(tmp_path)]) == 2
    assert "communicator 'COMM_WORLD' has 3 ranks here and 2 in" in capsys.readouterr().err


def test_members_that_map_a_communicator_to_other_world_ranks_are_refused(tmp_path, capsys):
    """One id, two layouts: the dumps come from two runs, and findings would name its ranks
    by whichever file was read first."""
    def member(r: int, world_ranks: List[int]) -> Dict[str, Any]:
        c = comm(r, 2, steady(2), comm_id="tp")
        c["world_ranks"] = world_ranks
        return dump(world_ranks[r], [c])
    write(tmp_path, [member(0, [1, 3]), member(1, [1, 3])])
    assert main([str(tmp_path), "--last", "0"]) == 0
    (tmp_path / "rank3.json").unlink()
    write(tmp_path, [member(1, [1, 2])])
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"typedcoll trace: error: {tmp_path / 'rank2.json'}: communicator 'tp' has world rank 2 "
        f"as its rank 1 here and world rank 3 in {tmp_path / 'rank1.json'}: dumps of two "
        f"runs\n")


def test_dumps_of_two_runs_are_refused_naming_both_ranks(tmp_path, capsys):
    """A reused directory keeps a rank's dump from an earlier run: its collectives ended before
    this run's started, which no collective does, so the dumps are refused, not analysed."""
    def shifted(rank: int, seconds: float) -> Dict[str, Any]:
        es = steady(3)
        for e in es:
            e["t_start_ns"] += int(seconds * 1e9)
            e["t_end_ns"] += int(seconds * 1e9)
        return dump(rank, [comm(rank, 3, es)])
    write(tmp_path, [shifted(0, 30.0), shifted(1, 30.0), shifted(2, 0.0)])
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rank 2's and rank 0's dumps are from different runs: collective #0 on COMM_WORLD " \
           "ended on rank 2 30.0 s before it started on rank 0" in err, err
    assert main([str(tmp_path), "--clock-skew", "60"]) == 0
    write(tmp_path, [shifted(2, 29.5)])  # within the default skew of one run's clocks
    assert main([str(tmp_path)]) == 0
    capsys.readouterr()


# --- the CLI -------------------------------------------------------------------------------------
def test_cli_exit_codes_and_text(tmp_path, capsys):
    write(tmp_path, [dump(r, [comm(r, 2, steady(3))]) for r in range(2)])
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "COMM_WORLD (2 ranks; compared collectives #0-#2):\n  consistent" in out
    write(tmp_path, [dump(1, [comm(1, 2, steady(2))])])
    assert main([str(tmp_path), "--last", "1"]) == 1
    out = capsys.readouterr().out
    assert "first finding: collective #2 on COMM_WORLD is missing ranks: rank 1 never started " \
           "it\n" in out
    assert "  rank 1:\n    COMM_WORLD #1 allgather[RankState] at loop.py:10, step 1: completed" \
        in out
    assert main([str(tmp_path), "--last", "0"]) == 1
    out = capsys.readouterr().out
    assert "first finding: collective #2" in out and "last entries" not in out and \
        "none recorded" not in out, out


def test_cli_lines_are_whole_and_clean(tmp_path, capsys):
    docs = []
    for r in range(2):
        es = steady(2) + [entry(2, site="evil\x1b[2J.py:1\nFAKE LINE" if r else "ok.py:3",
                                state="failed", error="DesyncError: collective #2 on "
                                                      "COMM_WORLD diverged (call site):")]
        docs.append(dump(r, [comm(r, 2, es)], reason="Desync\nError"))
    write(tmp_path, docs)
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\nFAKE LINE" not in out
    assert ("first finding: collective #2 on COMM_WORLD diverged (call site): rank 0 at "
            "ok.py:3; rank 1 at evil?[2J.py:1?FAKE LINE\n") in out
    assert "  rank 0: dumped on Desync?Error (node0 pid 100)" in out
    assert ": failed (DesyncError: collective #2 on COMM_WORLD diverged (call site))\n" in out


def test_cli_json(tmp_path, capsys):
    write(tmp_path, [dump(0, [comm(0, 2, steady(2))]),
                     dump(1, [comm(1, 2, steady(1) + [entry(1, op="bcast", step=1)])])])
    assert main([str(tmp_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["format"], doc["version"], doc["consistent"]) == (
        "typedcoll-trace-report", 2, False)
    assert doc["first"]["seq"] == 1 and doc["first"]["kinds"] == ["op"]
    assert [g["ranks"] for g in doc["first"]["groups"]] == [[0], [1]]
    assert doc["first"]["groups"][0]["envelope"]["op"] == "allgather"
    assert [t["rank"] for t in doc["last"]] == [0, 1]
    assert doc["last"][1]["entries"][-1][0] == "COMM_WORLD"
    assert doc["last"][1]["entries"][-1][1]["op"] == "bcast"
    assert doc["comms"][0]["compared"] == [0, 1]


def test_cli_unreadable_input_exits_2(tmp_path, capsys):
    write(tmp_path, [dump(0, [comm(0, 1, steady(1))])])
    (tmp_path / "rank1.json").write_bytes(b'{"format": "typedcoll-trace", "vers')
    assert main([str(tmp_path)]) == 2
    assert f"typedcoll trace: error: {tmp_path / 'rank1.json'}: truncated or not JSON" \
        in capsys.readouterr().err
    assert main([str(tmp_path / "absent")]) == 2
    assert "cannot list the directory" in capsys.readouterr().err
    empty = tmp_path / "none"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no rank<R>.json dumps" in capsys.readouterr().err
