"""Core overhead: a checked allgather of a 3-field Struct against its floor and pickle.

Run: ``mpiexec -n 2 python bench/core_overhead.py [--rounds R] [--iters I] [--json F]``
(Open MPI: ``mpirun --oversubscribe --bind-to core -n N ...``).

Four methods on the 3-field ``RankState`` record, interleaved round by round:
  raw      ``comm.Allgather`` of a 64-byte numpy buffer (the floor: no encoding, no check)
  pickle   mpi4py's ``comm.allgather`` of the same record as a dict (what executors use)
  typed    ``TypedComm.allgather(record)``: envelope, call identity check, typed decode
  timed    the same on a communicator with ``timeout=60`` over a parent of its own: every
           backend operation of the call is bounded by a deadline
  hooked   ``TypedComm.allgather`` of the same fields in a Struct with a ``__post_init__``:
           decoding runs user code, so every rank settles it in one more exchange (on the
           Python steps)
  declared the same with the hook declared to decide from the fields alone
           (``typedcoll.decides_from_fields``): no settle, the C path
Goals: typed <= 1.5x raw; typed ahead of pickle. timed / typed is what a timeout costs,
hooked / typed what a decoding hook costs, declared / typed what is left of it declared.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from harness import records, report, timing

METHODS = ("raw", "pickle", "typed", "timed", "hooked", "declared")
CASE = "RankState"
RATIOS = [report.Ratio(CASE, "typed", "raw", ("<=", 1.5)),
          report.Ratio(CASE, "typed", "pickle", ("<=", 1.0)),
          report.Ratio(CASE, "timed", "typed"),
          report.Ratio(CASE, "hooked", "typed"),
          report.Ratio(CASE, "declared", "typed")]


class HookedRankState(records.RankState):
    """``RankState`` with a hook that decoding runs (it accepts every value)."""

    def __post_init__(self) -> None:
        pass


@tc.decides_from_fields
class DeclaredRankState(HookedRankState):
    """The same hook, declared to decide from the fields alone."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=15, iters=2000).parse_args(argv)
    settings = timing.Settings(args)
    world = MPI.COMM_WORLD
    control, raw_comm = world.Dup(), world.Dup()
    typed = tc.TypedComm(world)
    # A parent of its own, as an engine would keep its timed control plane apart.
    timed = tc.TypedComm(world.Dup(), timeout=60.0)
    rank, size = world.rank, world.size
    record = records.rank_state(rank)
    as_dict = msgspec.structs.asdict(record)
    hooked = HookedRankState(*msgspec.structs.astuple(record))
    declared = DeclaredRankState(*msgspec.structs.astuple(record))
    send, recv = np.zeros(64, np.uint8), np.empty(64 * size, np.uint8)
    calls = {"raw": lambda: raw_comm.Allgather(send, recv),
             "pickle": lambda: raw_comm.allgather(as_dict),
             "typed": lambda: typed.allgather(record),
             "timed": lambda: timed.allgather(record),
             "hooked": lambda: typed.allgather(hooked),
             "declared": lambda: typed.allgather(declared)}

    expected = [records.rank_state(r) for r in range(size)]
    report.stop_on_wrong_results(control, [p for p in (
        records.problem(typed.allgather(record), expected, "typed"),
        records.problem(timed.allgather(record), expected, "timed"),
        records.problem(typed.allgather(hooked), [HookedRankState(*msgspec.structs.astuple(e))
                                                  for e in expected], "hooked"),
        records.problem(typed.allgather(declared), [DeclaredRankState(*msgspec.structs.astuple(
            e)) for e in expected], "declared"),
        records.problem([records.RankState(**d) for d in raw_comm.allgather(as_dict)],
                        expected, "pickle")) if p])

    cells = [timing.Cell(CASE, m, calls[m]) for m in METHODS]
    results = timing.measure(control, cells, settings)
    if results is None:
        return 0
    doc = report.document("core_overhead", "typedcoll core overhead", size, settings.as_dict(),
                          results, RATIOS, report.versions(typed))
    print(report.table(doc, METHODS))
    report.write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
