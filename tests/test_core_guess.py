"""Receivers that name no schema guess the root's class (``core/guesses.py``, FLAG_GUESSED).

A receiver of ``bcast`` or ``scatter`` without ``schema=`` sends the root's class it took at the
same call last time as if it had named it: the steady state is one exchange on the C path, with
no search by name and no ``settle``. These tests pin what that must never cost: a root that
changes class is not a desync, a guesser that meets another collective raises the same
DesyncError on every rank without hanging, guessers mixed with named and by-name receivers
agree, and the root's own class comes back. In-process ranks (``typedcoll.testing.run``):
``timeout=None`` lets the C path serve them, ``timeout=10`` the Python steps.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict, List

import msgspec
import numpy as np
import pytest

import typedcoll as tc
from typedcoll.core import fast
from typedcoll.core.protocol import Protocol
from typedcoll.testing import observe

from test_core_review import C_PATH, TIMEOUTS, outcomes, slot_state


class Vote(msgspec.Struct):
    rank: int
    ready: bool


class Plan(msgspec.Struct):
    step: int
    names: List[str]


@pytest.fixture
def settles(monkeypatch: pytest.MonkeyPatch) -> Dict[int, int]:
    """How many times each rank ran the settle exchange (the by-name path's second exchange)."""
    counts: Dict[int, int] = {}
    original = Protocol.settle

    def spy(self: Protocol, call: Any, error: Any, hook: bool = False) -> None:
        counts[self.rank] = counts.get(self.rank, 0) + 1
        original(self, call, error, hook)
    monkeypatch.setattr(Protocol, "settle", spy)
    return counts


def served_by_c(monkeypatch: pytest.MonkeyPatch) -> List[Any]:
    """(seq, whether the C path finished the call) for every rooted call, whoever calls it."""
    served: List[Any] = []
    original = getattr(fast._speedups, "rooted", None)
    if original is not None:
        def after(seq: int, out: Any, p: Any, *args: Any) -> None:
            served.append((p.rank, seq, args[4], out.__class__ is list))
        monkeypatch.setattr(fast._speedups, "rooted",
                            observe(original, after, before=lambda p, *args: p.seq))
    return served


def steady_receivers(comm: tc.TypedComm) -> Any:
    r = comm.rank
    got = []
    for k in range(5):  # one call site: by name the first time, guessed after
        got.append(comm.bcast(Vote(k, True) if r == 0 else None, root=0))
        got.append(comm.scatter([Plan(k, [str(j)]) for j in range(comm.size)] if r == 0
                                else None, root=0))
    return got, slot_state(comm)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_receivers_without_a_schema_settle_once_then_guess(timeout, settles, monkeypatch):
    """Only the first call at a site finds the root's class by name (one settle per rank, for
    bcast and for scatter); every later call is one exchange, on the C path where it serves."""
    served = served_by_c(monkeypatch)
    got = outcomes(3, steady_receivers, timeout=timeout)
    for r, (values, _) in enumerate(got):
        want: List[Any] = []
        for k in range(5):
            want += [Vote(k, True), Plan(k, [str(r)])]
        assert values == want, (r, values)
        assert all(type(v) is type(w) for v, w in zip(values, want))
    assert got[0][1] == got[1][1] == got[2][1]
    assert settles == {0: 2, 1: 2, 2: 2}, settles
    if C_PATH and timeout is None:
        # Every call after each site's first, on every rank; but for #2, which the Python steps
        # run after the slot grew for the scatter's packed parts (the C path rebinds after).
        late = [ok for rank, seq, op, ok in served if seq >= 3]
        assert len(late) == 3 * 7 and all(late), served


def switching_root(comm: tc.TypedComm, values: List[Any]) -> Any:
    r = comm.rank
    got = []
    for value in values:  # one call site, the root's class changing under the guessers
        got.append(comm.bcast(value if r == 0 else None, root=0))
        got.append(comm.scatter([value] * comm.size if r == 0 else None, root=0))
    return got, slot_state(comm)


SWITCHES = [Vote(1, True), Vote(2, False), {"k": [1]}, Vote(3, True), None, Plan(4, ["a"]),
            Plan(5, []), np.arange(3.0), "text", Vote(6, True)]


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_root_that_changes_class_is_followed_not_a_desync(timeout):
    """Guessers that guessed wrong exchange once more and take the root's new class: every
    value comes back equal and of the root's type, and every rank keeps one state."""
    got = outcomes(3, switching_root, SWITCHES, timeout=timeout)
    for r, out in enumerate(got):
        assert not isinstance(out, BaseException), f"rank {r}: {out!r}"
        values, _ = out
        for value, (b, s) in zip(SWITCHES, zip(values[::2], values[1::2])):
            for x in (b, s):
                if isinstance(value, np.ndarray):
                    assert isinstance(x, np.ndarray) and np.array_equal(x, value)
                else:
                    assert x == value and type(x) is type(value), (r, x, value)
    assert got[0][1] == got[1][1] == got[2][1]


def guesser_meets(comm: tc.TypedComm, other: str) -> Any:
    r = comm.rank
    for k in range(2):
        comm.bcast(Vote(k, True) if r == 0 else None, root=0)  # WARM: rank 2 guesses here next
    try:
        if r == 2 and other == "allgather":
            comm.allgather(Vote(r, False))
        elif r == 2 and other == "barrier":
            comm.barrier()
        elif r == 2 and other == "another bcast":
            comm.bcast(None, root=0)
        else:
            comm.bcast(Vote(9, True) if r == 0 else None, root=0)  # WARM
        return "returned"
    except tc.DesyncError as exc:
        return str(exc), slot_state(comm)


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("other", ["allgather", "barrier", "another bcast"])
def test_a_guesser_that_meets_another_call_raises_one_desync_everywhere(timeout, other):
    """Rank 2 is elsewhere while ranks 0 and 1 (a guesser) are at the bcast: the exchange that
    follows a guess shows the same disagreement again, and every rank raises the same
    DesyncError in the same call, none waiting for an exchange its peers never run."""
    got = outcomes(3, guesser_meets, other, timeout=timeout)
    assert all(isinstance(g, tuple) for g in got), got
    assert got[0] == got[1] == got[2], got
    assert "test_core_guess.py" in got[0][0]


def mixed_receivers(comm: tc.TypedComm) -> Any:
    r = comm.rank
    got = []
    for k in range(4):
        if r == 3 and k == 2:
            comm._p.guesses.clear()  # rank 3 finds the class by name again, the others guess
        schema = Vote if r == 1 else None  # rank 1 names it
        got.append(comm.bcast(Vote(k, k % 2 == 0) if r == 0 else None, root=0, schema=schema))
    return got, slot_state(comm)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_guessing_named_and_by_name_receivers_in_one_call_agree(timeout, settles):
    """A call where one receiver names the schema, one guesses and one finds the class by name:
    every rank joins the settle (two calls need one: the first, and the one where rank 3 had
    forgotten), all return the root's values."""
    got = outcomes(4, mixed_receivers, timeout=timeout)
    for r, (values, _) in enumerate(got):
        assert values == [Vote(k, k % 2 == 0) for k in range(4)], (r, values)
    assert len({state for _, state in got}) == 1
    assert settles == {r: 2 for r in range(4)}, settles


def twin_module(name: str) -> Any:
    """A module holding a class of Vote's qualified name and structure (the same fingerprint)."""
    module = types.ModuleType(name)
    exec("import msgspec\nclass Vote(msgspec.Struct):\n    rank: int\n    ready: bool\n",
         module.__dict__)
    return module


def same_name_other_module(comm: tc.TypedComm, classes: List[Any]) -> Any:
    r = comm.rank
    return [comm.bcast(cls(k, True) if r == 0 else None, root=0)
            for k, cls in enumerate(classes)]


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_guess_of_the_same_structure_from_another_module_takes_the_roots_class(timeout):
    """The fingerprint (structure and qualified name) cannot tell the two classes apart, the
    class path the root sends can: a receiver that has the root's class returns it."""
    twin = twin_module("typedcoll_test_twin")
    sys.modules[twin.__name__] = twin
    try:
        classes = [Vote, Vote, twin.Vote, twin.Vote, Vote]
        got = outcomes(3, same_name_other_module, classes, timeout=timeout)
    finally:
        del sys.modules[twin.__name__]
    for r, values in enumerate(got):
        assert not isinstance(values, BaseException), f"rank {r}: {values!r}"
        assert [type(v) for v in values] == classes, (r, values)
        assert [v.rank for v in values] == list(range(5))


def named_calls(comm: tc.TypedComm, names: List[str]) -> Any:
    r = comm.rank
    return [comm.bcast(Vote(k, True) if r == 0 else [k], root=0, name=name)
            for k, name in enumerate(names)]


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_guesses_follow_the_calls_name(timeout, settles):
    """A named call's guess is keyed by its name: two names, each settled once."""
    names = ["plan", "plan", "vote", "plan", "vote"]
    got = outcomes(3, named_calls, names, timeout=timeout)
    for r, values in enumerate(got):
        assert values == [Vote(k, True) for k in range(5)], (r, values)
    assert settles == {r: 2 for r in range(3)}, settles


def bounded(comm: tc.TypedComm, names: List[str]) -> Any:
    sizes = []
    for k, name in enumerate(names):
        comm.bcast(Vote(k, True) if comm.rank == 0 else None, root=0, name=name)
        sizes.append(len(comm._p.guesses))
    return sizes


def test_the_table_of_guesses_is_bounded(monkeypatch):
    """Generated call sites do not grow a rank's table without bound: past its size it starts
    again (the next call at a forgotten site finds the class by name, as the first did)."""
    from typedcoll.core import guesses
    monkeypatch.setattr(guesses, "MAX_GUESSES", 4)
    got = outcomes(2, bounded, [f"site{k}" for k in range(10)])
    assert got[1] == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], got  # receivers remember, the root not
    assert got[0] == [0] * 10, got
