"""The executor model: raw reproduces the engine's three failures, typed names the divergence,
symmetric conserves every message in all three loops."""

from __future__ import annotations

import re

import pytest

from launch import run_spmd
from typedcoll.executor._runner import final_record, read_records

RUN = """
from typedcoll.executor._plan import FaultPlan
from typedcoll.executor._runner import worker
plan = {plan}
worker({results!r}, plan, modes={modes!r}, cost_rounds=0, hang_after=1.0, grace=1.5)
"""

# Each plan: one rank keeps its previous batch while a peer idles (or the reverse), so the gate
# `previous_batch is not None and (can_queue or not can_queue_this_rank)` differs between ranks.
SCENARIOS = {
    "bool": ("FaultPlan.scripted(2, 8, loop='overlap', disaggregated=True, empty=[(1, 3)], "
             "metrics_all=True)",
             "TypeError: argument of type 'bool' is not iterable", "error/blocked-request vote",
             (3, "allgather[TimeoutFlag]", 4, "allgather[KvStatus]")),
    "27": ("FaultPlan.scripted(2, 8, loop='overlap', empty=[(1, 3)], metrics_all=True)",
           "TypeError: RankState.__init__() takes from 2 to 4 positional arguments but 27 were "
           "given", "router gather of rank states",
           (3, "allgather[IterStats]", 4, "allgather[RankState]")),
    "int": ("FaultPlan.scripted(2, 8, loop='non_overlap', empty=[(1, 2)], metrics_on=[(0, 3)])",
            "TypeError: 'int' object is not iterable", "forward tp_cp_allgather (flattening)",
            (3, "allgather[IterStats]", 3, "allgather[tuple[bool, int]]")),
}


def _run(tmp_path, plan: str, modes, nranks: int, timeout: float = 90):
    results = tmp_path / "results"
    results.mkdir()
    result = run_spmd(RUN.format(plan=plan, results=str(results), modes=tuple(modes)), nranks,
                      timeout=timeout, tmp_path=tmp_path, abort_on_error=False)
    assert not result.timed_out, repr(result)
    return read_records(str(results)), result


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_raw_reproduces_and_typed_names_the_divergence(name, tmp_path):
    plan, error, where, (step_a, call_a, step_b, call_b) = SCENARIOS[name]
    records, result = _run(tmp_path, plan, ("typed", "raw"), 2)
    raw = {r: final_record(recs, "raw") for r, recs in records.items()}
    crashed = [o for o in raw.values() if o["status"] == "crashed"]
    assert crashed and all(o["error"] == error and o["where"] == where for o in crashed), raw
    # The others did not hang forever: each is reported blocked, then the job was aborted.
    assert all(o["status"] in ("crashed", "hung") for o in raw.values()), raw

    typed = [final_record(recs, "typed") for recs in records.values()]
    assert {o["status"] for o in typed} == {"desync"}
    assert len({o["error"] for o in typed}) == 1 and len({o["seq"] for o in typed}) == 1
    text = typed[0]["error"]
    lines = text.splitlines()
    assert re.match(rf"typedcoll.DesyncError: collective #{typed[0]['seq']} on tp diverged \(",
                    lines[0]), text
    sites = {re.search(r"(allgather\[.+\]) at (_model\.py:\d+) step (\d+)", line).groups()
             for line in lines[1:]}
    assert {(call, int(step)) for call, _, step in sites} == {(call_a, step_a), (call_b, step_b)}
    assert len({site for _, site, _ in sites}) == 2, text  # two different lines of the model


@pytest.mark.parametrize("nranks, iterations", [(2, 300), (4, 40)])
def test_symmetric_conserves_messages_in_every_loop(nranks, iterations, tmp_path):
    runs = []
    for loop in ("overlap", "non_overlap", "pipeline"):
        for seed, disagg in ((1, True), (2, False)):
            d = tmp_path / f"{loop}-{seed}"
            d.mkdir()
            plan = (f"FaultPlan.random({seed}, {nranks}, {iterations}, loop={loop!r}, "
                    f"disaggregated={disagg}, p_empty=0.15, p_timeout=0.2)")
            records, _ = _run(d, plan, ("symmetric",), nranks, timeout=240)
            outs = [final_record(records[r], "symmetric") for r in range(nranks)]
            assert all(o["status"] == "completed" for o in outs), outs
            per_batch = 2 if loop == "pipeline" else 1
            # The pipeline loop flushes at the bottom of every handled micro-batch: equally often
            # on every rank (ledgers compared in the model's final check), 2 per iteration here.
            assert {o["flushes"] for o in outs} == {1 + per_batch * iterations}
            assert outs[0]["deliveries"] == outs[0]["posted"] * nranks
            runs.append(outs[0]["posted_by_channel"])
    # The random plans exercised every channel.
    assert all(sum(r[ch] for r in runs) > 0 for ch in ("rank_state", "timeouts", "iter_stats"))
