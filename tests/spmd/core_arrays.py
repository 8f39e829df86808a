"""SPMD: random allgathers of numpy arrays return what mpi4py's own returns, on every path.

Run by tests/test_core_mpi.py at 4 ranks, with and without a timeout, and with half the ranks on
the pure-Python steps. Every rank draws the same scenarios from one seed: a dtype (byte orders,
bools, complex), a layout (C, Fortran, strided) and sizes that fit the slot, cross it or differ
by rank (one rank past the slot, the others inline); each rank's values come from its own
generator. Every result must equal mpi4py's pickle ``allgather`` of the same arrays (dtype,
shape and values), and some are kept across later calls and checked again at the end (phase 2's
receive buffers are reused only once no result refers to them). A dtype that differs on one
rank must raise the same DesyncError on every rank, after which the communicator goes on.
"""

import sys

import numpy as np
from mpi4py import MPI

import typedcoll as tc
from spmd.harness import WORLD, Checker, equal

chk = Checker("core_arrays")
TIMEOUT = float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "none" else None
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT)
raw = WORLD.Dup()
rank, size = comm.rank, comm.size

DTYPES = ["<i8", ">i4", "<f4", ">f8", "|b1", "<c8", "<u2", "|i1"]
# Elements: inline in the smallest slot, inline after the slot grows, past the largest slot.
COUNTS = [1, 5, 60, 400, 3000]
shared = np.random.default_rng(20261202)
mine = np.random.default_rng(1000 + rank)


def array(dtype: str, count: int, layout: str) -> np.ndarray:
    values = mine.integers(-100, 100, size=2 * count + 2)
    if layout == "fortran" and count % 2 == 0:
        return np.asfortranarray(values[:count].astype(dtype).reshape(2, count // 2))
    if layout == "strided":
        return values[:2 * count:2].astype(dtype)
    return values[:count].astype(dtype)


kept = []
for i in range(120):
    dtype = DTYPES[shared.integers(len(DTYPES))]
    layout = ["c", "fortran", "strided"][shared.integers(3)]
    shape_kind = shared.integers(4)
    if shape_kind == 0:  # one shape everywhere
        count = int(COUNTS[shared.integers(len(COUNTS))])
    elif shape_kind == 1:  # a shape per rank, inline
        count = 1 + rank * int(shared.integers(1, 8))
    elif shape_kind == 2:  # one rank past the slot, the others inline
        big = int(shared.integers(size))
        count = 3000 if rank == big else 3
    else:  # a shape per rank, every one past the slot
        count = 3000 + rank
    value = array(dtype, count, layout)
    got = comm.allgather(value)
    want = raw.allgather(value)
    chk.eq(f"call {i}: {dtype} {layout} kind {shape_kind}", got, want)
    if shared.random() < 0.3:
        kept.append((i, got, [w.copy() for w in want]))

# A 0-d array of a large void dtype passes the slot with no shape to split by.
void = np.frombuffer(bytes([rank]) * 5000, dtype="V5000").reshape(())
chk.eq("0-d past the slot", comm.allgather(void), raw.allgather(void))

# A dtype that differs on one rank: the same error everywhere, and the communicator goes on.
odd = size - 1
try:
    comm.allgather(np.arange(3000, dtype=np.float32 if rank == odd else np.int64))
    outcome = "returned"
except tc.DesyncError as exc:
    outcome = str(exc)
chk.same("a dtype that differs: one verdict", outcome)
chk.true("a dtype that differs: DesyncError", outcome.startswith("collective #")
         and f"rank {odd}" in outcome)
chk.eq("after the error", comm.allgather(np.arange(3) + rank),
       [np.arange(3) + r for r in range(size)])

for i, got, want in kept:
    chk.true(f"kept result of call {i}", equal(got, want))
chk.done()
