"""Control-plane cost per iteration: one collective per channel against one coalesced flush.

Run: ``mpiexec -n 2 python bench/flush_cost.py`` (``--rounds``/``--iters`` to taste;
``TYPEDCOLL_PURE_PYTHON=1`` measures the Python paths alone).

Every method moves one iteration's control plane (each rank's state for the router, its
timeouts, its 26-key iteration stats; ``typedcoll.demo.cost`` builds the messages):
  per_channel_pickle  the engine's fix as shipped: three mpi4py comm.allgather(obj) calls of
                      pickled objects, one per drained channel (the timeouts as the engine's
                      bool vote, the stats as its dict)
  per_channel         three TypedComm.allgather calls, one per channel: the coalescing alone
  flush               three SymmetricFlush.post calls and one flush collective
Interleaved round by round so machine noise hits all alike; the table shows the median over
rounds of each round's mean per iteration, on the slowest rank. Target: flush <= 0.5x the
per-channel fix; both ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import msgspec
from mpi4py import MPI

import typedcoll as tc
from typedcoll.demo.cost import measure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--json", help="also write the figures to this file (rank 0)")
    args = parser.parse_args(argv)

    world = MPI.COMM_WORLD
    comm = tc.TypedComm(world, name="bench")
    figures = measure(comm, rounds=args.rounds, iters=args.iters, warmup=args.warmup,
                      pickle_comm=world.Dup())
    if world.rank == 0:
        print(f"# typedcoll flush cost: {world.size} ranks, "
              f"{MPI.Get_library_version().splitlines()[0].strip()}, mpi4py {MPI.Get_version()} "
              f"/ python {platform.python_version()} / msgspec {msgspec.__version__} / "
              f"{platform.machine()} {MPI.Get_processor_name()}")
        print(f"# {args.rounds} interleaved rounds x {args.iters} iterations; median of round "
              f"means, slowest rank")
        print(f"{'method':<19} {'collectives':>11} {'us/iter':>9}")
        for name in ("per_channel_pickle", "per_channel", "flush"):
            print(f"{name:<19} {figures[name.split('_pickle')[0] + '_collectives']:>11} "
                  f"{figures[name + '_us']:9.2f}")
        for label, key in (("per_channel_pickle", "ratio_pickle"), ("per_channel", "ratio")):
            ratio = figures[key]
            print(f"flush / {label:<19} = {ratio:.2f}  (target <= 0.5)  "
                  f"{'OK' if ratio <= 0.5 else 'MISSED'}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"ranks": world.size, **figures, "rounds": args.rounds,
                           "iters": args.iters}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
