"""Every typed collective against mpi4py's pickle-based one, interleaved in one run.

Run: ``mpiexec -n 2 python bench/collectives.py`` (``--rounds``/``--iters`` to taste).

Pairs, each on the core issue's 3-field RankState record (a dict for pickle) or an int:
  allgather   TypedComm.allgather(state)                  comm.allgather(dict)
  gather      TypedComm.gather(state, root=0)             comm.gather(dict, root=0)
  bcast       TypedComm.bcast(state or None, schema=...)  comm.bcast(dict or None)
  allreduce   TypedComm.allreduce(int)                    comm.allreduce(int)
  barrier     TypedComm.barrier()                         comm.Barrier() (the raw floor: no pickle)
Each figure is the median over rounds of one round's mean per call, slowest rank; the ratio is
typed / pickle (below 1: typed is faster), with the envelope checked on every rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import msgspec
from mpi4py import MPI

import typedcoll as tc
from _record import RankState  # bench/ is on sys.path when a script runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--json", help="also write the figures to this file (rank 0)")
    args = parser.parse_args(argv)

    world = MPI.COMM_WORLD
    raw = world.Dup()
    typed = tc.TypedComm(world)
    rank = world.rank
    state = RankState(rank, 3 + rank, 17 * rank)
    as_dict = msgspec.structs.asdict(state)
    pairs = {
        "allgather": (lambda: typed.allgather(state), lambda: raw.allgather(as_dict)),
        "gather": (lambda: typed.gather(state, root=0), lambda: raw.gather(as_dict, root=0)),
        "bcast": (lambda: typed.bcast(state if rank == 0 else None, schema=RankState),
                  lambda: raw.bcast(as_dict if rank == 0 else None)),
        "allreduce": (lambda: typed.allreduce(rank), lambda: raw.allreduce(rank)),
        "barrier": (typed.barrier, raw.Barrier),
    }
    # Same answers first: a benchmark of a wrong result is worthless.
    gathered = raw.gather(as_dict)
    assert typed.gather(state) == (None if rank else [RankState(**d) for d in gathered])
    assert typed.bcast(state if rank == 0 else None, schema=RankState) == RankState(
        **raw.bcast(as_dict if rank == 0 else None))
    assert typed.allreduce(rank) == raw.allreduce(rank)

    samples = {(name, side): [] for name in pairs for side in ("typed", "pickle")}
    for _ in range(args.rounds):
        for name, fns in pairs.items():
            for side, fn in zip(("typed", "pickle"), fns):
                for _ in range(args.iters // 5):
                    fn()
                raw.Barrier()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                samples[name, side].append((time.perf_counter() - t0) / args.iters * 1e6)
    medians = {key: statistics.median(v) for key, v in samples.items()}
    slowest = {key: max(m[key] for m in raw.allgather(medians)) for key in medians}
    if rank == 0:
        print(f"# typedcoll collectives: {world.size} ranks, "
              f"{MPI.Get_library_version().splitlines()[0].strip()}; {args.rounds} interleaved "
              f"rounds x {args.iters} calls; median of round means, slowest rank; us")
        print(f"{'collective':<10} {'typed':>8} {'pickle':>8} {'typed/pickle':>13}")
        rows = {}
        for name in pairs:
            t, pk = slowest[name, "typed"], slowest[name, "pickle"]
            rows[name] = {"typed_us": t, "pickle_us": pk, "ratio": t / pk}
            print(f"{name:<10} {t:8.2f} {pk:8.2f} {t / pk:13.2f}")
        print("(barrier: pickle column is the raw comm.Barrier)")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"ranks": world.size, "rounds": args.rounds, "iters": args.iters,
                           "collectives": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
