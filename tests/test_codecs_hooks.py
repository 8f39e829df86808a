"""Schemas whose decoding runs user code, and the settle that keeps every rank's verdict one.

A ``__post_init__`` that reads rank-local state refuses on one rank what its peers accept:
every rank must raise in that call (the refusing rank its own error, the others PeerError),
and a SymmetricFlush must deliver the batch once, after the hook accepts it. The same SPMD
cases run over MPI in tests/spmd/core_errors.py, with the hook on one rank only.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from typing import Any, Dict, List, Optional

import msgspec
import msgspec.inspect as mi
import numpy as np
import pytest

import typedcoll as tc
from typedcoll.codecs import resolve
from typedcoll.codecs.hooks import decoding_hook
from typedcoll.core import fast, settle
from typedcoll.executor import SymmetricFlush
from typedcoll.testing import run

from test_core_review import TIMEOUTS, outcomes, slot_state

FILE = "test_codecs_hooks.py"
STRICT = threading.local()  # per rank: the testing harness runs each rank in a thread


class Plain(msgspec.Struct):
    x: int


class Limited(msgspec.Struct):
    x: int

    def __post_init__(self) -> None:
        if getattr(STRICT, "on", False) and self.x > 1:
            raise ValueError("x above this rank's limit")


@dataclasses.dataclass
class Checked:
    y: int

    def __post_init__(self) -> None:
        pass


@tc.decides_from_fields
class Validated(msgspec.Struct):
    x: int

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("expected x >= 0")


class ValidatedMore(Validated):
    """Inherits the declared hook: still declared."""

    y: int = 0


class Rechecked(Validated):
    """Defines a hook of its own: not covered by its base's declaration."""

    def __post_init__(self) -> None:
        pass


class Tree(msgspec.Struct):
    children: List["Tree"]


class Holder(msgspec.Struct):
    inner: Optional[Dict[str, List[Limited]]]


@pytest.mark.parametrize("schema,hook", [
    (int, None), (Plain, None), (List[Plain], None), (Tree, None), (Any, None),
    (Limited, "Limited.__post_init__"), (Checked, "Checked.__post_init__"),
    (Optional[List[Limited]], "Limited.__post_init__"), (Holder, "Limited.__post_init__"),
    (Dict[str, Checked], "Checked.__post_init__"),
    (Validated, None), (ValidatedMore, None), (Rechecked, "Rechecked.__post_init__"),
    (List[Validated], None),
])
def test_the_hook_a_schema_runs_is_found_wherever_it_nests(schema, hook):
    assert decoding_hook(mi.type_info(schema)) == hook
    info = resolve(schema)
    assert info.hook == hook
    # The C path sends and exchanges every msgspec schema; it is told which run hooks, whose
    # flag hands decoding and the settle to the Python steps (its steady state does not settle).
    assert info.fast is not None and info.fast[5] is (hook is not None)


def refused_on_rank_2(comm: tc.TypedComm, op: str) -> Any:
    value = Limited(0 if comm.rank == 2 else comm.rank + 2)
    STRICT.on = comm.rank == 2
    try:
        if op == "allgather":
            return comm.allgather(value)
        if op == "bcast":
            return comm.bcast(Limited(5) if comm.rank == 0 else None, 0, schema=Limited)
        return comm.gather(value, 2)
    finally:
        STRICT.on = False


@pytest.fixture
def settles(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """The ranks that ran the decoding settle, one entry per settle."""
    ranks: List[int] = []
    real = settle.settle_decoding
    monkeypatch.setattr(settle, "settle_decoding",
                        lambda p, call, exc: ranks.append(p.rank) or real(p, call, exc))
    return ranks


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("op", ["allgather", "bcast", "gather"])
def test_a_hook_that_refuses_on_one_rank_raises_on_every_rank(op, timeout):
    got = outcomes(4, refused_on_rank_2, op, timeout=timeout)
    assert type(got[2]) is tc.DecodeError, got
    assert "x above this rank's limit" in str(got[2])
    others = [got[r] for r in (0, 1, 3)]
    assert all(type(e) is tc.PeerError and e.ranks == (2,) for e in others), got
    assert len({str(e) for e in others}) == 1, "one text on every rank that decoded it"
    line = refused_on_rank_2.__code__.co_firstlineno + {"allgather": 5, "bcast": 7,
                                                          "gather": 8}[op]
    head = (f"collective #0 on WORLD: rank 2 refused in decoding what the other ranks decoded, "
            f"in {op}[Limited] at {FILE}:{line}: DecodeError: payload from rank ")
    assert str(others[0]).startswith(head), str(others[0])
    assert str(others[0]).endswith(
        "x above this rank's limit (decoding runs the schema's __post_init__ or validators, "
        "which judged the same bytes differently on different ranks: they must decide from "
        "the fields alone)"), str(others[0])


def own_payload_refused_on_rank_0(comm: tc.TypedComm, op: str) -> Any:
    value = Limited(5 if comm.rank == 0 else 1)  # only rank 0's hook refuses x = 5
    STRICT.on = comm.rank == 0
    try:
        if op == "allgather":
            return comm.allgather(value)
        return comm.bcast(value if comm.rank == 0 else None, 0, schema=Limited)
    finally:
        STRICT.on = False


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("op", ["allgather", "bcast"])
def test_a_rank_that_refuses_its_own_sent_payload_raises_decode_error(op, timeout):
    """Its peers decoded what it sent: the refusal is its hook's, and EncodeError ("could not
    send") was wrong, on that rank and in its peers' PeerError."""
    got = outcomes(3, own_payload_refused_on_rank_0, op, timeout=timeout)
    line = own_payload_refused_on_rank_0.__code__.co_firstlineno + {"allgather": 5,
                                                                      "bcast": 6}[op]
    own = (f"collective #0 on WORLD: payload from rank 0 (this rank's own, sent) does not "
           f"decode as Limited here ({op}[Limited] at {FILE}:{line}): x above this rank's "
           f"limit")
    assert type(got[0]) is tc.DecodeError and got[0].source == 0 and str(got[0]) == own, got
    assert isinstance(got[0].__cause__, msgspec.ValidationError)  # the hook's error
    assert all(type(e) is tc.PeerError and e.ranks == (0,) for e in got[1:]), got
    assert str(got[1]) == str(got[2]) == (
        f"collective #0 on WORLD: rank 0 refused in decoding what the other ranks decoded, in "
        f"{op}[Limited] at {FILE}:{line}: DecodeError: {own[len('collective #0 on WORLD: '):]} "
        f"(decoding runs the schema's __post_init__ or validators, which judged the same bytes "
        f"differently on different ranks: they must decide from the fields alone)")


class Stoppable(msgspec.Struct):
    x: int

    def __post_init__(self) -> None:
        if getattr(STRICT, "on", False) and self.x == 2:
            raise KeyboardInterrupt("stopped while decoding")


def interrupted_on_rank_1(comm: tc.TypedComm) -> Any:
    value = Stoppable(comm.rank)
    STRICT.on = comm.rank == 1
    try:
        return comm.allgather(value)
    except KeyboardInterrupt as exc:
        return repr(exc)
    finally:
        STRICT.on = False


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_an_interrupt_in_a_hook_is_no_judgement_of_the_bytes(timeout):
    """Its peers raise PeerError naming it, without the advice for hooks that judge bytes
    differently: the rank was stopped, not of another opinion."""
    got = outcomes(3, interrupted_on_rank_1, timeout=timeout)
    assert got[1] == "KeyboardInterrupt('stopped while decoding')", got
    line = interrupted_on_rank_1.__code__.co_firstlineno + 4
    assert [str(e) for e in (got[0], got[2])] == 2 * [
        f"collective #0 on WORLD: rank 1 was interrupted in decoding what the other ranks "
        f"decoded, in allgather[Stoppable] at {FILE}:{line}: KeyboardInterrupt: stopped while "
        f"decoding"], got


def interrupted_checking_its_own_value(comm: tc.TypedComm, op: str) -> Any:
    value = Stoppable(2 if comm.rank == 1 else 0)  # built before rank 1's hook turns strict
    parts = [Stoppable(2 if comm.rank == 1 else 0) for _ in range(comm.size)]
    got = []
    for k in range(3):  # the first calls grow the slot and bind the C path
        STRICT.on = comm.rank == 1 and k == 2
        try:
            if op == "gather":
                got.append(comm.gather(value, 0))
            elif op == "scatter":
                got.append(comm.scatter(parts if comm.rank == 1 else None, 1))
            else:
                got.append(comm.alltoall(parts))
        except (KeyboardInterrupt, tc.CollectiveError) as exc:
            got.append((type(exc).__name__, str(exc), getattr(exc, "error_type", None)))
        finally:
            STRICT.on = False
    recorded = comm._p.recorder.last().error  # what the flight recorder says ended the call
    return got[-1], comm.allgather(comm.rank), recorded  # still aligned: the next call pairs


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("op", ["gather", "scatter", "alltoall"])
def test_an_interrupt_as_a_sender_checks_its_own_value_reaches_every_rank(op, timeout):
    """A sender decodes its values back before the exchange, running their hooks: an
    interrupt there escaped before the exchange, and its peers waited for it (or paired its
    next call with this one). It is flagged as the rank's error, then raised."""
    got = outcomes(3, interrupted_checking_its_own_value, op, timeout=timeout)
    assert [g[1] for g in got] == 3 * [[0, 1, 2]], got
    # The rank records (and logs) the interrupt it raises, not the flag's EncodeError.
    assert [g[2].split(":")[0] for g in got] == ["PeerError", "KeyboardInterrupt", "PeerError"]
    assert got[1][0] == ("KeyboardInterrupt", "stopped while decoding", None), got
    line = interrupted_checking_its_own_value.__code__.co_firstlineno + {
        "gather": 8, "scatter": 10, "alltoall": 12}[op]
    part = "" if op == "gather" else "value 0: "
    assert got[0][0] == got[2][0] == ("PeerError", (
        f"collective #2 on WORLD: rank 1 failed its {op}[Stoppable] contribution at "
        f"{FILE}:{line}: {part}stopped while decoding"), "KeyboardInterrupt"), got


def refused_by_every_rank(comm: tc.TypedComm) -> Any:
    value = Limited(comm.rank)  # rank 2's x = 2 is refused everywhere
    STRICT.on = True
    try:
        return comm.allgather(value)
    finally:
        STRICT.on = False


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_value_every_rank_refuses_is_its_senders_encode_error(timeout):
    got = outcomes(3, refused_by_every_rank, timeout=timeout)
    assert type(got[2]) is tc.EncodeError and "rank 2 could not send" in str(got[2]), got
    assert all(type(e) is tc.DecodeError and e.source == 2 for e in got[:2]), got


def accepted_everywhere(comm: tc.TypedComm) -> Any:
    return comm.allgather(Limited(comm.rank % 2)), comm.allgather(Plain(comm.rank))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_hooks_that_accept_return_the_values_on_every_rank(timeout):
    for got in outcomes(4, accepted_everywhere, timeout=timeout):
        assert got == ([Limited(r % 2) for r in range(4)], [Plain(r) for r in range(4)])


def hooked_calls_on_either_path(comm: tc.TypedComm) -> Any:
    rng = random.Random(comm.rank)  # each rank picks its own path per call
    seen = []
    for k in range(48):
        STRICT.on = False
        refuser = k // 4 % comm.size if k % 4 == 0 else None  # refuses a peer's x = 2
        sends_2 = refuser is not None and comm.rank == (refuser + 1) % comm.size
        value = Limited(2 if sends_2 else k % 2)  # built before this rank's hook turns strict
        STRICT.on = comm.rank == refuser
        step = np.int64(k) if rng.random() < 0.5 else k  # a numpy step takes the Python steps
        try:
            seen.append([v.x for v in comm.allgather(value, step=step)])
        except tc.CollectiveError as exc:
            seen.append((type(exc).__name__, getattr(exc, "ranks", None)))
    STRICT.on = False
    return seen, slot_state(comm)


def test_hooked_calls_reach_one_verdict_whichever_path_each_rank_takes(monkeypatch):
    """The C path sends and exchanges a hooked call, then hands it to the Python steps; ranks
    on the Python steps throughout meet it there: every call returns or raises alike."""
    handed_back: List[int] = []  # ranks whose C path exchanged a call, then resumed it
    real = fast.resumed
    monkeypatch.setattr(fast, "resumed",
                        lambda p, call, out: handed_back.append(p.rank) or real(p, call, out))
    got = outcomes(3, hooked_calls_on_either_path)
    for k in range(48):
        refuser = k // 4 % 3 if k % 4 == 0 else None
        want = [[k % 2] * 3] * 3 if refuser is None else [
            ("DecodeError", None) if r == refuser else ("PeerError", (refuser,)) for r in range(3)]
        assert [g[0][k] for g in got] == want, (k, [g[0][k] for g in got])
    assert got[0][1] == got[1][1] == got[2][1], got
    assert not fast.ENABLED or sorted(set(handed_back)) == [0, 1, 2], handed_back


class Counted(msgspec.Struct):
    text: str

    def __post_init__(self) -> None:
        STRICT.runs = getattr(STRICT, "runs", 0) + 1


class Uncounted(msgspec.Struct):
    text: str


def hook_runs_per_part(comm: tc.TypedComm, op: str) -> Any:
    n = comm.size
    parts = [Counted(f"{comm.rank}>{d}") for d in range(n)]  # built before counting
    for _ in range(3):  # counted in the last: the first calls grow the slot and bind the C path
        STRICT.runs = 0
        if op == "scatter":
            got = [comm.scatter(parts if comm.rank == 0 else None, 0, schema=Counted)]
        else:
            got = comm.alltoall(parts)
    return [m.text for m in got], STRICT.runs


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("op", ["scatter", "alltoall"])
def test_each_part_runs_its_hook_once_where_it_is_sent_and_once_where_it_is_decoded(op, timeout):
    """The sender checks each part (decoding it back), its receiver decodes it: two runs of
    the hook per part, whichever path each rank is on (the C path's parts were once encoded
    and checked a second time after its exchange, outside the settle; it now leaves senders
    of hooked parts to the Python steps)."""
    n = 4
    got = outcomes(n, hook_runs_per_part, op, timeout=timeout)
    for r, (texts, runs) in enumerate(got):
        if op == "scatter":
            assert (texts, runs) == ([f"0>{r}"], n + 1 if r == 0 else 1), got
        else:
            assert (texts, runs) == ([f"{s}>{r}" for s in range(n)], 2 * n), got


def alltoall_one_rank_past_the_slot(comm: tc.TypedComm, cls: Any) -> Any:
    """Rank 0's parts overflow the slot (the Python steps send them); the others' fit (the C
    path sends them inline, where their class runs no hook): every rank's parts move in
    phase 2."""
    width = 3000 if comm.rank == 0 else 3
    got = []
    for k in range(3):
        parts = [cls(f"{comm.rank}>{d}:{k}".ljust(width, ".")) for d in range(comm.size)]
        got.append([m.text.rstrip(".") for m in comm.alltoall(parts)])
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("cls", [Counted, Uncounted])
def test_parts_sent_inline_by_the_c_path_move_again_when_another_ranks_overflow(cls, timeout):
    got = outcomes(3, alltoall_one_rank_past_the_slot, cls, timeout=timeout)
    assert got == [[[f"{s}>{r}:{k}" for s in range(3)] for k in range(3)] for r in range(3)], got


def flush_refused_then_accepted(comm: tc.TypedComm) -> Any:
    flush = SymmetricFlush(comm, {"limited": Limited})
    flush.post("limited", Limited(5 if comm.rank == 0 else 0))
    STRICT.on = comm.rank == 2
    try:
        flush.flush()
        first = "delivered"
    except tc.CollectiveError as exc:
        first = type(exc).__name__
    STRICT.on = False
    pending = flush.num_pending
    delivered = [(r, m.x) for r, m in flush.flush().messages("limited")]
    return first, pending, delivered, flush.num_pending


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_flush_refused_on_one_rank_stays_pending_everywhere_and_is_delivered_once(timeout):
    got = outcomes(4, flush_refused_then_accepted, timeout=timeout)
    for r, (first, pending, delivered, left) in enumerate(got):
        assert first == ("DecodeError" if r == 2 else "PeerError"), got
        assert (pending, left) == (1, 0), got
        assert delivered == [(0, 5), (1, 0), (2, 0), (3, 0)], got


def wild_bcasts(comm: tc.TypedComm) -> Any:
    """Receivers that name no schema: the first call finds the class by name, the next ones
    send the class they found (a guess); the hook refuses on rank 2 in the second."""
    seen = []
    for strict in (False, True, False):
        STRICT.on = strict and comm.rank == 2
        try:
            seen.append(comm.bcast(Limited(5) if comm.rank == 0 else None, 0))
        except tc.CollectiveError as exc:
            seen.append(type(exc).__name__)
        STRICT.on = False
    return seen


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_receivers_that_name_no_schema_settle_too(timeout):
    got = outcomes(4, wild_bcasts, timeout=timeout)
    for r, seen in enumerate(got):
        assert seen == [Limited(5), "DecodeError" if r == 2 else "PeerError", Limited(5)], got


def declared_then_refused(comm: tc.TypedComm) -> Any:
    """A declared hook decides from the fields: it refuses on every rank, with no settle."""
    value = Validated(comm.rank)
    if comm.rank == 1:
        msgspec.structs.force_setattr(value, "x", -1)
    try:
        comm.allgather(value)
    except tc.CollectiveError as exc:
        return type(exc).__name__
    return "returned"


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_declared_hook_refuses_on_every_rank_without_a_settle(settles, timeout):
    got = outcomes(4, declared_then_refused, timeout=timeout)
    assert got == ["DecodeError", "EncodeError", "DecodeError", "DecodeError"], got
    assert settles == []


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_an_undeclared_hook_settles_on_every_rank(settles, timeout):
    outcomes(4, accepted_everywhere, timeout=timeout)
    assert sorted(settles) == [0, 1, 2, 3]  # one per rank, for the Limited call alone


class Inherited(Limited):
    """Declares the hook it inherits from an undeclared base."""


decides_from_fields_inherited = tc.decides_from_fields(Inherited)


def test_a_declaration_covers_the_hooks_a_class_inherits():
    assert decides_from_fields_inherited is Inherited
    assert decoding_hook(mi.type_info(Inherited)) is None
    assert decoding_hook(mi.type_info(Limited)) == "Limited.__post_init__"


class Mixin:
    def __post_init__(self) -> None:
        pass


@tc.decides_from_fields
class DeclaredBase(msgspec.Struct):
    x: int


class WithMixin(DeclaredBase, Mixin):
    """Its hook is the mixin's, which the declared base does not run: not covered."""


def test_a_declared_base_does_not_cover_a_mixins_hook():
    assert decoding_hook(mi.type_info(WithMixin)) == "WithMixin.__post_init__"
    assert decoding_hook(mi.type_info(DeclaredBase)) is None


class Located(msgspec.Struct):
    path: str

    def __post_init__(self) -> None:
        if getattr(STRICT, "on", False):
            # What os.fsdecode of undecodable bytes gives: a lone surrogate.
            raise FileNotFoundError("no such file: /data/\udcff/" + self.path)


def refused_with_a_surrogate(comm: tc.TypedComm) -> Any:
    value = Located(f"f{comm.rank}")
    STRICT.on = comm.rank == 2
    try:
        return comm.allgather(value)
    finally:
        STRICT.on = False


def test_a_refusal_whose_text_cannot_be_encoded_still_reaches_every_rank():
    got = outcomes(4, refused_with_a_surrogate)
    assert type(got[2]) is tc.DecodeError, got
    for r in (0, 1, 3):
        assert type(got[r]) is tc.PeerError and got[r].ranks == (2,), got
        assert "no such file: /data/\\udcff/f0" in str(got[r]), str(got[r])


class Slow(msgspec.Struct):
    x: int

    def __post_init__(self) -> None:
        if getattr(STRICT, "on", False):
            time.sleep(0.25)


def slow_hooks(comm: tc.TypedComm) -> Any:
    STRICT.on = True
    try:
        return comm.allgather(Slow(comm.rank))
    finally:
        STRICT.on = False


def test_the_settle_has_a_deadline_of_its_own():
    """Four hooks of 0.25 s each outlast the 0.5 s timeout: the settle that follows them is not
    a late peer."""
    for got in run(4, slow_hooks, timeout=0.5):
        assert got == [Slow(r) for r in range(4)]


@dataclasses.dataclass
class Request:
    x: int

    def __post_init__(self) -> None:
        if getattr(STRICT, "on", False) and self.x == 0:
            raise KeyboardInterrupt("interrupted while rebuilding")


def interrupted_in_the_drop_in(comm: tc.TypedComm) -> Any:
    from typedcoll.compat.mpi4py import Comm
    drop_in = Comm._made(comm, None)
    STRICT.on = comm.rank == 2
    try:
        return drop_in.allgather(Request(comm.rank))
    except (KeyboardInterrupt, tc.CollectiveError) as exc:
        return type(exc).__name__
    finally:
        STRICT.on = False


def test_an_interrupt_in_a_drop_ins_rebuild_still_settles_with_its_peers():
    """The mpi4py drop-in rebuilds classes after the call and settles that: an interrupt on
    one rank propagates there, and its peers raise instead of waiting for it."""
    got = run(4, interrupted_in_the_drop_in, timeout=20.0)
    assert got == ["DecodeError", "DecodeError", "KeyboardInterrupt", "DecodeError"], got
