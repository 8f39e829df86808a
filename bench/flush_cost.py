"""Control-plane cost per iteration: one collective per channel against one coalesced flush.

Run: ``mpiexec -n 2 python bench/flush_cost.py`` (``--rounds``/``--iters`` to taste).

Both methods move the same typed messages every iteration (each rank's RankState for the router,
its TimeoutFlag, its 26-field IterStats):
  per_channel  three TypedComm.allgather calls, one per channel (the engine's fix: "no new
               collectives; the fix still costs one collective per drained channel")
  flush        three SymmetricFlush.post calls and one flush collective
Interleaved round by round so machine noise hits both alike; the table shows the median over
rounds of each round's mean per iteration, on the slowest rank. Target: flush <= 0.5x per_channel.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import msgspec
from mpi4py import MPI

import typedcoll as tc
from typedcoll.executor._cost import measure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--json", help="also write the figures to this file (rank 0)")
    args = parser.parse_args(argv)

    world = MPI.COMM_WORLD
    comm = tc.TypedComm(world, name="bench")
    figures = measure(comm, rounds=args.rounds, iters=args.iters, warmup=args.warmup)
    if world.rank == 0:
        print(f"# typedcoll flush cost: {world.size} ranks, "
              f"{MPI.Get_library_version().splitlines()[0].strip()}, mpi4py {MPI.Get_version()} "
              f"/ python {platform.python_version()} / msgspec {msgspec.__version__} / "
              f"{platform.machine()} {MPI.Get_processor_name()}")
        print(f"# {args.rounds} interleaved rounds x {args.iters} iterations; median of round "
              f"means, slowest rank")
        print(f"{'method':<12} {'collectives':>11} {'us/iter':>9}")
        print(f"{'per_channel':<12} {figures['per_channel_collectives']:>11} "
              f"{figures['per_channel_us']:9.2f}")
        print(f"{'flush':<12} {figures['flush_collectives']:>11} {figures['flush_us']:9.2f}")
        ratio = figures["ratio"]
        print(f"flush / per_channel = {ratio:.2f}  (target <= 0.5)  "
              f"{'OK' if ratio <= 0.5 else 'MISSED'}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"ranks": world.size, **figures, "rounds": args.rounds,
                           "iters": args.iters}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
