"""Property: correct programs return what they should; one mutated rank always raises, in time.

Random programs of mixed ops, identities (call sites and names, roles on different lines),
steps and None contributions run on in-process ranks. A correct program never raises and every
result equals the reference. One mutation on one rank (skip a call, add one, swap two, rename
one, restep one) makes every rank raise DesyncError at the first position where the ranks'
sequences of calls differ; where one rank's sequence is only a prefix of the others', the
others raise CollectiveTimeout there and the short rank returns. No rank ever returns a result
built from another call's data: every result before the divergence is checked too.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import typedcoll as tc
from typedcoll.testing import run

TIMEOUT = 1.0  # long enough for a loaded 2-core machine: only the prefix cases wait it out


class Item(msgspec.Struct, frozen=True):
    rank: int
    data: List[int]
    note: Optional[str] = None


SCHEMAS = {"int": int, "Optional[int]": Optional[int], "str": str, "list[int]": List[int],
           "Optional[Item]": Optional[Item]}
OPS = ("allgather", "gather", "bcast", "allreduce", "reduce", "scatter", "alltoall", "barrier")


class Step(msgspec.Struct, frozen=True):
    op: str
    site: int  # which line calls it (distinct lines: distinct identities)
    name: Optional[str]
    step: Optional[int]
    root: int
    schema: str
    values: Tuple[Any, ...]  # one per rank (scatter: the root's list; alltoall: a list each)

    def key(self) -> tuple:
        """What the envelope compares: two steps with equal keys are the same call."""
        identity = ("name", self.name) if self.name is not None else ("site", self.site)
        return (identity, self.step, self.op, self.root, self.schema)


def value_of(schema: str) -> st.SearchStrategy[Any]:
    ints = st.integers(-2 ** 40, 2 ** 40)
    return {
        "int": ints, "Optional[int]": st.none() | ints, "str": st.text(max_size=40),
        "list[int]": st.lists(ints, max_size=300),
        "Optional[Item]": st.none() | st.builds(Item, st.integers(0, 3),
                                                st.lists(ints, max_size=20),
                                                st.none() | st.text(max_size=20)),
    }[schema]


@st.composite
def steps(draw: Any, n: int, index: int) -> Step:
    op = draw(st.sampled_from(OPS))
    schema = "int" if op in ("allreduce", "reduce") else draw(st.sampled_from(sorted(SCHEMAS)))
    if op == "barrier":
        schema = ""
    root = draw(st.integers(0, n - 1))
    one = value_of(schema) if schema else st.none()
    if op in ("allreduce", "reduce"):
        one = st.integers(-2 ** 20, 2 ** 20)
    if op in ("scatter", "alltoall"):
        values = tuple(draw(st.lists(st.lists(one, min_size=n, max_size=n),
                                     min_size=n, max_size=n)))
    else:
        values = tuple(draw(st.lists(one, min_size=n, max_size=n)))
    named = draw(st.booleans())
    return Step(op=op, site=index, name=f"call{index}" if named else None,
                step=draw(st.none() | st.integers(0, 5)), root=root, schema=schema,
                values=values)


@st.composite
def programs(draw: Any) -> Tuple[int, List[Step]]:
    n = draw(st.integers(2, 4))
    count = draw(st.integers(1, 6))
    return n, [draw(steps(n, i)) for i in range(count)]


def expected(step: Step, rank: int, n: int) -> Any:
    v = step.values
    if step.op == "allgather":
        return list(v)
    if step.op == "gather":
        return list(v) if rank == step.root else None
    if step.op == "bcast":
        return v[step.root]
    if step.op == "allreduce":
        return sum(v)
    if step.op == "reduce":
        return sum(v) if rank == step.root else None
    if step.op == "scatter":
        return v[step.root][rank]
    if step.op == "alltoall":
        return [v[j][rank] for j in range(n)]
    return None


@tc.transparent
def issue(comm: tc.TypedComm, step: Step) -> Any:
    """Call ``step``'s op: transparent, so each caller line below is its own call site."""
    r, schema = comm.rank, SCHEMAS.get(step.schema)
    kw: Dict[str, Any] = {"step": step.step, "name": step.name}
    v = step.values
    if step.op == "allgather":
        return comm.allgather(v[r], schema=schema, **kw)
    if step.op == "gather":
        return comm.gather(v[r], step.root, schema=schema, **kw)
    if step.op == "bcast":
        return comm.bcast(v[r] if r == step.root else None, step.root, schema=schema, **kw)
    if step.op == "allreduce":
        return comm.allreduce(v[r], **kw)
    if step.op == "reduce":
        return comm.reduce(v[r], "sum", step.root, **kw)
    if step.op == "scatter":
        return comm.scatter(v[step.root] if r == step.root else None, step.root, schema=schema,
                            **kw)
    if step.op == "alltoall":
        return comm.alltoall(v[r], schema=schema, **kw)
    return comm.barrier(**kw)


def at_site(comm: tc.TypedComm, step: Step) -> Any:
    site = step.site if step.name is None else step.site + comm.rank  # named: any line works
    if site % 8 == 0:
        return issue(comm, step)
    if site % 8 == 1:
        return issue(comm, step)
    if site % 8 == 2:
        return issue(comm, step)
    if site % 8 == 3:
        return issue(comm, step)
    if site % 8 == 4:
        return issue(comm, step)
    if site % 8 == 5:
        return issue(comm, step)
    if site % 8 == 6:
        return issue(comm, step)
    return issue(comm, step)


def execute(comm: tc.TypedComm, plans: List[List[Step]]) -> List[Any]:
    return [at_site(comm, step) for step in plans[comm.rank]]


def outcome(comm: tc.TypedComm, plans: List[List[Step]]) -> Tuple[List[Any], Any]:
    """(results so far, the CollectiveError that stopped this rank or None): every rank's
    results are checked, also those returned before a rank raised."""
    done: List[Any] = []
    try:
        for step in plans[comm.rank]:
            done.append(at_site(comm, step))
    except tc.CollectiveError as exc:
        return done, exc
    return done, None


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs())
def test_correct_programs_return_the_reference(program):
    n, plan = program
    results = run(n, execute, [plan] * n, timeout=None)  # the C fast path serves these
    for rank in range(n):
        assert results[rank] == [expected(s, rank, n) for s in plan]


MUTATIONS = ("skip", "add", "swap", "rename", "restep")


def mutate(plan: List[Step], kind: str, at: int) -> List[Step]:
    out = list(plan)
    at = min(at, len(out) - 1)
    if kind == "skip":
        del out[at]
    elif kind == "add":
        extra = msgspec.structs.replace(out[at], site=len(plan) + 3,
                                        name=None if out[at].name is None else "extra")
        out.insert(at, extra)
    elif kind == "swap" and at + 1 < len(out):
        out[at], out[at + 1] = out[at + 1], out[at]
    elif kind == "rename":
        s = out[at]
        out[at] = msgspec.structs.replace(s, name="renamed" if s.name is None else s.name + "x")
    else:
        s = out[at]
        out[at] = msgspec.structs.replace(s, step=(s.step or 0) + 7)
    return out


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs(), st.sampled_from(MUTATIONS), st.integers(0, 5), st.integers(0, 3))
def test_one_mutated_rank_always_raises_at_the_first_difference(program, kind, at, who):
    n, plan = program
    who %= n
    mutated = mutate(plan, kind, at)
    plans = [mutated if r == who else plan for r in range(n)]
    keys = [[s.key() for s in p] for p in plans]
    first = next((i for i in range(min(map(len, keys)))
                  if len({tuple(k[i]) for k in keys}) > 1), None)
    if first is None and len({len(k) for k in keys}) == 1:
        assert run(n, execute, plans, timeout=10.0)  # the mutation changed nothing compared
        return
    outcomes = run(n, outcome, plans, timeout=TIMEOUT)
    for rank in range(n):
        done, got = outcomes[rank]
        stop = first if first is not None else min(map(len, keys))
        # Never another call's data: every result returned is the reference.
        assert done == [expected(s, rank, n) for s in plans[rank][:len(done)]]
        if first is not None:
            assert type(got) is tc.DesyncError and got.seq == first, (rank, got)
        elif len(keys[rank]) > stop:
            assert type(got) is tc.CollectiveTimeout and got.seq == stop, (rank, got)
        else:
            assert got is None, (rank, got)
