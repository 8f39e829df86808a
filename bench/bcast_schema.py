"""A bcast whose receivers name their schema against one whose receivers take the root's class.

Run: ``mpiexec -n 2 python bench/bcast_schema.py [--rounds R] [--iters I] [--json F]``
(Open MPI: ``mpirun --oversubscribe --bind-to core -n N ...``).

Three methods on the 3-field ``RankState`` record from root 0 (a dict for pickle), interleaved
round by round (medians over rounds of the slowest rank's mean per call):
  schema     ``TypedComm.bcast(state or None, root=0, schema=RankState)``
  no_schema  ``TypedComm.bcast(state or None, root=0)``: at the call's first run receivers
             find the root's class by name among imported modules and every rank settles the
             outcome in one more exchange (one rank may lack the class); every later run (the
             steady state measured) sends that class as if named (``core/guesses.py``)
  branch     ``bcast(state, root=0)`` in one arm of an ``if`` and ``bcast(None, root=0,
             schema=RankState)`` in the other (a role branch, ``core/arms.py``): the first
             run compares the envelopes once more to accept the two call sites; every later
             one sends the role identity it learned there (``core/roles.py``)
  pickle     ``comm.bcast(dict or None, root=0)``
Goal, as for every bcast: at most 1.2x pickle. ``branch / schema`` is what writing the roles
on two lines costs against one line (or a shared ``name=``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import msgspec
from mpi4py import MPI

import typedcoll as tc
from harness import records, report, timing

RankState = records.RankState
METHODS = ("schema", "no_schema", "branch", "pickle")
CASE = "RankState"
RATIOS = [report.Ratio(CASE, "schema", "pickle", ("<=", 1.2)),
          report.Ratio(CASE, "no_schema", "pickle", ("<=", 1.2)),
          report.Ratio(CASE, "no_schema", "schema"),
          report.Ratio(CASE, "branch", "schema")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=15, iters=1000).parse_args(argv)
    settings = timing.Settings(args)
    world = MPI.COMM_WORLD
    control, pickled = world.Dup(), world.Dup()
    typed = tc.TypedComm(world)
    root = world.rank == 0
    state = records.rank_state(0)
    as_dict = msgspec.structs.asdict(state)

    def branch() -> RankState:
        if root:
            typed.bcast(state, root=0)
            return state
        else:
            return typed.bcast(None, root=0, schema=RankState)

    calls = {"schema": lambda: typed.bcast(state if root else None, root=0, schema=RankState),
             "no_schema": lambda: typed.bcast(state if root else None, root=0),
             "branch": branch,
             "pickle": lambda: RankState(**pickled.bcast(as_dict if root else None, root=0))}

    report.stop_on_wrong_results(control, [
        f"{method}: got {got!r}, expected {state!r}"
        for method, got in ((m, calls[m]()) for m in METHODS) if got != state])

    cells = [timing.Cell(CASE, m, calls[m]) for m in METHODS]
    results = timing.measure(control, cells, settings)
    if results is None:
        return 0
    doc = report.document("bcast_schema", "bcast with and without schema= on the receivers",
                          world.size, settings.as_dict(), results, RATIOS,
                          report.versions(typed))
    print(report.table(doc, METHODS))
    report.write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
