"""The trace analyzer: pure logic on hand-built per-rank dumps, and the CLI on files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import msgspec
import pytest

from typedcoll import MismatchKind
from typedcoll._trace import Dump, TraceInputError, analyze, main, parse_dump


def entry(seq: int, op: str = "allgather", schema: str = "RankState", site: str = "loop.py:10",
          step: Optional[int] = None, state: str = "completed") -> Dict[str, Any]:
    return {"seq": seq, "op": op, "schema": schema, "fingerprint": schema.lower()[:8],
            "site": site, "step": step, "bytes": 7, "state": state,
            "t_start_ns": 1_000 * seq, "t_end_ns": None, "error": None}


def dump(rank: int, comms: List[Dict[str, Any]], reason: str = "DesyncError") -> Dict[str, Any]:
    return {"format": "typedcoll-trace", "version": 1, "rank": rank, "world_size": 4,
            "host": "node0", "pid": 100 + rank, "time_ns": 0, "reason": reason, "message": "",
            "events": [reason], "comms": comms}


def comm(rank: int, size: int, entries: List[Dict[str, Any]], seq: Optional[int] = None,
         comm_id: str = "COMM_WORLD") -> Dict[str, Any]:
    return {"id": comm_id, "name": comm_id, "rank": rank, "size": size,
            "world_ranks": list(range(size)), "transport": "mpi",
            "seq": seq if seq is not None else (entries[-1]["seq"] + 1 if entries else 0),
            "timeout": None, "capacity": 2000, "recorded": len(entries), "entries": entries}


def dumps_of(*docs: Dict[str, Any]) -> Dict[int, Dump]:
    return {d["rank"]: msgspec.convert(d, Dump) for d in docs}


def steady(n: int) -> List[Dict[str, Any]]:
    return [entry(s, step=s) for s in range(n)]


def test_consistent_dumps_have_no_finding():
    report = analyze(dumps_of(*(dump(r, [comm(r, 3, steady(5))]) for r in range(3))))
    assert report.consistent and report.first is None
    assert report.comms[0].compared == (0, 4)


def test_first_divergence_groups_ranks_like_a_live_desync():
    docs = []
    for r in range(4):
        es = steady(3)
        es.append(entry(3, schema="TimeoutFlag", site="py_executor.py:4438", step=3) if r == 3
                  else entry(3, site="adp_router.py:88", step=3))
        es.append(entry(4, op="barrier", schema="", site="loop.py:20"))
        docs.append(dump(r, [comm(r, 4, es)]))
    report = analyze(dumps_of(*docs))
    assert not report.consistent
    div = report.comms[0].divergence
    assert div is not None and div.seq == 3 and div.kinds == [MismatchKind.SCHEMA]
    assert [g.ranks for g in div.groups] == [(0, 1, 2), (3,)]
    assert div.text == ("collective #3 on COMM_WORLD diverged (schema):\n"
                        "  ranks 0-2: allgather[RankState] at adp_router.py:88 step 3\n"
                        "  rank 3:    allgather[TimeoutFlag] at py_executor.py:4438 step 3")
    assert report.first is div


def test_op_and_step_divergence_kinds():
    a = dump(0, [comm(0, 2, [entry(0, step=1)])])
    b = dump(1, [comm(1, 2, [entry(0, op="gather", step=2)])])
    div = analyze(dumps_of(a, b)).comms[0].divergence
    assert div is not None and div.kinds == [MismatchKind.OP, MismatchKind.STEP]


def test_rank_whose_buffer_stops_earlier_is_missing():
    docs = [dump(r, [comm(r, 3, steady(6 if r != 1 else 4))]) for r in range(3)]
    report = analyze(dumps_of(*docs))
    missing = report.comms[0].missing
    assert missing is not None and missing.seq == 4 and missing.missing == [1]
    assert missing.kinds == [MismatchKind.MISSING_RANKS]
    assert report.comms[0].divergence is None
    assert missing.text.splitlines()[0] == \
        "collective #4 on COMM_WORLD is missing ranks: rank 1 never started it"
    assert "  rank 1: stops at #3 (allgather[RankState] at loop.py:10 step 3, completed)" \
        in missing.text


def test_member_without_a_dump_is_missing():
    es = steady(3)
    es[-1]["state"] = "failed"
    es[-1]["error"] = "CollectiveTimeout: collective #2 on COMM_WORLD: ..."
    report = analyze(dumps_of(dump(0, [comm(0, 2, es)])))
    missing = report.comms[0].missing
    assert missing is not None and missing.seq == 2 and missing.no_dump == [1]
    assert "rank 1: no dump" in missing.text


def test_communicator_never_used_by_one_rank():
    a = dump(0, [comm(0, 2, steady(2)), comm(0, 2, [], comm_id="side")])
    b = dump(1, [comm(1, 2, steady(2)), comm(1, 2, [entry(0, op="barrier", schema="",
                                                         state="started")], comm_id="side")])
    report = analyze(dumps_of(a, b))
    side = {c.comm: c for c in report.comms}["side"]
    assert side.missing is not None and side.missing.missing == [0]
    assert "rank 0: issued no collective" in side.missing.text


def test_ring_windows_compare_only_what_every_rank_still_holds():
    a = dump(0, [comm(0, 2, steady(10)[6:])])
    b = dump(1, [comm(1, 2, steady(10)[2:])])
    assert analyze(dumps_of(a, b)).comms[0].compared == (6, 9)


def test_buffer_off_dumps_compare_sequence_numbers_only():
    report = analyze(dumps_of(*(dump(r, [comm(r, 2, [], seq=5)]) for r in range(2))))
    assert report.consistent and report.comms[0].compared is None


def test_last_entries_merge_communicators_in_time_order():
    a = dump(0, [comm(0, 2, steady(3)), comm(0, 2, [dict(entry(0, op="barrier"), t_start_ns=1500)],
                                              comm_id="side")])
    b = dump(1, [comm(1, 2, steady(3)), comm(1, 2, [dict(entry(0, op="barrier"), t_start_ns=1500)],
                                              comm_id="side")])
    report = analyze(dumps_of(a, b), last=3)
    assert [(c, e.seq) for c, e in report.last[0]] == [("COMM_WORLD", 1), ("side", 0),
                                                      ("COMM_WORLD", 2)]


@pytest.mark.parametrize("data, message", [
    (b'{"format": "typedcoll-trace", "version": 1, "rank": 0, "comms": [{"id"',
     "truncated or not JSON"),
    (b'{"format": "chrome-trace", "traceEvents": []}', "not a typedcoll trace dump"),
    (b'[1, 2, 3]', "not a typedcoll trace dump"),
    (b'{"format": "typedcoll-trace", "version": 99, "rank": 0}', "unsupported dump version 99"),
    (b'{"format": "typedcoll-trace", "version": 1, "rank": "zero"}', "malformed typedcoll dump"),
])
def test_unreadable_dumps_name_the_file(data, message):
    with pytest.raises(TraceInputError, match=rf"^rank0\.json: .*{message}"):
        parse_dump(data, "rank0.json")


def write(directory: Path, docs: List[Dict[str, Any]]) -> None:
    for d in docs:
        (directory / f"rank{d['rank']}.json").write_text(json.dumps(d))


def test_cli_exit_codes_and_text(tmp_path, capsys):
    write(tmp_path, [dump(r, [comm(r, 2, steady(3))]) for r in range(2)])
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "COMM_WORLD (2 ranks; compared collectives #0-#2):\n  consistent" in out
    write(tmp_path, [dump(1, [comm(1, 2, steady(2))])])
    assert main([str(tmp_path), "--last", "1"]) == 1
    out = capsys.readouterr().out
    assert "first finding: collective #2 on COMM_WORLD is missing ranks" in out
    assert "  rank 1:\n    COMM_WORLD #1 allgather[RankState] at loop.py:10 step 1, completed" in out


def test_cli_json(tmp_path, capsys):
    write(tmp_path, [dump(0, [comm(0, 2, steady(2))]),
                     dump(1, [comm(1, 2, steady(1) + [entry(1, op="bcast", step=1)])])])
    assert main([str(tmp_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "typedcoll-trace-report" and doc["consistent"] is False
    assert doc["first"]["seq"] == 1 and doc["first"]["kinds"] == ["op"]
    assert [g["ranks"] for g in doc["first"]["groups"]] == [[0], [1]]


def test_cli_unreadable_input_exits_2(tmp_path, capsys):
    write(tmp_path, [dump(0, [comm(0, 1, steady(1))])])
    (tmp_path / "rank1.json").write_bytes(b'{"format": "typedcoll-trace", "vers')
    assert main([str(tmp_path)]) == 2
    assert f"typedcoll trace: error: {tmp_path / 'rank1.json'}: truncated or not JSON" \
        in capsys.readouterr().err
    assert main([str(tmp_path / "empty")]) == 2
    empty = tmp_path / "none"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no rank<R>.json dumps" in capsys.readouterr().err
