"""How every script measures: interleaved rounds, calibrated per cell, slowest-rank medians.

1. Cells. A cell is one method on one case (a collective, a payload): a zero-argument call that
   performs one operation. Scripts check each cell's result against what every rank sent
   before anything is timed: a figure for a wrong answer is worthless.
2. Calibration. Each cell runs twice untimed, then a few timed calls; the slowest rank's time
   per call sets the cell's batch: ``--iters`` calls, fewer where a batch would take longer
   than ``--budget`` seconds, never fewer than one; warm-up a tenth of that (or ``--warmup``).
   The counts are agreed over MPI: counts that differed between ranks would deadlock the
   collectives.
3. Rounds. ``--rounds`` times: every case in turn and, within a case, every method, starting
   one method further each round, so the methods of a case run close together and slow drifts
   of the machine hit them alike. Per cell: warm-up, a barrier, then the batch timed as a whole
   (a timer inside the loop would be a visible part of a floor of a few µs).
4. Summary. A round's figure is the slowest rank's mean per call (a collective is as slow as
   its slowest member); a cell's figure is the median over rounds, with p10 and p90.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

CALIBRATION_CALLS = 3


def add_arguments(parser: argparse.ArgumentParser, *, rounds: int, iters: int,
                  budget: float = 0.05) -> argparse.ArgumentParser:
    """The options every script takes, with the script's own defaults."""
    parser.add_argument("--rounds", type=int, default=rounds,
                        help=f"interleaved rounds (default {rounds})")
    parser.add_argument("--iters", type=int, default=iters,
                        help=f"timed calls per cell and round (default {iters}; slower cells "
                             f"run fewer, see --budget)")
    parser.add_argument("--budget", type=float, default=budget,
                        help=f"most seconds of timed calls per cell and round (default {budget})")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before each batch (default: a tenth of the batch)")
    parser.add_argument("--json", help="write the result document to this file (rank 0)")
    return parser


class Settings:
    """Loop counts, from the common options."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.rounds < 1 or args.iters < 1:
            raise SystemExit(f"expected --rounds and --iters >= 1, got {args.rounds} and "
                             f"{args.iters}")
        self.rounds: int = args.rounds
        self.iters: int = args.iters
        self.budget: float = args.budget
        self.warmup: Optional[int] = args.warmup

    def as_dict(self) -> Dict[str, Any]:
        return {"rounds": self.rounds, "iters": self.iters, "budget_s": self.budget,
                "warmup": self.warmup}


class Cell:
    """One method on one case: its call, its agreed counts, and its per-round seconds per call."""

    def __init__(self, case: str, method: str, call: Callable[[], Any]) -> None:
        self.case = case
        self.method = method
        self.call = call
        self.iters = 0
        self.warmup = 0
        self.samples: List[float] = []


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(rounds_us: Sequence[float]) -> Dict[str, float]:
    return {"median_us": quantile(rounds_us, 0.5), "p10_us": quantile(rounds_us, 0.1),
            "p90_us": quantile(rounds_us, 0.9)}


def _calibrate(comm: Any, cell: Cell, settings: Settings, max_op: Any) -> None:
    cell.call()
    cell.call()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(CALIBRATION_CALLS):
        cell.call()
    per_call = comm.allreduce((time.perf_counter() - t0) / CALIBRATION_CALLS, op=max_op)
    cell.iters = max(1, min(settings.iters, int(settings.budget / max(per_call, 1e-9))))
    cell.warmup = settings.warmup if settings.warmup is not None else \
        max(1, math.ceil(cell.iters / 10))


def _batch(comm: Any, cell: Cell) -> float:
    call = cell.call
    for _ in range(cell.warmup):
        call()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(cell.iters):
        call()
    return (time.perf_counter() - t0) / cell.iters


def measure(comm: Any, cells: List[Cell], settings: Settings) -> Optional[List[Dict[str, Any]]]:
    """Time every cell (see the module docstring); on rank 0 one summary per cell, else None.

    ``comm``: an mpi4py communicator of its own (a ``Dup``) for the barriers and agreements,
    so they never meet a method's messages.
    """
    from mpi4py import MPI

    for cell in cells:
        _calibrate(comm, cell, settings, MPI.MAX)
    cases: Dict[str, List[Cell]] = {}
    for cell in cells:
        cases.setdefault(cell.case, []).append(cell)
    for r in range(settings.rounds):
        for row in cases.values():
            shift = r % len(row)
            for cell in row[shift:] + row[:shift]:
                cell.samples.append(_batch(comm, cell))
    every_rank = comm.gather([c.samples for c in cells], root=0)
    if every_rank is None:
        return None
    out = []
    for i, cell in enumerate(cells):
        rounds_us = [max(rank[i][r] for rank in every_rank) * 1e6 for r in range(settings.rounds)]
        out.append({"case": cell.case, "method": cell.method, "iters": cell.iters,
                    "warmup": cell.warmup, "rounds_us": rounds_us, **summarize(rounds_us)})
    return out
