"""The executor model. On in-process ranks (``typedcoll.testing.run``): the typed mode raises one
DesyncError on every rank at the fault, naming the two lines of the model and the decisions that
differ; the symmetric mode runs to the end with every message conserved, in all three loops.
Under mpiexec: the raw mode reproduces the engine's three failures."""

from __future__ import annotations

import re

import pytest

import typedcoll as tc
from launch import run_spmd
from typedcoll import testing
from typedcoll.demo.backends import typed_backend
from typedcoll.demo.demo import final_record, read_records
from typedcoll.demo.model import ExecutorModel
from typedcoll.demo.plan import LOOPS, FaultPlan


def run_model(comm, plan, mode):
    world = comm.dup()
    return ExecutorModel(typed_backend(mode, comm, world), plan, comm.rank, comm.size).run()


def run(plan, mode):
    return testing.run(plan.ranks, run_model, plan, mode, timeout=20, name="tp")


def desync(plan):
    """Every rank's error in the typed mode; they must be one DesyncError, the same on all."""
    with pytest.raises(Exception) as info:  # an ExceptionGroup
        run(plan, "typed")
    errors = list(info.value.exceptions)  # type: ignore[attr-defined]
    assert len(errors) == plan.ranks and {type(e) for e in errors} == {tc.DesyncError}, errors
    assert len({str(e) for e in errors}) == 1 and len({e.seq for e in errors}) == 1
    return errors[0]


# One rank keeps its previous batch while a peer idles, so the gate
# `previous_batch is not None and (can_queue or not can_queue_this_rank)` differs between ranks.
# (plan, the raw failure, where it surfaced, the typed mode's two sides: (step, call), and the
# decision that differs between them)
SCENARIOS = {
    "bool": ("FaultPlan.scripted(2, 8, loop='overlap', disaggregated=True, empty=[(1, 3)], "
             "metrics_all=True)",
             "TypeError: argument of type 'bool' is not iterable", "error/blocked-request vote",
             {(3, "allgather[TimeoutFlag]"), (4, "allgather[KvStatus]")},
             r"can_queue_this_rank at typedcoll/demo/model\.py:\d+ — "
             r"rank 0: True; rank 1: False"),
    "27": ("FaultPlan.scripted(2, 8, loop='overlap', empty=[(1, 3)], metrics_all=True)",
           "TypeError: RankState.__init__() takes from 2 to 4 positional arguments but 27 were "
           "given", "router gather of rank states",
           {(3, "allgather[IterStats]"), (4, "allgather[RankState]")},
           r"can_queue_this_rank at typedcoll/demo/model\.py:\d+ — rank 0: True; rank 1: False"),
    # Stats sampled at iteration 3 only: rank 1 reported its previous batch at iteration 2,
    # silently, and rank 0 reports its own at 3, ahead of the forward pass.
    "int": ("FaultPlan.scripted(2, 8, loop='non_overlap', empty=[(1, 2)], "
            "metrics_on=[(0, 3), (1, 3)])",
            "TypeError: 'int' object is not iterable", "forward tp_cp_allgather (flattening)",
            {(3, "allgather[IterStats]"), (3, "allgather[tuple[bool, int]]")},
            r"has_previous_batch at typedcoll/demo/model\.py:\d+ — rank 0: True; rank 1: False"),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_typed_names_the_divergence_and_the_decisions(name):
    plan_text, _, _, sides, decision = SCENARIOS[name]
    exc = desync(eval(plan_text))
    text = str(exc)
    lines = text.splitlines()
    assert re.fullmatch(r"collective #\d+ on tp diverged \(call site, schema(, step)?\):",
                        lines[0]), text
    # where a model function has no loop, the lines that called it follow the site
    found = {re.fullmatch(r"  rank (\d):\s+(allgather\[.+\]) at (typedcoll/demo/model\.py:\d+)"
                          r"(?: called from typedcoll/demo/model\.py:\d+)*, "
                          r"its \d+\w\w call, step (\d+)", line).groups() for line in lines[1:3]}
    assert {(int(step), call) for _, call, _, step in found} == sides, text
    assert len({site for _, _, site, _ in found}) == 2, text  # two different lines of the model
    assert re.fullmatch(r"  decisions that differ:\n    " + decision, "\n".join(lines[3:])), text
    assert [key for key, _, _ in exc.decisions] == [decision.split()[0]]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("disaggregated", [False, True])
def test_random_plans_typed_raises_symmetric_conserves(loop, disaggregated):
    plan = FaultPlan.random(3, 4, 40, loop=loop, disaggregated=disaggregated)
    exc = desync(plan)
    assert "can_queue_this_rank" in [key for key, _, _ in exc.decisions], str(exc)
    outs = run(plan, "symmetric")
    per_batch = 2 if loop == "pipeline" else 1
    # One flush before the loop, then one per (micro-)batch on every rank, whatever its gates.
    assert {o["flushes"] for o in outs} == {1 + per_batch * plan.iterations}
    assert all(o["iterations"] == plan.iterations for o in outs)
    assert outs[0]["deliveries"] == outs[0]["posted"] * plan.ranks
    assert outs[0]["posted_by_channel"]["iter_stats"] > 0
    assert (outs[0]["posted_by_channel"]["timeouts"] > 0) == disaggregated


def test_symmetric_conserves_messages_over_a_long_run():
    plan = FaultPlan.random(1, 2, 200, loop="overlap", disaggregated=True, p_empty=0.15,
                            p_timeout=0.2)
    outs = run(plan, "symmetric")
    assert [o["flushes"] for o in outs] == [201, 201]
    assert outs[0]["posted_by_channel"]["timeouts"] > 0


RAW = """
from typedcoll.demo.plan import FaultPlan
from typedcoll.demo.runner import worker
plan = {plan}
worker({results!r}, plan, modes=("raw",), cost_rounds=0, hang_after=1.0, grace=1.5)
"""


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_raw_reproduces_the_engine_failure(name, tmp_path):
    plan, error, where, _, _ = SCENARIOS[name]
    results = tmp_path / "results"
    results.mkdir()
    result = run_spmd(RAW.format(plan=plan, results=str(results)), 2, timeout=60,
                      tmp_path=tmp_path, abort_on_error=False)
    assert not result.timed_out, repr(result)
    raw = {r: final_record(recs, "raw") for r, recs in read_records(str(results)).items()}
    crashed = [o for o in raw.values() if o["status"] == "crashed"]
    assert crashed and all(o["error"] == error and o["where"] == where for o in crashed), raw
    # The others did not hang forever: each is reported blocked, then the job was aborted.
    assert all(o["status"] in ("crashed", "hung") for o in raw.values()), raw
