"""Flight-recorder cost: a typed allgather of a 3-field Struct with the recorder on and off.

Run: ``mpiexec -n 2 python bench/recorder_cost.py`` (``--rounds``/``--iters`` to taste).

Two TypedComms over the same world, identical but for the recorder: ``on`` keeps the default
ring buffer (``TYPEDCOLL_TRACE_BUFFER`` unset: 2000 entries), ``off`` has it removed, which is
what ``TYPEDCOLL_TRACE_BUFFER=0`` does at creation. Rounds are interleaved so machine noise hits
both alike; the figure is the median over rounds of each round's mean per call, on the slowest
rank. Target (issue 5): recording costs <= 5% of the typed allgather.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import msgspec
from mpi4py import MPI

import typedcoll as tc
from _record import RankState  # bench/ is on sys.path when a script runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process time, steadier on a shared, oversubscribed machine")
    args = parser.parse_args(argv)

    world = MPI.COMM_WORLD
    on = tc.TypedComm(world)
    off = tc.TypedComm(world)
    off._p.recorder = None  # what TYPEDCOLL_TRACE_BUFFER=0 leaves at creation
    if on._p.recorder is None:
        raise SystemExit("expected the recorder on by default: unset TYPEDCOLL_TRACE_BUFFER")
    record = RankState(world.rank, 3 + world.rank, 17 * world.rank)
    methods = {"off": lambda: off.allgather(record), "on": lambda: on.allgather(record)}
    assert on.allgather(record) == off.allgather(record)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    samples = {name: [] for name in methods}
    for i in range(args.rounds):
        # Alternate which goes first, so neither always runs on a freshly warmed cache.
        order = list(methods.items()) if i % 2 == 0 else list(methods.items())[::-1]
        for name, fn in order:
            for _ in range(args.warmup):
                fn()
            world.Barrier()
            t0 = clock()
            for _ in range(args.iters):
                fn()
            samples[name].append((clock() - t0) / args.iters * 1e6)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    worst = {name: max(world.allgather(m)) for name, m in medians.items()}
    # Paired per round too: the ratio of each round's two means, less sensitive to drift.
    ratios = [a / b for a, b in zip(samples["on"], samples["off"])]
    paired = max(world.allgather(statistics.median(ratios)))
    if world.rank == 0:
        print(f"# typedcoll recorder cost: {world.size} ranks, "
              f"{MPI.Get_library_version().splitlines()[0].strip()}, python "
              f"{platform.python_version()}, msgspec {msgspec.__version__}")
        print(f"# {args.rounds} interleaved rounds x {args.iters} calls, {args.clock} clock; "
              f"median of round means, slowest rank")
        for name, us in worst.items():
            print(f"recorder {name:<4} {us:8.2f} us/call")
        cost = worst["on"] / worst["off"] - 1
        print(f"recorder cost  = {cost * 100:+.1f}% (medians), {(paired - 1) * 100:+.1f}% "
              f"(paired rounds)  (target <= 5%)  {'OK' if max(cost, paired - 1) <= 0.05 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
