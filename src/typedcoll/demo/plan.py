"""The seeded fault plan that drives the executor model's divergence.

Every rank builds the same plan from the same seed (numpy's PCG64 is reproducible across
processes), so no plan ever travels between ranks. Per rank and iteration it says: whether the
scheduler produced an empty batch (KV-cache pressure, nothing active), how many KV transfers timed
out, and whether per-rank metrics are on; per iteration, how many new requests arrive. The
engine turns per-rank metrics on for the whole job, so random plans do the same (on every rank
or none); hand-written plans may turn them on rank by rank.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np

LOOPS = ("overlap", "non_overlap", "pipeline")


class FaultPlan:
    """Faults per ``[rank, iteration]`` (numpy arrays) plus the run's loop and serving mode.

    ``empty``: the rank schedules an empty batch; ``timeouts``: KV transfers that time out there
    (disaggregated serving only); ``metrics``: per-rank iteration stats are reported; ``arrivals``
    (per iteration): new requests the router assigns.
    """

    def __init__(self, *, ranks: int, iterations: int, loop: str = "overlap",
                 disaggregated: bool = False, seed: Optional[int] = None,
                 empty: np.ndarray, timeouts: np.ndarray, metrics: np.ndarray,
                 arrivals: np.ndarray) -> None:
        if loop not in LOOPS:
            raise ValueError(f"expected loop in {LOOPS}, got {loop!r}")
        shape = (ranks, iterations)
        for name, arr in (("empty", empty), ("timeouts", timeouts), ("metrics", metrics)):
            if arr.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
        self.ranks = ranks
        self.iterations = iterations
        self.loop = loop
        self.disaggregated = disaggregated
        self.seed = seed
        self.empty = empty
        self.timeouts = timeouts
        self.metrics = metrics
        self.arrivals = arrivals

    @classmethod
    def random(cls, seed: int, ranks: int, iterations: int, *, loop: str = "overlap",
               disaggregated: bool = False, p_empty: float = 0.08, p_timeout: float = 0.05,
               metrics: bool = True, mean_arrivals: float = 0.9) -> "FaultPlan":
        """Independent faults with the given probabilities, reproducible from ``seed``;
        ``metrics``: per-rank metrics on for the whole run."""
        rng = np.random.default_rng(seed)
        shape = (ranks, iterations)
        empty = rng.random(shape) < p_empty
        timeouts = np.where(rng.random(shape) < p_timeout, rng.integers(1, 4, shape), 0)
        arrivals = rng.poisson(mean_arrivals * ranks, iterations)
        return cls(ranks=ranks, iterations=iterations, loop=loop, disaggregated=disaggregated,
                   seed=seed, empty=empty, timeouts=timeouts.astype(np.int64),
                   metrics=np.full(shape, metrics), arrivals=arrivals.astype(np.int64))

    @classmethod
    def scripted(cls, ranks: int, iterations: int, *, loop: str = "overlap",
                 disaggregated: bool = False, empty: Iterable[Tuple[int, int]] = (),
                 timeouts: Iterable[Tuple[int, int, int]] = (),
                 metrics_on: Iterable[Tuple[int, int]] = (), metrics_all: bool = False,
                 arrivals: Optional[Iterable[int]] = None) -> "FaultPlan":
        """A hand-written plan: ``empty`` and ``metrics_on`` as (rank, iteration) pairs,
        ``timeouts`` as (rank, iteration, count); ``arrivals`` defaults to one request per rank
        per iteration (about six active per rank: no rank idles unless the plan says so)."""
        shape = (ranks, iterations)
        e = np.zeros(shape, bool)
        t = np.zeros(shape, np.int64)
        m = np.full(shape, metrics_all)
        for r, i in empty:
            e[r, i] = True
        for r, i, n in timeouts:
            t[r, i] = n
        for r, i in metrics_on:
            m[r, i] = True
        a = np.full(iterations, ranks, np.int64)
        if arrivals is not None:
            a[:] = list(arrivals)
        return cls(ranks=ranks, iterations=iterations, loop=loop, disaggregated=disaggregated,
                   empty=e, timeouts=t, metrics=m, arrivals=a)

    def describe(self) -> str:
        parts = [f"{int(self.empty.sum())} empty batches"]
        if self.disaggregated:
            parts.append(f"{int(self.timeouts.sum())} KV-transfer timeouts")
        if self.metrics.all():
            parts.append("per-rank metrics on")
        elif self.metrics.any():
            parts.append(f"per-rank metrics on in {100 * self.metrics.mean():.0f}% of "
                         f"rank-iterations")
        else:
            parts.append("per-rank metrics off")
        parts.append(f"{int(self.arrivals.sum())} requests arriving")
        return ", ".join(parts)
