"""The scaling model: latency steps and bytes per collective, typedcoll against MPI, N = 2 to
16,384.

Costs follow the usual latency-bandwidth model of collective algorithms: a collective costs
``steps`` message latencies on its critical path (a linear rooted collective: one per peer at
the root) plus ``bytes`` through its busiest rank's link (the larger of what it sends and
receives). With ``r = ceil(log2 N)``, payload ``L`` per rank, slot ``S``:

typedcoll (``core/wire.py``, ``transports/mpi.py``): every call starts with one exchange, r
rounds of point-to-point messages at distance 2**k, each message an 8-byte prefix plus
  GATHER   Bruck's allgather of the slots (no agreement block: every rank folds it from the
           gathered headers): r steps, r*8 + (N-1)*S bytes
  REDUCE   the 128-byte agreement block and the OR of the payload regions (a bcast root's
           inline payload, else nothing): r steps, r*(136 + inline) bytes
then, where the op's payload moves on MPI's own rooted collective, that collective:
  allgather, allreduce, flush, split   GATHER (+ Allgatherv of what overflows its slot)
  gather, reduce                       GATHER up to 16 ranks; beyond, REDUCE + Gather of 8-byte
                                       lengths (binomial) + Gatherv (linear: N-1 steps)
  bcast                                REDUCE with the payload inline (+ Bcast if it overflows)
  barrier, dup, free                   REDUCE
  scatter                              REDUCE with the root's packed parts (4 + N*(4 + L)
                                       bytes) inline; if they overflow, REDUCE + Scatter of
                                       lengths + Scatterv (linear)
  alltoall                             up to 16 ranks GATHER with each rank's packed parts
                                       inline; if they overflow, and beyond 16 ranks, REDUCE +
                                       Alltoall of counts (Bruck) + Alltoallv (N-1)

MPI's own algorithms for the same payload (short messages; long ones where they apply):
  allgather recursive doubling / Bruck (r, (N-1)L); gather and scatter binomial (r, (N-1)L at
  the root); bcast binomial (r, rL at the root; long: scatter + ring allgather); allreduce
  recursive doubling (r, rL; long: Rabenseifner, 2r, 2L(N-1)/N); reduce binomial (r, rL;
  long: Rabenseifner); barrier dissemination (r, 0); alltoall Bruck (r, L*N/2*r; long:
  pairwise, N-1, (N-1)L).
mpi4py's pickle collectives, the measured peers: counts first, then the data (allgather,
gather, bcast, scatter, alltoall: two collectives); reduce a binomial tree of point-to-point
pairs (count, data); allreduce that tree and then two Bcasts; barrier is ``comm.Barrier``.

Time: ``t = c + alpha * steps + beta * bytes``, with alpha fitted to the measured points of
every op (c per op and side absorbs each side's own per-call work) and beta from the peers
run's 1 MiB floor where one is given.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional

OPS = ("allgather", "gather", "bcast", "allreduce", "reduce", "barrier", "scatter", "alltoall")
NS = [2 ** k for k in range(1, 15)]  # 2 ... 16,384
LONG = 12 * 1024  # MPICH's switch to its long-message bcast; 2 KiB for allreduce and alltoall
DEFAULT_BETA_NS = 0.3  # ns per byte: shared-memory MPI on the device host, 1 MiB allgather


class Cost(NamedTuple):
    steps: float
    bytes: float

    def __add__(self, other: "Cost") -> "Cost":  # type: ignore[override]
        return Cost(self.steps + other.steps, self.bytes + other.bytes)


def rounds(n: int) -> int:
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


class Wire:
    """typedcoll's constants, read from the library so the model follows it."""

    def __init__(self) -> None:
        from typedcoll.core import ops, wire
        from typedcoll.transports import mpi

        self.header = wire.HEADER_SIZE
        self.block = wire.AGREE_SIZE
        self.prefix = mpi.PREFIX
        self.min_slot = wire.MIN_SLOT
        self.max_slot = wire.MAX_SLOT
        self.direct_max = ops.GATHER_DIRECT_MAX

    def slot(self, payload: int) -> int:
        size = self.min_slot
        while size < self.header + payload and size < self.max_slot:
            size *= 2
        return size

    def fits(self, payload: int) -> bool:
        return self.header + payload <= self.slot(payload)


# --- typedcoll ---------------------------------------------------------------------------------
def gather_exchange(w: Wire, n: int, slot: int) -> Cost:
    r = rounds(n)
    return Cost(r, r * w.prefix + (n - 1) * slot)


def reduce_exchange(w: Wire, n: int, inline: int) -> Cost:
    r = rounds(n)
    return Cost(r, r * (w.prefix + w.block + inline))


def packed(n: int, payload: int) -> int:
    """The size of n parts of ``payload`` bytes packed into one payload (``core/parts.py``)."""
    return 4 + n * (4 + payload)


def linear(n: int, each: float) -> Cost:
    """A linear rooted collective (Gatherv, Scatterv) or a pairwise Alltoallv."""
    return Cost(n - 1, (n - 1) * each)


def typed(w: Wire, op: str, n: int, payload: int) -> Cost:
    slot = w.slot(payload)
    if op in ("allgather", "allreduce"):
        # What overflows its slot: an Allgatherv of the bytes, or MPI's own Allreduce (arrays).
        cost = gather_exchange(w, n, slot)
        return cost if w.fits(payload) else cost + mpi(op, n, payload)
    if op in ("gather", "reduce"):
        if n <= w.direct_max:
            cost = gather_exchange(w, n, slot)
            return cost if w.fits(payload) else cost + linear(n, payload)
        return reduce_exchange(w, n, 0) + mpi("gather", n, 8) + linear(n, payload)
    if op == "bcast":
        if w.fits(payload):
            return reduce_exchange(w, n, payload)
        return reduce_exchange(w, n, 0) + mpi("bcast", n, payload)
    if op == "barrier":
        return reduce_exchange(w, n, 0)
    if op == "scatter":
        if w.fits(packed(n, payload)):
            return reduce_exchange(w, n, packed(n, payload))
        return reduce_exchange(w, n, 0) + mpi("scatter", n, 8) + linear(n, payload)
    if op == "alltoall":
        if n <= w.direct_max and w.fits(packed(n, payload)):
            return gather_exchange(w, n, w.slot(packed(n, payload)))
        return reduce_exchange(w, n, 0) + mpi("alltoall", n, 8) + linear(n, payload)
    raise ValueError(f"expected an op in {OPS}, got {op!r}")


# --- MPI's own algorithms ----------------------------------------------------------------------
def mpi(op: str, n: int, payload: int) -> Cost:
    r, L = rounds(n), payload
    if op == "allgather":
        return Cost(r, (n - 1) * L)
    if op in ("gather", "scatter"):
        return Cost(r, (n - 1) * L)
    if op == "bcast":
        if L < LONG:
            return Cost(r, r * L)
        return Cost(r + n - 1, 2 * L * (n - 1) / n)
    if op in ("allreduce", "reduce"):
        if L <= 2048:
            return Cost(r, r * L)
        return Cost(2 * r, 2 * L * (n - 1) / n)
    if op == "barrier":
        return Cost(r, 0)
    if op == "alltoall":
        if L <= 2048:
            return Cost(r, L * n / 2 * r)
        return linear(n, L)
    raise ValueError(f"expected an op in {OPS}, got {op!r}")


def mpi4py(op: str, n: int, payload: int) -> Cost:
    """What mpi4py's pickle-based collective runs over MPI (see the module docstring)."""
    if op in ("allgather", "bcast"):
        return mpi(op, n, 4) + mpi(op, n, payload)
    if op in ("gather", "scatter"):
        return mpi(op, n, 4) + linear(n, payload)
    if op == "alltoall":
        return mpi("alltoall", n, 4) + linear(n, payload)
    r = rounds(n)
    tree = Cost(2 * r, r * (4 + payload))  # count, then data, at every level
    if op == "reduce":
        return tree
    if op == "allreduce":
        return tree + mpi("bcast", n, 4) + mpi("bcast", n, payload)
    if op == "barrier":
        return mpi("barrier", n, 0)
    raise ValueError(f"expected an op in {OPS}, got {op!r}")


SIDES = {"typed": None, "mpi": mpi, "mpi4py": mpi4py}


def table(payloads: Dict[str, int], ns: List[int] = NS) -> List[Dict[str, Any]]:
    """One row per op, side and N: steps and bytes."""
    w = Wire()
    rows = []
    for op in OPS:
        for n in ns:
            for side in SIDES:
                cost = typed(w, op, n, payloads[op]) if side == "typed" else \
                    SIDES[side](op, n, payloads[op])  # type: ignore[misc]
                rows.append({"op": op, "side": side, "n": n, "steps": cost.steps,
                             "bytes": cost.bytes})
    return rows


# --- time: fitted to measured points -----------------------------------------------------------
def fit(rows: List[Dict[str, Any]], measured: List[Dict[str, Any]],
        beta_ns: Optional[float]) -> Dict[str, Any]:
    """alpha (µs per step) shared by every op, c per (op, side), beta fixed; model_us per row.

    ``measured``: {"op", "side" ("typed" or "mpi4py"), "n", "us"} points.
    """
    import numpy as np

    beta = (beta_ns if beta_ns is not None else DEFAULT_BETA_NS) * 1e-3  # µs per byte
    cost = {(r["op"], r["side"], r["n"]): r for r in rows}
    points = [m for m in measured if (m["op"], m["side"], m["n"]) in cost]
    keys = sorted({(m["op"], m["side"]) for m in points})
    alpha = 0.0
    consts: Dict[Any, float] = {}
    if points:
        # Columns: alpha, then one constant per (op, side); the target is t - beta * bytes.
        a = np.zeros((len(points), 1 + len(keys)))
        b = np.zeros(len(points))
        for i, m in enumerate(points):
            row = cost[(m["op"], m["side"], m["n"])]
            a[i, 0] = row["steps"]
            a[i, 1 + keys.index((m["op"], m["side"]))] = 1.0
            b[i] = m["us"] - beta * row["bytes"]
        solution = np.linalg.lstsq(a, b, rcond=None)[0]
        alpha = float(solution[0])
        if alpha < 0:  # noise can tilt it below zero: no latency term, constants alone
            alpha = 0.0
            solution = np.linalg.lstsq(a[:, 1:], b, rcond=None)[0]
            solution = np.concatenate([[0.0], solution])
        consts = {k: float(solution[1 + j]) for j, k in enumerate(keys)}
    for row in rows:
        c = consts.get((row["op"], row["side"]))
        row["model_us"] = None if c is None else c + alpha * row["steps"] + beta * row["bytes"]
    return {"alpha_us": alpha, "beta_ns": beta * 1e3,
            "constants_us": {f"{op} {side}": c for (op, side), c in consts.items()},
            "points": len(points)}
