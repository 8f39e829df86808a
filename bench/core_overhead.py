"""Core overhead check: a checked typed allgather of a 3-field Struct against its floor and today's path.

Run: ``mpiexec -n 2 python bench/core_overhead.py`` (add ``--rounds``/``--iters`` to taste).

Three methods, interleaved round by round so machine noise hits them alike; the table shows the
median over rounds of each round's mean per call, and the two ratios the core issue targets:
  raw       comm.Allgather of a 64-byte numpy buffer (the floor)
  pickle    mpi4py's unchecked comm.allgather of the same record as a dict (what executors use)
  typed     typedcoll TypedComm.allgather of the RankState Struct (checked envelope)
Targets: typed <= 1.5x raw, and pickle >= 1.5x typed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from _record import RankState  # bench/ is on sys.path when a script runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--json", help="also write the figures to this file (rank 0)")
    args = parser.parse_args(argv)

    world = MPI.COMM_WORLD
    raw_comm = world.Dup()
    typed = tc.TypedComm(world)
    rank = world.rank
    send = np.zeros(64, np.uint8)
    recv = np.empty(64 * world.size, np.uint8)
    record = RankState(rank, 3 + rank, 17 * rank)
    as_dict = {"rank": rank, "num_active_requests": 3 + rank, "num_active_tokens": 17 * rank}

    methods = {
        "raw": lambda: raw_comm.Allgather(send, recv),
        "pickle": lambda: raw_comm.allgather(as_dict),
        "typed": lambda: typed.allgather(record),
    }
    # Same answer first: a benchmark of a wrong result is worthless.
    assert typed.allgather(record) == [RankState(**d) for d in raw_comm.allgather(as_dict)]

    samples = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            for _ in range(args.warmup):
                fn()
            raw_comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            samples[name].append((time.perf_counter() - t0) / args.iters * 1e6)
    # Every rank's medians: the slowest rank is what a collective costs.
    medians = {name: statistics.median(v) for name, v in samples.items()}
    worst = {name: max(world.allgather(m)) for name, m in medians.items()}
    if rank == 0:
        print(f"# typedcoll core overhead: {world.size} ranks, {MPI.Get_library_version().splitlines()[0].strip()}, "
              f"mpi4py {MPI.Get_version()} / python {platform.python_version()} / msgspec {msgspec.__version__} / "
              f"{platform.machine()} {MPI.Get_processor_name()}")
        print(f"# {args.rounds} interleaved rounds x {args.iters} calls; median of round means, slowest rank")
        print(f"{'method':<8} {'us/call':>9} {'x raw':>7}")
        for name, us in worst.items():
            print(f"{name:<8} {us:9.2f} {us / worst['raw']:7.2f}")
        typed_vs_raw = worst["typed"] / worst["raw"]
        pickle_vs_typed = worst["pickle"] / worst["typed"]
        print(f"typed / raw    = {typed_vs_raw:.2f}  (target <= 1.5)  {'OK' if typed_vs_raw <= 1.5 else 'MISSED'}")
        print(f"pickle / typed = {pickle_vs_typed:.2f}  (target >= 1.5)  {'OK' if pickle_vs_typed >= 1.5 else 'MISSED'}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"ranks": world.size, "us_per_call": worst, "typed_vs_raw": typed_vs_raw,
                           "pickle_vs_typed": pickle_vs_typed, "rounds": args.rounds,
                           "iters": args.iters}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
