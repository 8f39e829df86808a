"""Which common calls the C fast path serves, and what each costs: every call 520 times at
one site, the last 500 timed and counted (calls that reached the Python steps: ops.run or
ops.finish). A probe, not a harness benchmark: one round, the slowest rank's mean.

Run: mpiexec -n 2 python bench/results/python-steps/paths.py
"""
import time, sys
from typing import Optional, List
import msgspec, numpy as np
from mpi4py import MPI
import typedcoll as tc
from typedcoll.core import ops
class RS(msgspec.Struct):
    rank: int
    load: int
    ready: bool
w = MPI.COMM_WORLD; r = w.rank; n = w.size
c = tc.TypedComm(w)
d = tc.compat.mpi4py(w)
py = [0]
orun, ofin = ops.run, ops.finish
def run(*a, **k): py[0] += 1; return orun(*a, **k)
def fin(*a, **k): py[0] += 1; return ofin(*a, **k)
ops.run = tc.transparent(run); ops.finish = tc.transparent(fin)
rs = RS(r, 1, True)
CASES = {
 "allgather RS": lambda: c.allgather(rs),
 "allgather int": lambda: c.allgather(r),
 "allgather dict": lambda: c.allgather({"rank": r, "ok": True}),
 "allgather Optional": lambda: c.allgather(None if r else rs, schema=Optional[RS]),
 "allgather list[int]": lambda: c.allgather(list(range(10))),
 "allgather str": lambda: c.allgather("abc"),
 "allgather ndarray": lambda: c.allgather(np.arange(4.0)),
 "allgather list[RS]": lambda: c.allgather([rs], schema=List[RS]),
 "bcast RS": lambda: c.bcast(rs if r == 0 else None),
 "bcast RS schema": lambda: c.bcast(rs if r == 0 else None, schema=RS),
 "bcast dict": lambda: c.bcast({"it": 1} if r == 0 else None),
 "bcast int": lambda: c.bcast(5 if r == 0 else None),
 "bcast None": lambda: c.bcast(None),
 "bcast list": lambda: c.bcast([1, 2] if r == 0 else None),
 "bcast ndarray": lambda: c.bcast(np.arange(4.0) if r == 0 else None),
 "gather RS": lambda: c.gather(rs),
 "scatter RS": lambda: c.scatter([rs] * n if r == 0 else None),
 "allreduce int": lambda: c.allreduce(r),
 "allreduce float": lambda: c.allreduce(r + 0.5, op="max"),
 "allreduce np.int64": lambda: c.allreduce(np.int64(r)),
 "allreduce ndarray": lambda: c.allreduce(np.arange(4.0)),
 "reduce int": lambda: c.reduce(r),
 "barrier": lambda: c.barrier(),
 "alltoall ints": lambda: c.alltoall(list(range(n))),
 "dropin allgather dict": lambda: d.allgather({"rank": r}),
 "dropin bcast dict": lambda: d.bcast({"it": 1} if r == 0 else None),
 "dropin bcast RS": lambda: d.bcast(rs if r == 0 else None),
 "dropin allreduce SUM": lambda: d.allreduce(r, op=MPI.SUM),
 "dropin allreduce MAX": lambda: d.allreduce(r, op=MPI.MAX),
 "dropin gather": lambda: d.gather(r),
 "dropin scatter": lambda: d.scatter(list(range(n)) if r == 0 else None),
 "dropin barrier": lambda: d.barrier(),
 "dropin alltoall": lambda: d.alltoall(list(range(n))),
}
for name, f in CASES.items():
    for _ in range(20): f()
    py[0] = 0
    w.Barrier(); t0 = time.perf_counter()
    for _ in range(500): f()
    t = w.allreduce((time.perf_counter() - t0) / 500 * 1e6, op=MPI.MAX)
    k = w.allreduce(py[0], op=MPI.MAX)
    if r == 0: print(f"{name:24s} {t:7.2f} us  python-steps {k}/500", flush=True)
