"""Flight-recorder cost: a typed allgather of a 3-field Struct with the recorder on and off.

Run: ``mpiexec -n 2 python bench/recorder_cost.py [--rounds R] [--iters I] [--json F]``
(Open MPI: ``mpirun --oversubscribe --bind-to core -n N ...``).

Two TypedComms over the same world, identical but for the recorder: ``on`` keeps the default
ring buffer (``TYPEDCOLL_TRACE_BUFFER`` unset), ``off`` is created with
``TYPEDCOLL_TRACE_BUFFER=0``. Besides the ratio of the medians, ``paired_ratio`` is the median
over rounds of each round's on/off (slowest rank), which slow drifts of the machine disturb
less. Goal: recording costs <= 5% of the typed allgather.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Optional, Sequence

from mpi4py import MPI

import typedcoll as tc
from harness import records, report, timing

CASE = "RankState"
RATIOS = [report.Ratio(CASE, "on", "off", ("<=", 1.05))]


def unrecorded(world: MPI.Intracomm) -> tc.TypedComm:
    previous = os.environ.get("TYPEDCOLL_TRACE_BUFFER")
    os.environ["TYPEDCOLL_TRACE_BUFFER"] = "0"  # read when a communicator is created
    try:
        return tc.TypedComm(world)
    finally:
        if previous is None:
            del os.environ["TYPEDCOLL_TRACE_BUFFER"]
        else:
            os.environ["TYPEDCOLL_TRACE_BUFFER"] = previous


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=21, iters=3000).parse_args(argv)
    settings = timing.Settings(args)
    world = MPI.COMM_WORLD
    control = world.Dup()
    on, off = tc.TypedComm(world), unrecorded(world)
    if on._p.recorder is None or off._p.recorder is not None:
        raise SystemExit("expected the recorder on by default and off with "
                         "TYPEDCOLL_TRACE_BUFFER=0: unset TYPEDCOLL_TRACE_BUFFER")
    record = records.rank_state(world.rank)
    expected = [records.rank_state(r) for r in range(world.size)]
    report.stop_on_wrong_results(control, [p for p in (
        records.problem(on.allgather(record), expected, "on"),
        records.problem(off.allgather(record), expected, "off")) if p])
    cells = [timing.Cell(CASE, "off", lambda: off.allgather(record)),
             timing.Cell(CASE, "on", lambda: on.allgather(record))]
    results = timing.measure(control, cells, settings)
    if results is None:
        return 0
    by_method = {r["method"]: r["rounds_us"] for r in results}
    paired = statistics.median(a / b for a, b in zip(by_method["on"], by_method["off"]))
    doc = report.document("recorder_cost", "typedcoll flight-recorder cost", world.size,
                          settings.as_dict(), results, RATIOS, report.versions(on),
                          paired_ratio=paired)
    print(report.table(doc, ("off", "on")))
    print(f"paired rounds: on/off {paired:.3f} (goal <= 1.05 "
          f"{'ok' if paired <= 1.05 else 'MISSED'})")
    report.write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
