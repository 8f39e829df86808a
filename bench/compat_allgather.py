"""The mpi4py drop-in's allgather of a small dict (and its allreduce and gather) against mpi4py's.

Run: ``mpiexec -n 2 python bench/compat_allgather.py [--rounds R] [--iters I] [--json F]``
(Open MPI: ``mpirun --oversubscribe --bind-to core -n N ...``).

Two methods on the router's 3-key rank-state dict, interleaved round by round (medians over
rounds of the slowest rank's mean per call):
  pickle   ``MPI.COMM_WORLD.allgather(d)``: pickle, an Allgather of sizes, an Allgatherv, unpickle
  typed    ``TypedComm.allgather(d, schema=Any)``: the typed collective the drop-in makes (the
           drop-in's floor: what it adds is telling plain values from the rest)
  drop-in  ``typedcoll.compat.mpi4py(comm).allgather(d)``: the same call, as a typed collective
           (envelope with the call's identity, every rank's verdict, msgpack, no pickle)
Goal: the drop-in at least 1.5x faster (pickle / drop-in >= 1.5). The header says whether the C
fast path served the drop-in's exchange.

Two more cases, each with the same three methods: ``allreduce`` of the rank (an int) with
``MPI.SUM`` (typed: ``allreduce(rank, op="sum")``) and ``gather`` of the dict to root 0 (typed:
``gather(d, root=0, schema=Any)``). Goal, as for every collective of ``collectives.py``: the
drop-in at most 1.0x pickle.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import msgspec
from mpi4py import MPI

import typedcoll as tc
from harness import records, report, timing

METHODS = ("pickle", "typed", "drop-in")
CASE = "dict[3]"
REDUCE_CASE, GATHER_CASE = "allreduce int", "gather dict[3]"
RATIOS = [report.Ratio(CASE, "drop-in", "pickle", ("<=", 1 / 1.5)),
          report.Ratio(REDUCE_CASE, "drop-in", "pickle", ("<=", 1.0)),
          report.Ratio(GATHER_CASE, "drop-in", "pickle", ("<=", 1.0))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=15, iters=2000).parse_args(argv)
    settings = timing.Settings(args)
    world = MPI.COMM_WORLD
    control, pickled = world.Dup(), world.Dup()
    drop_in = tc.compat.mpi4py(world)
    size = world.size
    state = msgspec.structs.asdict(records.rank_state(world.rank))
    rank = world.rank
    cases = {
        CASE: {"pickle": lambda: pickled.allgather(state),
               "typed": lambda: drop_in.typed.allgather(state, schema=Any),
               "drop-in": lambda: drop_in.allgather(state)},
        REDUCE_CASE: {"pickle": lambda: pickled.allreduce(rank, op=MPI.SUM),
                      "typed": lambda: drop_in.typed.allreduce(rank, op="sum"),
                      "drop-in": lambda: drop_in.allreduce(rank, op=MPI.SUM)},
        GATHER_CASE: {"pickle": lambda: pickled.gather(state, root=0),
                      "typed": lambda: drop_in.typed.gather(state, root=0, schema=Any),
                      "drop-in": lambda: drop_in.gather(state, root=0)},
    }

    states = [msgspec.structs.asdict(records.rank_state(r)) for r in range(size)]
    expected = {CASE: states, REDUCE_CASE: size * (size - 1) // 2,
                GATHER_CASE: states if rank == 0 else None}
    report.stop_on_wrong_results(control, [
        f"{case} {method}: got {got!r}, expected {expected[case]!r}"
        for case, methods in cases.items()
        for method, got in ((m, methods[m]()) for m in METHODS)
        if got != expected[case]])

    cells = [timing.Cell(case, m, methods[m]) for case, methods in cases.items()
             for m in METHODS]
    results = timing.measure(control, cells, settings)
    if results is None:
        return 0
    doc = report.document("compat_allgather", "mpi4py drop-in allgather vs pickle", size,
                          settings.as_dict(), results, RATIOS, report.versions(drop_in.typed))
    print(report.table(doc, METHODS))
    medians = {r["method"]: r["median_us"] for r in results if r["case"] == CASE}
    print(f"pickle / drop-in = {medians['pickle'] / medians['drop-in']:.2f}x "
          f"(goal >= 1.5x)")
    report.write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
