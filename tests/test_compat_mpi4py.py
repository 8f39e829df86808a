"""The mpi4py drop-in: every method under typedcoll.testing, the checks only a typed drop-in
makes, and (under mpiexec) its results against mpi4py's own on random programs."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

import typedcoll as tc
from typedcoll import compat
from typedcoll.core import fast
from typedcoll.testing import observe, run

from test_testing_core import errors_by_rank


@dataclasses.dataclass
class Stats:
    rank: int
    sizes: list


def line_of(text: str) -> int:
    for number, line in enumerate(Path(__file__).read_text().splitlines(), 1):
        if text in line and "line_of" not in line:
            return number
    raise AssertionError(text)


def copy(value):
    """What mpi4py returns for ``value``: its pickle round trip."""
    return pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))


# --- the API ------------------------------------------------------------------------------------
def test_every_collective_returns_what_mpi4py_would():
    def value(r):
        return [None, (r, "t"), Stats(r, [r] * r), {"k": {r}}][r]

    def prog(comm):
        c = compat.mpi4py(comm)
        r, n = c.Get_rank(), c.Get_size()
        assert (c.rank, c.size, c.typed) == (r, n, comm)
        return dict(
            allgather=c.allgather(value(r)),
            gather=c.gather(value(r), root=2),
            bcast=c.bcast(value(r) if r == 1 else None, root=1),
            scatter=c.scatter([value(i) for i in range(n)] if r == 3 else None, root=3),
            alltoall=c.alltoall([(r, j) for j in range(n)]),
            allreduce=c.allreduce(r + 0.5),
            reduce=c.reduce([r], root=0),
            barrier=c.barrier())

    out = run(4, prog, timeout=10)
    values = [copy(value(r)) for r in range(4)]
    for r, got in enumerate(out):
        assert got["allgather"] == values
        assert got["gather"] == (values if r == 2 else None)
        assert got["bcast"] == values[1]
        assert got["scatter"] == values[r]
        assert got["alltoall"] == [(i, r) for i in range(4)]
        assert got["allreduce"] == 0.5 + 1.5 + 2.5 + 3.5
        assert got["reduce"] == ([0, 1, 2, 3] if r == 0 else None)
        assert got["barrier"] is None


@pytest.mark.parametrize("op, values, expected", [
    ("sum", ["a", "b", "c"], "abc"), ("prod", [2, 3, 4], 24), ("max", [1, 7.5, 3], 7.5),
    ("min", ["b", "a", "c"], "a"), ("land", [3, 5, 1], True), ("lor", [0, None, ""], False),
    ("lxor", [1, 0, 1], False), ("band", [7, 3, 5], 1), ("bor", [1, 2, 4], 7),
    ("bxor", [1, 3, 7], 5), ("sum", [[1], [2], [3]], [1, 2, 3]),
    ("max", [np.array([1, 5]), np.array([4, 2]), np.array([0, 0])], np.array([4, 5])),
])
def test_reductions_use_the_ops_python_meaning(op, values, expected):
    from mpi4py import MPI

    def prog(comm):
        c = compat.mpi4py(comm)
        return c.allreduce(values[c.rank], op=getattr(MPI, op.upper())), \
            c.reduce(values[c.rank], op=op, root=1)

    for r, (every, at_root) in enumerate(run(3, prog, timeout=10)):
        assert np.array_equal(every, expected) and type(every) is type(expected)
        assert at_root is None if r != 1 else np.array_equal(at_root, expected)


def test_nan_wins_max_and_min_whichever_rank_holds_it():
    def prog(comm):
        c = compat.mpi4py(comm)
        return c.allreduce([1.0, float("nan")][c.rank], op="max"), \
            c.allreduce([float("nan"), 1.0][c.rank], op="min")

    for got in run(2, prog, timeout=10):
        assert all(x != x for x in got)


def test_point_to_point_with_mpi4py_defaults_and_status():
    from mpi4py import MPI

    def prog(comm):
        c = compat.mpi4py(comm)
        if c.rank == 0:
            c.send({"a": (1,)}, dest=1, tag=5)
            c.isend(Stats(0, []), dest=1).wait()
            return c.sendrecv("zero", dest=1, source=1)
        status = MPI.Status()
        first = c.recv(status=status)
        request = c.irecv(source=0, tag=0)
        return first, (status.Get_source(), status.Get_tag()), request.wait(), \
            c.sendrecv("one", dest=0, source=0)

    zero, one = run(2, prog, timeout=10)
    assert zero == "one"
    assert one == ({"a": (1,)}, (0, 5), Stats(0, []), "zero")


def test_requests_waitall_and_testall():
    def prog(comm):
        c = compat.mpi4py(comm)
        peer = 1 - c.rank
        receives = [c.irecv(source=peer, tag=t) for t in range(3)]
        sends = [c.isend(t * 10 + c.rank, dest=peer, tag=t) for t in range(3)]
        compat.Request.waitall(sends)
        got = compat.Request.waitall(receives)
        return got, compat.Request.testall(receives)

    for r, (got, tested) in enumerate(run(2, prog, timeout=10)):
        peer = 1 - r
        assert got == [peer, 10 + peer, 20 + peer]
        assert tested == (True, got)


# --- what only a typed drop-in catches ----------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4])
def test_skipped_vote_of_plain_ints_raises_on_every_rank(n):
    def prog(comm):
        c = compat.mpi4py(comm)
        if c.rank != 0:
            c.allgather(3)  # BATCH-VOTE
        c.allgather(c.rank > 0)  # TIMEOUT-VOTE

    with pytest.raises(ExceptionGroup) as info:
        run(n, prog, timeout=10)
    errors = errors_by_rank(info.value)
    assert sorted(errors) == list(range(n))
    others = "rank 1" if n == 2 else "ranks 1-3"
    width = max(len("rank 0:"), len(others) + 1)
    expected = (
        f"collective #0 on WORLD diverged (call site):\n"
        f"  {'rank 0:':<{width}} allgather[Any] at test_compat_mpi4py.py:"
        f"{line_of('# TIMEOUT-VOTE')}, its 1st call\n"
        f"  {others + ':':<{width}} allgather[Any] at test_compat_mpi4py.py:"
        f"{line_of('# BATCH-VOTE')}, its 1st call\n"
        f"  only the call sites differ: if these are the same collective called from different "
        f"places, give every rank's call the same name=")
    for e in errors.values():
        assert isinstance(e, tc.DesyncError) and str(e) == expected


def test_the_step_clock_catches_a_vote_skipped_at_one_line_of_a_loop():
    # Both votes are one line run every step: only the step tells rank 1's step-2 vote from
    # rank 0's step-1 one. Without the clock they would pair, one step apart, without an error.
    def prog(comm):
        c = compat.mpi4py(comm)
        for step in range(3):
            c.set_step(step)
            if not (c.rank == 1 and step == 1):  # rank 1 idle at step 1
                c.allgather(step)  # STEP-VOTE

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    errors = errors_by_rank(info.value)
    site = f"test_compat_mpi4py.py:{line_of('# STEP-VOTE')}"
    expected = (f"collective #1 on WORLD diverged (step):\n"
                f"  rank 0: allgather[Any] at {site}, its 2nd call, step 1\n"
                f"  rank 1: allgather[Any] at {site}, its 2nd call, step 2")
    for e in errors.values():
        assert isinstance(e, tc.DesyncError) and e.kinds == (tc.MismatchKind.STEP,), e
        assert str(e).startswith(expected), e


def test_a_bad_step_given_to_set_step_raises_at_the_next_call_on_every_rank():
    def prog(comm):
        c = compat.mpi4py(comm)
        c.set_step("one" if c.rank == 1 else 1)  # type: ignore[arg-type]
        c.allgather(c.rank)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    errors = errors_by_rank(info.value)
    assert type(errors[1]) is tc.EncodeError and type(errors[0]) is tc.PeerError
    for e in errors.values():
        assert "(given to set_step)" in str(e), e


def test_a_note_made_on_one_rank_is_in_the_error_every_rank_raises():
    # The drop-in had no note(): AttributeError, where TypedComm's decisions reach the report.
    def prog(comm):
        c = compat.mpi4py(comm)
        if c.rank == 1:
            c.note("idle", True)  # NOTE-IDLE
            c.allgather(None)  # IDLE-VOTE
        c.allgather(c.rank)

    with pytest.raises(ExceptionGroup) as info:
        run(3, prog, timeout=2)
    assert_every_rank_lists_rank_1s_note(info.value,
                                         f"test_compat_mpi4py.py:{line_of('# NOTE-IDLE')}")


def assert_every_rank_lists_rank_1s_note(group: BaseException, site: str) -> None:
    """Every one of 3 ranks raised DesyncError listing rank 1's ``idle`` note, made at
    ``site``, as the decision that differs (the drop-ins' ``note``)."""
    errors = errors_by_rank(group)
    assert sorted(errors) == [0, 1, 2]
    for e in errors.values():
        assert isinstance(e, tc.DesyncError), e
        assert ("\n  decisions that differ:\n"
                f"    idle at {site} — ranks 0,2: (not noted); rank 1: True") in str(e), e
        assert e.decisions == (("idle", site, [("ranks 0,2", "(not noted)"),
                                               ("rank 1", "True")]),)


def test_a_note_records_the_latest_value_its_line_and_step():
    def prog(comm):
        c = compat.mpi4py(comm)
        c.set_step(2)
        c.note("k", 0)
        c.note("k", {"why": "x"})  # NOTE-LATEST
        return comm._p.decisions()

    site = f"test_compat_mpi4py.py:{line_of('# NOTE-LATEST')}"
    assert run(1, prog) == [(tc.Note(key="k", value={"why": "x"}, site=site, step=2),)]


class MPIDist:
    """An engine's unmarked wrapper class over the drop-in (its methods one call each)."""

    def __init__(self, comm):
        self.tp_comm = compat.mpi4py(comm)

    def tp_allgather(self, obj):
        return self.tp_comm.allgather(obj)


def test_a_skipped_vote_through_an_unmarked_wrapper_raises_on_every_rank():
    # The engine's crash: ranks 1-2 skip the batch-size vote; without the wrappers' callers
    # as sites, their rank-state vote would meet rank 0's batch-size vote and return it.
    def prog(comm):
        dist = MPIDist(comm)
        if dist.tp_comm.rank == 0:
            dist.tp_allgather(3)  # BATCH-SIZE
        return dist.tp_allgather({"rank": dist.tp_comm.rank, "active": 1})  # RANK-STATE

    with pytest.raises(ExceptionGroup) as info:
        run(3, prog, timeout=10)
    errors = errors_by_rank(info.value)
    assert sorted(errors) == [0, 1, 2]
    for e in errors.values():
        assert isinstance(e, tc.DesyncError) and e.kinds == (tc.MismatchKind.CALL,), e
        assert f"rank 0:    allgather[Any] at test_compat_mpi4py.py:{line_of('# BATCH-SIZE')}" \
            in str(e), e
        assert f"ranks 1-2: allgather[Any] at test_compat_mpi4py.py:{line_of('# RANK-STATE')}" \
            in str(e), e


def test_different_reduce_ops_or_ops_at_one_name_raise():
    from mpi4py import MPI

    def prog(comm):
        c = compat.mpi4py(comm)
        with pytest.raises(tc.DesyncError) as ops:
            c.allreduce(1, op=MPI.SUM if c.rank == 0 else MPI.MAX)
        with pytest.raises(tc.DesyncError) as kinds:
            if c.rank == 0:
                c.allgather(1, name="vote")
            else:
                c.gather(1, name="vote")
        return ops.value.kinds, kinds.value.kinds

    for got in run(2, prog, timeout=10):
        assert got == ((tc.MismatchKind.REDUCE_OP,), (tc.MismatchKind.OP, tc.MismatchKind.ROOT))


def test_value_that_cannot_be_sent_raises_on_every_rank():
    class Opaque:
        pass

    def prog(comm):
        c = compat.mpi4py(comm)
        c.bcast(Opaque() if c.rank == 0 else None, root=0)  # OPAQUE

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    errors = errors_by_rank(info.value)
    detail = ("expected a value the drop-ins can send without pickle (builtins, dataclasses, "
              "msgspec Structs, NamedTuple, TypedDict, Enum, numpy arrays and scalars), got "
              "Opaque at $: make it a msgspec Struct or a dataclass, or convert it to one of "
              "those before the call")
    site = f"test_compat_mpi4py.py:{line_of('# OPAQUE')}"
    assert isinstance(errors[0], tc.EncodeError) and str(errors[0]) == (
        f"collective #0 on WORLD: rank 0 could not send its bcast[Any] contribution at {site}: "
        f"{detail}")
    assert isinstance(errors[1], tc.PeerError) and str(errors[1]) == (
        f"collective #0 on WORLD: rank 0 failed its bcast[Any] contribution at {site}: {detail}")


def test_combination_that_fails_raises_on_every_rank():
    def prog(comm):
        c = compat.mpi4py(comm)
        c.reduce([1, "a"][c.rank], op="sum", root=0)  # MIXED

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    errors = errors_by_rank(info.value)
    expected = (f"collective #0 on WORLD: reduce[Any] op=sum at test_compat_mpi4py.py:"
                f"{line_of('# MIXED')}: combining ranks 0..0's int with rank 1's str failed: "
                f"TypeError: unsupported operand type(s) for +: 'int' and 'str'")
    assert [type(errors[r]) for r in (0, 1)] == [tc.CollectiveError] * 2
    assert str(errors[0]) == str(errors[1]) == expected


def _rank0_only_module(name: str) -> types.ModuleType:
    """A module whose class only rank 0's thread can see: what each rank imported differs."""
    module = types.ModuleType(name)

    @dataclasses.dataclass
    class Hidden:
        a: int

    Hidden.__module__, Hidden.__qualname__ = name, "Hidden"

    def __getattr__(attr: str):
        if attr == "Hidden" and threading.current_thread().name == "rank-0":
            return Hidden
        raise AttributeError(attr)

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    module.make = Hidden  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("op", ["allgather", "bcast", "gather", "scatter", "alltoall"])
def test_class_one_rank_lacks_raises_decode_error_on_every_rank(monkeypatch, op):
    module = _rank0_only_module("compat_rank0_only")
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def prog(comm):
        c = compat.mpi4py(comm)
        mine = module.make(c.rank) if c.rank == 0 else None
        calls = {"allgather": lambda: c.allgather(mine), "bcast": lambda: c.bcast(mine),
                 "gather": lambda: c.gather(mine, root=1),
                 "scatter": lambda: c.scatter([mine] * c.size if c.rank == 0 else None),
                 "alltoall": lambda: c.alltoall([mine] * c.size)}
        with pytest.raises(tc.DecodeError) as info:
            calls[op]()
        return str(info.value), c.allgather(c.rank)

    out = run(3, prog, timeout=10)
    assert len({text for text, _ in out}) == 1
    text, after = out[0]
    assert "could not rebuild the value from rank 0: expected the class compat_rank0_only:" \
           "Hidden, got no 'Hidden' in module 'compat_rank0_only'" in text
    assert after == [0, 1, 2]


def test_timeout_when_a_rank_skips_a_call():
    def prog(comm):
        c = compat.mpi4py(comm)
        if c.rank == 0:
            return c.allgather(1)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=0.3)
    (err,) = info.value.exceptions
    assert isinstance(err, tc.CollectiveTimeout) and err.missing == (1,)


def test_communicator_calls_over_a_typed_comm():
    """Barrier, Split, Dup and Clone over a TypedComm (no mpi4py communicator beneath): checked
    calls whose results are drop-ins over the right ranks; a split skipped by one rank raises
    on every rank (under mpiexec, ``spmd/compat_mpi4py.py`` compares them with mpi4py's)."""
    def prog(comm):
        drop_in = compat.mpi4py(comm)
        drop_in.Barrier()
        odd = drop_in.Split(comm.rank % 2, key=-comm.rank)
        twin = drop_in.Clone()
        flagged = drop_in.Split(comm.rank >= 1, key=True)  # mpi4py takes bools as ints
        out = (odd.Get_size(), odd.allgather(comm.rank), twin.allgather(comm.rank), odd.comm,
               flagged.allgather(comm.rank))
        with pytest.raises(tc.DesyncError) as info:
            if comm.rank == 0:
                drop_in.allgather(0)
            else:
                drop_in.Split(0)
        with pytest.raises(AttributeError, match=r"'Allreduce'; mpi4py's buffer calls are not "
                                                 r"checked by typedcoll: call them on \.comm"):
            drop_in.Allreduce
        return out, info.value.kinds

    got = run(3, prog, timeout=20)
    assert [g[0] for g in got] == [(2, [2, 0], [0, 1, 2], None, [0]),
                                   (1, [1], [0, 1, 2], None, [1, 2]),
                                   (2, [2, 0], [0, 1, 2], None, [1, 2])]
    assert {g[1] for g in got} == {(tc.MismatchKind.OP, tc.MismatchKind.CALL,
                                    tc.MismatchKind.SCHEMA)}


def test_import_pulls_in_neither_mpi4py_nor_torch():
    code = ("import sys, typedcoll as tc, typedcoll.compat\n"
            "assert callable(tc.compat.mpi4py) and callable(tc.compat.torch)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mpi4py', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- against mpi4py itself, under mpiexec -------------------------------------------------------
@pytest.mark.parametrize("nranks", [2, 4])
def test_matches_mpi4py_on_random_programs(spmd, nranks):
    result = spmd("compat_mpi4py", nranks, timeout=240)
    assert "hypothesis: derandomized" in result.stdout


def test_the_c_and_python_paths_meet_in_one_drop_in_job(spmd):
    """Ranks 1 and 3 on the pure-Python steps, 0 and 2 on the C path: one protocol for the
    drop-in's collectives too (the program compares every rank's results with mpi4py's)."""
    spmd("compat_mpi4py", 4, timeout=240,
         rank_env=[{"TYPEDCOLL_PURE_PYTHON": "1"} if r % 2 else {} for r in range(4)])


def test_the_c_path_serves_the_drop_ins_gathering_calls(monkeypatch):
    """allreduce, reduce and gather of plain values and of records take the C path's steady
    state (where the extension is built), and return what the Python steps return."""
    served = []
    original = getattr(fast._speedups, "allgather", None)
    if original is not None:
        def after(_, out, p, *args):
            if len(args) == 7:
                served.append((args[4], out.__class__ is list))
        monkeypatch.setattr(fast._speedups, "allgather", observe(original, after))

    def prog(comm):
        c = compat.mpi4py(comm)
        r = c.rank
        out = []
        for _ in range(3):
            out.append(c.allreduce(r + 1, op="sum"))
            out.append(c.allreduce(float(r), op="max"))
            out.append(c.reduce(r, op="prod", root=1))
            out.append(c.gather(Stats(r, [r]), root=2))
            out.append(c.allreduce({r}, op="bor"))
        return out

    got = run(3, prog, timeout=None)  # no deadline: the C path serves in-process ranks
    for r, out in enumerate(got):
        one = [6, 2.0, 0 if r == 1 else None,
               [Stats(k, [k]) for k in range(3)] if r == 2 else None, {0, 1, 2}]
        assert out == one * 3, (r, out)
    if fast.ENABLED:
        assert len(served) == 3 * 3 * 5 and all(ok for _, ok in served[3 * 5:]), served
