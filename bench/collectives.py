"""Every typed collective against mpi4py's pickle-based one, interleaved in one run.

Run: ``mpiexec -n 2 python bench/collectives.py [--rounds R] [--iters I] [--json F]``
(Open MPI: ``mpirun --oversubscribe --bind-to core -n N ...``).

Pairs, on the 3-field ``RankState`` record (a dict for pickle) or an int; root 0:
  allgather   TypedComm.allgather(state)                   comm.allgather(dict)
  gather      TypedComm.gather(state)                      comm.gather(dict)
  bcast       TypedComm.bcast(state or None, schema=...)   comm.bcast(dict or None)
  allreduce   TypedComm.allreduce(int)                     comm.allreduce(int)
  reduce      TypedComm.reduce(int)                        comm.reduce(int)
  barrier     TypedComm.barrier()                          comm.Barrier() (MPI's own, no pickle)
  scatter     TypedComm.scatter(states or None, schema=...)  comm.scatter(dicts or None)
  alltoall    TypedComm.alltoall(states)                   comm.alltoall(dicts)
Column ``mpi4py`` is the peer; ratio typed/mpi4py below 1 means typed is faster. Goals:
bcast <= 1.2, barrier <= 1.3, every other collective ahead of pickle (<= 1.0).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgspec
from mpi4py import MPI

import typedcoll as tc
from harness import records, report, timing

RankState = records.RankState
METHODS = ("typed", "mpi4py")
GOALS = {"bcast": 1.2, "barrier": 1.3}
CASES = ("allgather", "gather", "bcast", "allreduce", "reduce", "barrier", "scatter", "alltoall")
RATIOS = [report.Ratio(c, "typed", "mpi4py", ("<=", GOALS.get(c, 1.0))) for c in CASES]


def _state(rank: int, dest: int = 0) -> RankState:
    return RankState(rank, 3 + rank, 17 * rank + dest)


def pairs(typed: tc.TypedComm, peer: Any) -> Dict[str, Tuple[Callable[[], Any],
                                                            Callable[[], Any],
                                                            Callable[[Any, Any], Optional[str]]]]:
    """case -> (typed call, peer call, check of (typed result, peer result))."""
    rank, size = typed.rank, typed.size
    root = rank == 0
    state = _state(rank)
    as_dict = msgspec.structs.asdict(state)
    every = [_state(r) for r in range(size)]
    to_each = [_state(rank, d) for d in range(size)]
    to_each_dicts = [msgspec.structs.asdict(s) for s in to_each]
    from_each = [_state(r, rank) for r in range(size)]
    total = size * (size - 1) // 2

    def states(got: Any) -> Any:
        return None if got is None else [RankState(**d) for d in got]

    def expect(want_typed: Any, want_peer: Any) -> Callable[[Any, Any], Optional[str]]:
        def check(t: Any, p: Any) -> Optional[str]:
            if t == want_typed and p == want_peer:
                return None
            return f"expected {want_typed!r:.80} and {want_peer!r:.80}, got {t!r:.80}, {p!r:.80}"
        return check

    return {
        "allgather": (lambda: typed.allgather(state), lambda: states(peer.allgather(as_dict)),
                      expect(every, every)),
        "gather": (lambda: typed.gather(state), lambda: states(peer.gather(as_dict)),
                   expect(every if root else None, every if root else None)),
        "bcast": (lambda: typed.bcast(state if root else None, schema=RankState),
                  lambda: RankState(**peer.bcast(as_dict if root else None)),
                  expect(every[0], every[0])),
        "allreduce": (lambda: typed.allreduce(rank), lambda: peer.allreduce(rank),
                      expect(total, total)),
        "reduce": (lambda: typed.reduce(rank), lambda: peer.reduce(rank),
                   expect(total if root else None, total if root else None)),
        "barrier": (typed.barrier, peer.Barrier, expect(None, None)),
        "scatter": (lambda: typed.scatter(to_each if root else None, schema=RankState),
                    lambda: RankState(**peer.scatter(to_each_dicts if root else None)),
                    expect(_state(0, rank), _state(0, rank))),
        "alltoall": (lambda: typed.alltoall(to_each), lambda: states(peer.alltoall(to_each_dicts)),
                     expect(from_each, from_each)),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=15, iters=1000).parse_args(argv)
    settings = timing.Settings(args)
    world = MPI.COMM_WORLD
    control, peer = world.Dup(), world.Dup()
    typed = tc.TypedComm(world)
    table = pairs(typed, peer)

    problems: List[str] = []
    for case, (typed_call, peer_call, check) in table.items():
        problem = check(typed_call(), peer_call())
        if problem:
            problems.append(f"{case}: {problem}")
    report.stop_on_wrong_results(control, problems)

    cells = [timing.Cell(case, method, call) for case, (typed_call, peer_call, _) in table.items()
             for method, call in zip(METHODS, (typed_call, peer_call))]
    results = timing.measure(control, cells, settings)
    if results is None:
        return 0
    doc = report.document("collectives", "typedcoll collectives against mpi4py", world.size,
                          settings.as_dict(), results, RATIOS, report.versions(typed))
    doc["notes"].append("mpi4py column: pickle-based lowercase collectives; for barrier, "
                        "comm.Barrier")
    print(report.table(doc, METHODS, "collective"))
    report.write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
