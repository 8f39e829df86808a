"""SPMD: every collective returns what mpi4py's own returns, at any world size, every root.

Run by tests/test_core_mpi.py at 1, 2 and 4 ranks, with and without a timeout (the C fast path
runs the exchange with and without a deadline), and with TYPEDCOLL_PURE_PYTHON=1 in CI's second
leg. Payloads range from empty to past the largest slot, so the second phase runs too.
"""

import math
import sys
from typing import Optional

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from typedcoll.core.verdict import numbering
from spmd.harness import WORLD, Checker, slot_size


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int


class Item(msgspec.Struct, frozen=True, kw_only=True):
    rank: int
    tags: list
    nested: Optional[RankState] = None


class WithArray(msgspec.Struct):
    rank: int
    data: np.ndarray


chk = Checker("core_ops")
TIMEOUT = float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "none" else None
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT)
rank, size = comm.rank, comm.size
raw = WORLD.Dup()
chk.eq("rank and size", (comm.rank, comm.size), (WORLD.Get_rank(), WORLD.Get_size()))
chk.eq("name", comm.name, "COMM_WORLD")
chk.eq("fresh seq", comm.seq, 0)

# A shared table of heterogeneous messages: (label, schema, value of rank r); schema None means
# the default, type(value).
CASES = [
    ("int", None, lambda r: r),
    ("float", None, lambda r: r * 1.5 - 0.25),
    ("int64 min", None, lambda r: -2 ** 63 + r),
    ("uint64 max", None, lambda r: 2 ** 64 - 1 - r),
    ("str", None, lambda r: "é" * r),
    ("bytes past the slot", None, lambda r: bytes([r]) * (3000 + 500 * r)),
    ("list past the largest slot", None, lambda r: list(range(2000 + r))),
    ("dict", None, lambda r: {"rank": r, "ok": r % 2 == 0}),
    ("struct", None, lambda r: RankState(r, r + 1, r + 2)),
    ("optional none", Optional[RankState], lambda r: None if r % 2 else RankState(r, 0, 0)),
    ("nested", None, lambda r: Item(rank=r, tags=["a"] * r, nested=RankState(r, 1, 2))),
    ("array", np.ndarray, lambda r: np.arange(5 * r, dtype=np.float32)),  # shapes differ
    ("big array", np.ndarray, lambda r: np.full(20000, r, dtype=np.int64)),
    ("arrays of one shape", None, lambda r: (np.arange(6, dtype=">i2") + r).reshape(2, 3)),
    ("struct with array", None, lambda r: WithArray(r, np.arange(r))),
]


def same(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b) and a.dtype == b.dtype
    if isinstance(a, WithArray) and isinstance(b, WithArray):
        return a.rank == b.rank and np.array_equal(a.data, b.data)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def check(label, got, expected):
    if not same(got, expected):
        raise AssertionError(f"rank {rank}: {label}:\n  got      {got!r}\n  expected {expected!r}")
    chk.count += 1


for label, schema, make in CASES:
    mine = make(rank)
    check(f"allgather {label}", comm.allgather(mine, schema=schema), raw.allgather(mine))
    for root in range(size):
        check(f"gather {label} root {root}", comm.gather(mine, root, schema=schema),
              raw.gather(mine, root=root))
        got = comm.bcast(mine if rank == root else None, root, schema=schema)
        check(f"bcast {label} root {root}", got, raw.bcast(mine if rank == root else None, root))
    parts = [make(r) for r in range(size)]
    check(f"alltoall {label}", comm.alltoall(parts, schema=schema), raw.alltoall(parts))
    for root in range(size):
        check(f"scatter {label} root {root}",
              comm.scatter(parts if rank == root else None, root, schema=schema),
              raw.scatter(parts if rank == root else None, root=root))

# Arrays of one dtype and shape, inline and past the slot, each result kept alive across the
# later calls (phase 2's receive buffer is reused only once no result refers to it). Where the
# C path is loaded and no timeout is set, it serves every one of them, phase 2 included.
from typedcoll.core import fast  # noqa: E402
from typedcoll.testing import observe  # noqa: E402

served = []
original_allgather = fast.allgather


with comm.dup() as fresh:
    fast.allgather = observe(original_allgather,
                             lambda _, out, *args: served.append(out.__class__ is list))
    try:
        kept = [(k, n, fresh.allgather(np.full(n, 10 * k + rank, dtype=np.int64)))
                for k in range(4) for n in (3, 20000)]
    finally:
        fast.allgather = original_allgather
for k, n, rows in kept:
    check(f"kept arrays {k} of {n}", rows,
          [np.full(n, 10 * k + r, dtype=np.int64) for r in range(size)])
chk.eq("the C path serves arrays of one dtype and shape",
       all(served) or not fast.ENABLED or TIMEOUT is not None, True)

# Receivers that name no schema learn the root's class from the envelope.
for label, value in [("struct", RankState(7, 8, 9)), ("dict", {"k": [1, 2]}),
                     ("array", np.arange(3.0)), ("none", None)]:
    check(f"bcast without schema: {label}",
          comm.bcast(value if rank == 0 else None, 0), value)
    check(f"scatter without schema: {label}",
          comm.scatter([value] * size if rank == 0 else None, 0), value)

# After a site's first call they guess the root's class (one exchange, no search by name), and
# follow a root that changes class there: no false alarm, the root's type on every rank.
for k, value in enumerate([RankState(1, 2, 3)] * 3 + [{"k": 1}, RankState(4, 5, 6), None]):
    got = comm.bcast(value if rank == 0 else None, 0)
    check(f"guessed bcast {k}", (got, type(got)), (value, type(value)))
# A guesser whose peer is elsewhere: the same DesyncError on every rank, nobody left waiting.
if size > 1:
    for k in range(2):
        comm.bcast(RankState(k, 0, 0) if rank == 0 else None, 0, name="guessed")
    with chk.expect(tc.DesyncError, "a guesser meets a barrier") as err:
        comm.barrier() if rank == size - 1 else comm.bcast(
            RankState(0, 0, 0) if rank == 0 else None, 0, name="guessed")
    chk.same("a guesser meets a barrier: one message", str(err.error))
    chk.true("a guesser meets a barrier: both named", "barrier" in str(err.error)
             and "bcast" in str(err.error))

OPS = {"sum": MPI.SUM, "prod": MPI.PROD, "max": MPI.MAX, "min": MPI.MIN, "land": MPI.LAND,
       "lor": MPI.LOR, "lxor": MPI.LXOR, "band": MPI.BAND, "bor": MPI.BOR, "bxor": MPI.BXOR}
# The reference, independent of typedcoll: Python's operators on numbers, numpy's on arrays;
# logical ops give bools (mpi4py's own pickle path cannot apply them to arrays at all).
PY = {"sum": lambda a, b: a + b, "prod": lambda a, b: a * b, "max": max, "min": min,
      "land": lambda a, b: bool(a) and bool(b), "lor": lambda a, b: bool(a) or bool(b),
      "lxor": lambda a, b: bool(a) != bool(b), "band": lambda a, b: a & b,
      "bor": lambda a, b: a | b, "bxor": lambda a, b: a ^ b}
NP = {"sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum,
      "land": np.logical_and, "lor": np.logical_or, "lxor": np.logical_xor,
      "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}


def reference(values, name):
    if isinstance(values[0], np.ndarray):
        out = NP[name].reduce(np.stack(values))
        return out.astype(values[0].dtype) if name not in ("land", "lor", "lxor") else out
    acc = values[0]
    for v in values[1:]:
        acc = PY[name](acc, v)
    if name in ("land", "lor", "lxor"):
        acc = bool(acc)
    return type(values[0])(acc) if isinstance(values[0], np.generic) else acc


for name, mpi_op in OPS.items():
    for label, value in [("int", rank + 3), ("array", np.arange(4, dtype=np.int64) + rank),
                         ("big array", np.full(3000, rank + 1, dtype=np.int32)),
                         ("numpy scalar", np.int32(rank + 2))]:
        expected = reference(raw.allgather(value), name)
        if isinstance(value, np.generic) and name in ("land", "lor", "lxor"):
            expected = np.bool_(expected)
        check(f"allreduce {name} {label}", comm.allreduce(value, op=name), expected)
        check(f"allreduce MPI.Op {name} {label}", comm.allreduce(value, op=mpi_op), expected)
        for root in range(size):
            got = comm.reduce(value, name, root)
            check(f"reduce {name} {label} root {root}", got, expected if rank == root else None)
    if name in ("sum", "prod", "max", "min"):
        expected = raw.allreduce(rank * 0.5, op=mpi_op)
        check(f"allreduce {name} float", comm.allreduce(rank * 0.5, op=name), expected)
        for root in range(size):
            check(f"reduce {name} float root {root}", comm.reduce(rank * 0.5, name, root),
                  expected if rank == root else None)
check("reduce_scatter", comm.reduce_scatter([rank * 10 + j for j in range(size)]),
      sum(r * 10 + rank for r in range(size)))
check("nan max", math.isnan(comm.allreduce(math.nan if rank == size - 1 else 1.0, op="max")),
      True)

comm.barrier()
comm.barrier(step=3, name="end of phase")
chk.same("slot size agrees", slot_size(comm))

# split and dup: new communicators with their own sequence.
sub = comm.split(rank % 2, key=-rank)
members = [r for r in range(size) if r % 2 == rank % 2][::-1]
check("split members, ordered by key", sub.allgather(rank), members)
chk.eq("split name", sub.name, f"COMM_WORLD.split({rank % 2})")
chk.eq("split of None", comm.split(None), None)
# Its ranks are not the job's: every message says how they map, so the ranks it names can be found.
here = "rank 0 here is world rank" if len(members) == 1 else \
    f"ranks 0-{len(members) - 1} here are world ranks"
numbered = "" if members == list(range(len(members))) else \
    f" ({here} {','.join(map(str, members))})"
chk.eq("split numbering", numbering(sub._p), numbered)
if sub.size > 1:
    with chk.expect(tc.DesyncError, "desync on a split") as err:
        sub.allgather(1 if sub.rank == 0 else "one")
    chk.eq("desync on a split names the world ranks", str(err.error).split(" diverged")[0],
           f"collective #1 on COMM_WORLD.split({rank % 2}){numbered}")
with comm.dup() as twin:
    check("dup", twin.allgather(rank), list(range(size)))
    chk.eq("dup timeout", twin.timeout, TIMEOUT)
    chk.eq("dup name", twin.name, "COMM_WORLD.dup")
# A name= names the call and the child it makes: an engine's tp and dp splits of one color are
# two names, in every message about them.
tp = comm.split(rank // 2, name="tp")
dp = comm.split(rank % 2, name="dp")
chk.eq("named split children", (tp.name, dp.name), ("tp", "dp"))
check("named split members", tp.allgather(rank), [r for r in range(size) if r // 2 == rank // 2])
if tp.size > 1:
    with chk.expect(tc.DesyncError, "desync on a named split") as err:
        tp.allgather(1 if tp.rank == 0 else "one")
    chk.eq("a named split's desync names it", str(err.error).split(" diverged")[0],
           f"collective #1 on tp{numbering(tp._p)}")
with comm.dup(name="spare") as spare:
    chk.eq("named dup", spare.name, "spare")
tp.free()
dp.free()
sub.free()

# More call sites than the C path keeps at hand (a table of 512), all in one function, so that
# sites differing only in their offset share table entries: ranks on the C path and on the
# Python steps still name every site alike, each time it comes back after being pushed out.
SITES = 1500
generated = {}
exec(compile("def site_of(c, i):\n" + "".join(
    f"    if i == {i}:\n        return c.allgather({i})\n" for i in range(SITES)),
    "generated_sites.py", "exec"), generated)
site_of = generated["site_of"]
for order in (range(SITES), range(SITES - 1, -1, -1)):
    for i in order:
        if site_of(comm, i) != [i] * size:
            check(f"generated site {i}", site_of(comm, i), [i] * size)
if size > 1:
    with chk.expect(tc.DesyncError, "two generated sites") as err:
        site_of(comm, 7 if rank == 0 else SITES - 1)
    # (site_of picks one of its returned calls: each names its caller too)
    chk.eq("two generated sites are told apart", "generated_sites.py:17 called" in str(err.error)
           and f"generated_sites.py:{2 * SITES + 1} called" in str(err.error), True)

# Two TypedComms over one parent share its private channel and are told apart in messages.
other = tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT)
chk.eq("second name", other.name, "COMM_WORLD#2")
check("second communicator", other.allgather(rank), list(range(size)))
many = [tc.TypedComm(MPI.COMM_WORLD, timeout=TIMEOUT) for _ in range(5000)]
check("5,000 constructions on one parent", many[-1].allgather(rank), list(range(size)))
chk.eq("the last name", many[-1].name, "COMM_WORLD#5002")
chk.done()
