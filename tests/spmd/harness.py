"""Helpers shared by the SPMD test programs in this folder (run by tests/test_core_spmd.py).

mpi4py's own test style: every rank runs the same code and checks its own results; a failed
check raises, and ``python -m mpi4py`` turns an uncaught exception on any rank into an abort of
every rank. Results that must agree across ranks are compared through a (pickle) collective on
the raw world communicator, which typed traffic never touches (TypedComm runs on a duplicate).
At the end every rank prints ``SPMD-OK <program> rank <r>/<n> checks <k>``, which the pytest side
requires from every rank.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Type

import numpy as np
from mpi4py import MPI

import typedcoll as tc

WORLD = MPI.COMM_WORLD


def equal(a: Any, b: Any) -> bool:
    """Deep equality that also compares numpy arrays and scalars by dtype, shape and value."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and bool(np.array_equal(a, b)))
    if isinstance(a, np.generic) or isinstance(b, np.generic):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(equal(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def slot_size(comm: tc.TypedComm) -> int:
    """The slot size the next collective uses (private state: the one place tests read it)."""
    return comm._p.policy.size


class Expect:
    """``with chk.expect(Error) as err:`` -- the call must be the first line inside the block.

    ``err.site(k)`` is ``file.py:LINE`` of the k-th line inside the block, so expected messages
    can name call sites without hard-coding line numbers.
    """

    def __init__(self, chk: "Checker", exc_type: Type[BaseException], label: str) -> None:
        self.chk = chk
        self.exc_type = exc_type
        self.label = label
        self.error: Optional[BaseException] = None
        self.line = 0

    def __enter__(self) -> "Expect":
        frame = sys._getframe(1)
        self.file = os.path.basename(frame.f_code.co_filename)
        self.line = frame.f_lineno
        return self

    def site(self, k: int = 1) -> str:
        return f"{self.file}:{self.line + k}"

    def __exit__(self, et, ev, tb) -> bool:
        if et is None:
            raise AssertionError(f"rank {self.chk.rank}: {self.label}: expected "
                                 f"{self.exc_type.__name__}, nothing was raised")
        if et is not self.exc_type:
            return False  # an unexpected error propagates, with its traceback, and aborts all
        self.error = ev
        self.chk.count += 1
        return True

    @property
    def text(self) -> str:
        return str(self.error)

    def message(self, expected: str) -> None:
        self.chk.eq(f"{self.label}: message", self.text, expected)


class Checker:
    def __init__(self, program: str) -> None:
        self.program = program
        self.rank = WORLD.Get_rank()
        self.size = WORLD.Get_size()
        self.count = 0

    def eq(self, label: str, got: Any, expected: Any) -> None:
        if not equal(got, expected):
            raise AssertionError(f"rank {self.rank}: {label}:\n  got      {got!r}\n"
                                 f"  expected {expected!r}")
        self.count += 1

    def true(self, label: str, condition: bool) -> None:
        if not condition:
            raise AssertionError(f"rank {self.rank}: {label}")
        self.count += 1

    def same(self, label: str, value: Any) -> None:
        """``value`` must be equal on every rank (compared through a world allgather)."""
        values = WORLD.allgather(value)
        if not all(equal(v, values[0]) for v in values):
            raise AssertionError(f"rank {self.rank}: {label}: ranks differ: {values!r}")
        self.count += 1

    def expect(self, exc_type: Type[BaseException], label: str) -> Expect:
        return Expect(self, exc_type, label)

    def usable(self, comm: tc.TypedComm, label: str) -> None:
        """The next collective on ``comm`` works and every rank sits at the same seq."""
        seq = comm.seq
        self.eq(f"{label}: next collective", comm.allgather(comm.rank * 10),
                [r * 10 for r in range(comm.size)])
        self.eq(f"{label}: seq", comm.seq, seq + 1)
        self.same(f"{label}: seq agrees", comm.seq)

    def done(self, uniform: bool = True) -> None:
        """Print this rank's marker; ``uniform``: every rank must have run as many checks."""
        counts = WORLD.allgather(self.count)
        if uniform and len(set(counts)) != 1:
            raise AssertionError(f"rank {self.rank}: ranks ran different numbers of checks: "
                                 f"{counts}")
        marker(f"SPMD-OK {self.program} rank {self.rank}/{self.size} checks {self.count}")


def marker(line: str) -> None:
    """One write per line: print() writes the newline separately (PYTHONUNBUFFERED), and
    mpiexec may then interleave another rank's output between the two."""
    sys.stdout.flush()
    os.write(1, (line + "\n").encode())
