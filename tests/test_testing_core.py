"""The core's newer collectives, run under typedcoll.testing: scatter, alltoall, reduce,
reduce_scatter, every reduce op (names and mpi4py's MPI.Op), receivers that learn the root's
class from its envelope, Structs with ndarray fields, arrays whose shapes differ by rank.

Cases marked xfail(strict) are core defects found here; each says what is wrong, and turns into
a failure (XPASS) once the core is fixed, so that the marker is removed."""

from __future__ import annotations

import dataclasses
import sys
import threading
import types

import msgspec
import numpy as np
import pytest

import typedcoll as tc
from typedcoll.testing import run


@dataclasses.dataclass
class Plan:
    step: int
    ranks: list[int]


class Batch(msgspec.Struct):
    ids: np.ndarray
    scores: np.ndarray


def errors_by_rank(group: BaseException) -> dict:
    """``typedcoll.testing.run``'s exception group as {rank: that rank's exception}, read from
    the note each carries."""
    return {int("".join(e.__notes__).split("(rank ")[1].split(" ")[0]): e
            for e in group.exceptions}


def test_scatter_alltoall_reduce_reduce_scatter():
    def prog(comm):
        r, n = comm.rank, comm.size
        return (comm.scatter([Plan(i, [i]) for i in range(n)] if r == 1 else None, root=1),
                comm.alltoall([r * 10 + j for j in range(n)]),
                comm.reduce(np.full(2, r), op="max", root=2),
                comm.reduce_scatter([r + j for j in range(n)], op="sum"))

    for r, (scattered, swapped, reduced, rs) in enumerate(run(3, prog, timeout=10)):
        assert scattered == Plan(r, [r])
        assert swapped == [i * 10 + r for i in range(3)]
        assert reduced is None if r != 2 else np.array_equal(reduced, [2, 2])
        assert rs == sum(i + r for i in range(3))


def test_every_reduce_op_by_name_and_by_mpi_op():
    from mpi4py import MPI
    names = ["sum", "prod", "max", "min", "land", "lor", "lxor", "band", "bor", "bxor"]

    def prog(comm):
        value = comm.rank + 1
        return ([comm.allreduce(value, op=name) for name in names],
                [comm.allreduce(value, op=getattr(MPI, name.upper())) for name in names],
                comm.reduce(value, op=MPI.PROD, root=0))

    expected = [6, 6, 3, 1, True, True, True, 0, 3, 0]
    for r, (by_name, by_op, reduced) in enumerate(run(3, prog, timeout=10)):
        assert by_name == by_op == expected
        assert reduced == (6 if r == 0 else None)


def test_receivers_without_schema_get_the_roots_class():
    def prog(comm):
        root = comm.rank == 0
        return (comm.bcast(Plan(1, [0, 1]) if root else None),
                comm.scatter([Plan(i, []) for i in range(comm.size)] if root else None))

    for r, (plan, part) in enumerate(run(2, prog, timeout=10)):
        assert plan == Plan(1, [0, 1]) and part == Plan(r, [])


def test_structs_with_array_fields_and_shapes_that_differ_by_rank():
    def prog(comm):
        r = comm.rank
        batch = Batch(np.arange(r + 1), np.ones(r + 2, dtype=np.float32))
        return ([b.ids.shape for b in comm.allgather(batch)],
                comm.gather(np.arange(r + 1), root=0),
                comm.bcast(batch if r == 1 else None, root=1))

    for r, (shapes, gathered, got) in enumerate(run(3, prog, timeout=10)):
        assert shapes == [(1,), (2,), (3,)]
        assert gathered is None or [len(g) for g in gathered] == [1, 2, 3]
        assert got.scores.dtype == np.float32 and list(got.ids) == [0, 1]


def test_dtype_still_checked_and_shapes_where_values_combine():
    def prog(comm):
        with pytest.raises(tc.DesyncError) as dtype:
            comm.allgather(np.zeros(2, dtype=np.float32 if comm.rank else np.float64))
        with pytest.raises(tc.DesyncError) as shape:
            comm.allreduce(np.zeros(comm.rank + 1))
        return dtype.value.kinds, shape.value.kinds

    for got in run(2, prog, timeout=10):
        assert got == ((tc.MismatchKind.DTYPE,), (tc.MismatchKind.SHAPE,))


def _rank0_only(name: str) -> types.ModuleType:
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


def test_class_one_receiver_lacks_raises_on_every_rank(monkeypatch):
    module = _rank0_only("core_rank0_only")
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def prog(comm):
        comm.bcast(module.make(1) if comm.rank == 0 else None)

    with pytest.raises(ExceptionGroup) as info:
        run(3, prog, timeout=10)
    errors = errors_by_rank(info.value)
    assert sorted(errors) == [0, 1, 2]
    assert all("expected the class core_rank0_only:Hidden, got no 'Hidden' in module "
               "'core_rank0_only'" in str(e) for e in errors.values())


def test_class_one_receiver_lacks_is_a_decode_error(monkeypatch):
    module = _rank0_only("core_rank0_only_decode")
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def prog(comm):
        comm.bcast(module.make(1) if comm.rank == 0 else None)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    assert all(isinstance(e, tc.DecodeError) for e in info.value.exceptions)


def test_reduce_scatter_with_different_ops_raises():
    def prog(comm):
        with pytest.raises(tc.DesyncError):
            comm.reduce_scatter([1, 2], op="sum" if comm.rank == 0 else "max")

    run(2, prog, timeout=10)


def test_reduce_scatter_against_alltoall_raises():
    def prog(comm):
        with pytest.raises(tc.DesyncError):
            if comm.rank == 0:
                comm.reduce_scatter([1, 2], name="x")
            else:
                comm.alltoall([1, 2], name="x")

    run(2, prog, timeout=10)


def test_reduce_scatter_bad_op_names_the_op():
    def prog(comm):
        with pytest.raises(tc.CollectiveError, match="expected op to be one of"):
            comm.reduce_scatter([1, 2], op="bogus" if comm.rank == 0 else "sum")

    run(2, prog, timeout=10)


def test_reduce_scatter_shapes_that_differ_raise_on_every_rank():
    def prog(comm):
        with pytest.raises(tc.DesyncError):
            comm.reduce_scatter([np.arange(2), np.arange(3 if comm.rank == 0 else 2)])

    run(2, prog, timeout=10)
