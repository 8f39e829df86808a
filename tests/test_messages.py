"""What an error tells the user on every rank: the part of a value that does not encode, how many
values a call expected, and the thin wrapper a failing call went through. Texts pinned, under
``typedcoll.testing``; CI runs them with and without the C fast path.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import msgspec
import pytest

import typedcoll as tc
from typedcoll.codecs.culprit import locate
from typedcoll.testing import run

FILE = "test_messages.py"
UNSUPPORTED = "Encoding objects of type Unencodable is unsupported"
HINT = "give the field a type msgspec supports (a Struct, a dataclass, builtins, numpy arrays)"


class Unencodable:
    pass


class Plan(msgspec.Struct):
    batch: int
    name: str = ""


@dataclasses.dataclass
class Job:
    plan: Plan
    tags: Dict[str, Any]


class Pair(NamedTuple):
    left: int
    right: Any


def errors_of(n: int, fn: Callable[..., Any]) -> List[BaseException]:
    """Every rank's exception, in rank order; fails unless every rank raised."""
    with pytest.raises(BaseExceptionGroup) as info:
        run(n, fn, timeout=10)
    by_rank = {int(str(e.__notes__[-1]).split()[1]): e for e in info.value.exceptions}
    assert sorted(by_rank) == list(range(n)), info.value.exceptions
    return [by_rank[r] for r in range(n)]


def line_of(marker: str) -> int:
    for number, line in enumerate(Path(__file__).read_text().splitlines(), 1):
        if marker in line and "line_of" not in line:
            return number
    raise AssertionError(marker)


# --- the part of a value msgspec cannot encode -----------------------------------------------
def test_a_field_that_does_not_encode_is_named_with_its_declared_type():
    def prog(comm):
        comm.allgather(Plan(Unencodable()) if comm.rank == 1 else Plan(1))  # FIELD

    e0, e1 = errors_of(2, prog)
    site = f"{FILE}:{line_of('# FIELD')}"
    detail = (f"expected Plan.batch: int, got Unencodable: msgspec cannot encode it "
              f"({UNSUPPORTED}); {HINT}")
    assert type(e1) is tc.EncodeError and str(e1) == (
        f"collective #0 on WORLD: rank 1 could not send its allgather[Plan] contribution at "
        f"{site}: {detail}")
    assert type(e0) is tc.PeerError and str(e0) == (
        f"collective #0 on WORLD: rank 1 failed its allgather[Plan] contribution at {site}: "
        f"{detail}")
    assert e0.detail == detail and e0.error_type == "NotImplementedError"


@pytest.mark.parametrize("op", ["allgather", "bcast", "gather", "scatter", "alltoall"])
def test_every_collective_names_the_item_and_field(op):
    def prog(comm):
        items = [Plan(1), Plan(Unencodable())] if comm.rank == 1 else [Plan(1), Plan(2)]
        if op == "allgather":
            comm.allgather(items, schema=List[Plan])
        elif op == "bcast":
            comm.bcast(items, root=1, schema=List[Plan])
        elif op == "gather":
            comm.gather(items, root=0, schema=List[Plan])
        elif op == "scatter":
            comm.scatter(items if comm.rank == 1 else None, root=1, schema=Plan)
        else:
            comm.alltoall(items, schema=Plan)

    e0, e1 = errors_of(2, prog)
    where = "Plan.batch" if op in ("scatter", "alltoall") else "list[Plan][1].batch"
    value = "value 1: " if op in ("scatter", "alltoall") else ""
    assert type(e1) is tc.EncodeError and type(e0) is tc.PeerError
    for e in (e0, e1):
        assert f": {value}expected {where}: int, got Unencodable: msgspec cannot encode it (" \
            in str(e)


TOP = (f"expected a value msgspec can encode (a Struct, a dataclass, "
       f"builtins, numpy arrays), got Unencodable: msgspec cannot encode it ({UNSUPPORTED}); make "
       f"it a msgspec Struct or a dataclass, or convert it to one of those types before the call")


@pytest.mark.parametrize("schema", [None, Any])
def test_a_value_that_is_not_encodable_as_a_whole_names_its_type(schema):
    # It read "expected Unencodable, got Unencodable" (no schema=: the value's own type as the
    # expected one), or "expected Any, got Unencodable".
    def prog(comm):
        comm.allgather(Unencodable() if comm.rank == 1 else 1, schema=schema)  # WHOLE

    e0, e1 = errors_of(2, prog)
    what = "allgather[Unencodable]" if schema is None else "allgather[Any]"
    at = f"{FILE}:{line_of('# WHOLE')}"
    assert type(e1) is tc.EncodeError and str(e1) == (
        f"collective #0 on WORLD: rank 1 could not send its {what} contribution at {at}: {TOP}")
    assert type(e0) is tc.PeerError and str(e0) == (
        f"collective #0 on WORLD: rank 1 failed its {what} contribution at {at}: {TOP}")


def test_an_int_beyond_64_bits_sent_without_a_schema_keeps_its_declared_type():
    def prog(comm):
        comm.allgather(1 << 70 if comm.rank == 1 else 1)

    for e in errors_of(2, prog):
        assert re.search(r": expected int, got an int beyond 64 bits: msgspec cannot encode it "
                         r"\(can't serialize ints [^)]*\)$", str(e)), str(e)


def test_an_int_beyond_64_bits_in_a_field_is_named():
    def prog(comm):
        comm.bcast(Plan(1 << 70) if comm.rank == 1 else None, root=1, schema=Plan)

    for e in errors_of(2, prog):
        assert re.search(r": expected Plan\.batch: int, got an int beyond 64 bits: msgspec cannot "
                         r"encode it \(can't serialize ints [^)]*\)$", str(e)), str(e)


def test_a_send_names_the_field():
    def prog(comm):
        if comm.rank == 1:
            comm.send(Plan(1, name=Unencodable()), 0)  # type: ignore[arg-type]
        else:
            comm.recv(1, schema=Plan)

    e0, e1 = errors_of(2, prog)
    assert type(e1) is tc.EncodeError and type(e0) is tc.PeerError
    for e in (e0, e1):
        assert str(e).endswith(f"NotImplementedError: expected Plan.name: str, got Unencodable: "
                               f"msgspec cannot encode it ({UNSUPPORTED}); {HINT}")


def test_the_drop_ins_name_the_field_inside_the_value():
    def prog(comm):
        mine = [Plan(1), Plan(Unencodable())] if comm.rank == 1 else [Plan(1)]
        tc.compat.mpi4py(comm).allgather(mine)

    e0, e1 = errors_of(2, prog)
    assert type(e1) is tc.EncodeError and type(e0) is tc.PeerError
    for e in (e0, e1):
        assert (f"expected a Plan whose fields msgspec can encode, got Unencodable at "
                f"$[1].batch, declared int ({UNSUPPORTED}); give its fields types from ") in str(e)


@pytest.mark.parametrize("value, schema, where, declared, got", [
    (Plan(Unencodable()), Plan, "Plan.batch", "int", "Unencodable"),
    (Plan(Unencodable()), Optional[Plan], "Plan.batch", "int", "Unencodable"),
    (Plan(Unencodable()), Any, "Plan.batch", "int", "Unencodable"),
    ([None, Plan(1, Unencodable())], List[Optional[Plan]], "list[Optional[Plan]][1].name", "str",
     "Unencodable"),
    (Job(Plan(1), {"a": 1, "b": [2, Unencodable()]}), Job, "Job.tags['b'][1]", "Any",
     "Unencodable"),
    (Job(Plan(1 << 65), {}), Job, "Job.plan.batch", "int", "an int beyond 64 bits"),
    ({"x": Plan(Unencodable())}, Dict[str, Plan], "dict[str, Plan]['x'].batch", "int",
     "Unencodable"),
    (Pair(1, Unencodable()), Pair, "Pair.right", "Any", "Unencodable"),
    ((1, Unencodable()), Any, "tuple[1]", "Any", "Unencodable"),
])
def test_locate_walks_records_containers_and_unions(value, schema, where, declared, got):
    culprit = locate(value, schema)
    assert culprit is not None
    assert (culprit.where, culprit.declared, culprit.got) == (where, declared, got)


def test_locate_finds_nothing_in_a_value_that_encodes_or_fails_whole():
    assert locate(Plan(1), Plan) is None
    assert locate(Unencodable(), Any) is None


# --- one value per rank ------------------------------------------------------------------------
@pytest.mark.parametrize("surface, op, where", [
    ("typed", "alltoall", ""), ("typed", "reduce_scatter", ""),
    ("typed", "scatter", " on the root"), ("mpi4py", "alltoall", ""),
    ("mpi4py", "scatter", " on the root")])
def test_a_list_of_the_wrong_length_says_how_long_it_was(surface, op, where):
    def prog(comm):
        c = comm if surface == "typed" else tc.compat.mpi4py(comm)
        values = [1] * (4 if comm.rank == 1 else 3)
        if op == "scatter":
            c.scatter(values if comm.rank == 1 else None, root=1)
        else:
            getattr(c, op)(values)

    errors = errors_of(3, prog)
    assert [type(e) for e in errors] == [tc.PeerError, tc.EncodeError, tc.PeerError]
    for e in errors:
        assert str(e).endswith(f": expected a sequence of 3 values{where}, one per rank, got a "
                               f"list of 4"), str(e)


class Liar(list):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 3


@pytest.mark.parametrize("op", ["scatter", "alltoall"])
def test_a_sequence_is_counted_by_what_it_holds_not_by_its_len(op):
    """A sequence whose len() says one per rank but that holds fewer, of parts too large to
    ride in the slot: counted as sent, so an error on every rank, not a transport failure on
    the root alone and a timeout on the others."""
    def prog(comm):
        values = Liar(["x" * 300] * 2) if comm.rank == 1 else ["x" * 300] * 3
        if op == "scatter":
            comm.scatter(values if comm.rank == 1 else None, root=1)
        else:
            comm.alltoall(values)

    errors = errors_of(3, prog)
    assert [type(e) for e in errors] == [tc.PeerError, tc.EncodeError, tc.PeerError]
    for e in errors:
        assert ": expected a sequence of 3 values" in str(e) and \
            str(e).endswith("one per rank, got a list of 2"), str(e)


def test_a_value_that_is_no_sequence_is_named():
    def prog(comm):
        comm.alltoall({0: 1, 1: 2} if comm.rank == 1 else [1, 2])

    for e in errors_of(2, prog):
        assert str(e).endswith(": expected a sequence of 2 values, one per rank, got dict")


# --- the thin wrapper a failing call went through ----------------------------------------------
class Dist:
    def __init__(self, comm: tc.TypedComm) -> None:
        self.comm = comm

    def tp_allgather(self, obj: Any) -> Any:
        return self.comm.allgather(obj)

    def tp_gather(self, obj: Any) -> Any:
        return self.comm.gather(obj, root=0)

    def tp_send(self, obj: Any, dest: int) -> None:
        self.comm.send(obj, dest)

    def tp_vote(self, obj: Any) -> Any:
        return self.comm.allgather(obj, name="vote")


def through(fn: Callable[..., Any]) -> str:
    return f"through {fn.__qualname__} ({FILE}:{fn.__code__.co_firstlineno})"


@pytest.mark.parametrize("wrapper", [Dist.tp_allgather, Dist.tp_gather])
def test_a_value_that_cannot_be_sent_names_the_thin_wrapper(wrapper):
    def prog(comm):
        getattr(Dist(comm), wrapper.__name__)(Unencodable() if comm.rank == 1 else 1)  # WRAPPED

    e0, e1 = errors_of(2, prog)
    op = wrapper.__name__[3:]
    at = (f"at {FILE}:{line_of('# WRAPPED')} {through(wrapper)}: expected a value msgspec "
          f"can encode")
    assert type(e1) is tc.EncodeError and str(e1).startswith(
        f"collective #0 on WORLD: rank 1 could not send its {op}[Unencodable] contribution {at}")
    assert type(e0) is tc.PeerError and str(e0).startswith(
        f"collective #0 on WORLD: rank 1 failed its {op}[Unencodable] contribution {at}")


def test_a_value_that_fails_its_schema_names_the_thin_wrapper():
    def prog(comm):
        Dist(comm).tp_allgather(Plan("x") if comm.rank == 1 else Plan(1))  # type: ignore  # BAD

    e0, e1 = errors_of(2, prog)
    at = f"{FILE}:{line_of('# BAD')} {through(Dist.tp_allgather)}"
    assert type(e0) is tc.DecodeError and str(e0) == (
        f"collective #0 on WORLD: payload from rank 1 does not decode as Plan (allgather[Plan] at "
        f"{at}): Expected `int`, got `str` - at `$.batch`")
    assert type(e1) is tc.EncodeError and str(e1) == (
        f"collective #0 on WORLD: rank 1 could not send its allgather[Plan] contribution at {at}: "
        f"expected Plan: Expected `int`, got `str` - at `$.batch`")


def test_a_send_that_fails_names_the_thin_wrapper():
    def prog(comm):
        if comm.rank == 1:
            Dist(comm).tp_send(Unencodable(), 0)  # SENT
        else:
            comm.recv(1)

    e0, e1 = errors_of(2, prog)
    at = f"at {FILE}:{line_of('# SENT')} {through(Dist.tp_send)}: NotImplementedError"
    assert type(e1) is tc.EncodeError and str(e1).startswith(
        f"send #0 to rank 0 (tag 0) on WORLD: rank 1 could not send its send[Unencodable] {at}")
    assert type(e0) is tc.PeerError and str(e0).startswith(
        f"recv #0 from rank 1 (tag 0) on WORLD: rank 1 failed its send[Unencodable] {at}")


def test_a_named_call_through_a_wrapper_names_no_wrapper():
    # Its identity is the name alone, as DesyncError's lines show it.
    def prog(comm):
        Dist(comm).tp_vote(Unencodable() if comm.rank == 1 else 1)  # NAMED

    for e in errors_of(2, prog):
        assert f"contribution at {FILE}:{line_of('# NAMED')}: expected" in str(e)


def test_a_timeout_through_a_wrapper_names_the_wrapper():
    # The rank that waits names where it waits as a desync would: its caller's line alone names
    # every use of the wrapper alike.
    def prog(comm):
        if comm.rank == 0:
            Dist(comm).tp_allgather(1)  # WAITS

    with pytest.raises(BaseExceptionGroup) as info:
        run(2, prog, timeout=0.5)
    (e,) = info.value.exceptions
    assert type(e) is tc.CollectiveTimeout and str(e).startswith(
        f"collective #0 on WORLD: allgather[int] at {FILE}:{line_of('# WAITS')} "
        f"{through(Dist.tp_allgather)} did not complete within 0.5 s"), e
    assert e.site == f"{FILE}:{line_of('# WAITS')}"  # the site alone, as before


# --- point to point on a communicator that numbers its ranks unlike the job ----------------------
def test_point_to_point_errors_on_a_split_say_how_its_ranks_map():
    # Ranks 2-3 of the job are ranks 0-1 of their split: "rank 1" alone would send a reader to
    # the job's rank 1, which is in the other split.
    def prog(comm):
        sub = comm.split(comm.rank // 2)
        if sub.rank == 1:
            sub.send(Unencodable(), 0)
        else:
            sub.recv(1)

    errors = errors_of(4, prog)
    assert [type(e) for e in errors] == [tc.PeerError, tc.EncodeError] * 2
    split_of = ["WORLD.split(0)", "WORLD.split(1) (ranks 0-1 here are world ranks 2-3)"]
    for world_rank, e in enumerate(errors):
        where = split_of[world_rank // 2]
        head = (f"recv #0 from rank 1 (tag 0) on {where}: rank 1 failed" if world_rank % 2 == 0
                else f"send #0 to rank 0 (tag 0) on {where}: rank 1 could not send")
        assert str(e).startswith(head), str(e)


def test_a_point_to_point_desync_on_a_split_says_how_its_ranks_map():
    def prog(comm):
        sub = comm.split(comm.rank // 2)
        if sub.rank == 1:
            sub.send(1, 0, name="batch_size")
        else:
            sub.recv(1, name="stop")

    with pytest.raises(BaseExceptionGroup) as info:
        run(4, prog, timeout=10)
    texts = sorted(str(e) for e in info.value.exceptions)
    assert len(texts) == 2 and texts[0].startswith(
        "recv #0 from rank 1 (tag 0) on WORLD.split(0) diverged (call site):")
    assert texts[1].startswith("recv #0 from rank 1 (tag 0) on WORLD.split(1) (ranks 0-1 here "
                               "are world ranks 2-3) diverged (call site):")
