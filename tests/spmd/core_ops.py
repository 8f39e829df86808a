"""SPMD: every op returns the right result at any world size (issue 3: API, rules 1, 2, 5).

Run by tests/test_core_spmd.py at 1, 2 and 4 ranks.
"""

import functools
import math
import operator
from typing import Optional

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from typedcoll._comm import TypedComm
from typedcoll._mpi import MPITransport
from typedcoll._wire import HEADER_SIZE, MAX_SLOT, MIN_SLOT, SHRINK_WINDOW
from spmd.harness import WORLD, Checker, slot_size


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int


class Item(msgspec.Struct, frozen=True, kw_only=True):
    rank: int
    tags: list[str]
    nested: Optional[RankState] = None


chk = Checker("core_ops")
comm = tc.TypedComm(MPI.COMM_WORLD)
rank, size = comm.rank, comm.size
chk.eq("rank", comm.rank, WORLD.Get_rank())
chk.eq("size", comm.size, WORLD.Get_size())
chk.eq("name", comm.name, "COMM_WORLD")
chk.eq("timeout", comm.timeout, None)
chk.eq("fresh seq", comm.seq, 0)
chk.eq("repr", repr(comm), f"TypedComm(COMM_WORLD, rank {rank} of {size}, seq 0)")


def once(label, fn):
    """Run one typed collective on ``comm``; it must advance seq by exactly one."""
    before = comm.seq
    out = fn()
    chk.eq(f"{label}: seq advances by one", comm.seq, before + 1)
    return out


# A shared table of heterogeneous messages: (schema, value of rank r). schema None means the
# default, type(value).
CASES = [
    ("int", None, lambda r: r),
    ("float", None, lambda r: r * 1.5 - 0.25),
    ("int64 min", None, lambda r: -2 ** 63 + r),
    ("uint64 max", None, lambda r: 2 ** 64 - 1 - r),
    ("bool", None, lambda r: r % 2 == 0),
    ("str", None, lambda r: f"rank-{r}-\u00e9"),
    ("bytes", None, lambda r: bytes([r]) * r),
    ("list", None, lambda r: [r] * r),
    ("dict", None, lambda r: {f"k{r}": r}),
    ("struct", None, lambda r: RankState(r, r + 1, r + 2)),
    ("nested struct", None,
     lambda r: Item(rank=r, tags=["t"] * r, nested=RankState(r, 0, 0) if r % 2 else None)),
    ("optional struct", Optional[RankState], lambda r: None if r % 2 else RankState(r, 3, 17)),
    ("all None", Optional[int], lambda r: None),
    ("NoneType", None, lambda r: None),
    ("list[int]", list[int], lambda r: list(range(r))),
    ("dict[str, int]", dict[str, int], lambda r: {"r": r}),
    ("tuple[int, str]", tuple[int, str], lambda r: (r, str(r))),
    ("ndarray", np.ndarray, lambda r: np.arange(6, dtype=np.float32).reshape(2, 3) + r),
    ("numpy scalar", None, lambda r: np.int16(-r)),
]

for label, schema, make in CASES:
    everyone = [make(r) for r in range(size)]
    got = once(f"allgather {label}", lambda: comm.allgather(make(rank), schema=schema))
    chk.eq(f"allgather {label}", got, everyone)
    for root in range(size):
        got = once(f"gather {label}", lambda: comm.gather(make(rank), root, schema=schema))
        chk.eq(f"gather {label} root {root}", got, everyone if rank == root else None)
    for root in range(size):
        # Non-roots pass None and name the schema: their value is ignored.
        bschema = schema if schema is not None else type(make(root))
        got = once(f"bcast {label}",
                   lambda: comm.bcast(make(rank) if rank == root else None, root,
                                      schema=bschema))
        chk.eq(f"bcast {label} root {root}", got, make(root))

# bcast: a non-root's value is ignored, whatever it is.
got = comm.bcast(RankState(0, 1, 2) if rank == 0 else "ignored", 0, schema=RankState)
chk.eq("bcast ignores non-root values", got, RankState(0, 1, 2))

# --- allreduce ------------------------------------------------------------------------------
REDUCERS = {"sum": operator.add, "max": max, "min": min, "prod": operator.mul}
for op, combine in REDUCERS.items():
    def expect(make):
        return functools.reduce(combine, [make(r) for r in range(size)])

    got = once(f"allreduce {op} int", lambda: comm.allreduce(rank + 1, op=op))
    chk.eq(f"allreduce {op} int", got, expect(lambda r: r + 1))
    got = comm.allreduce(2 ** 40 + rank, op=op)
    chk.eq(f"allreduce {op} big int", got, expect(lambda r: 2 ** 40 + r))
    got = comm.allreduce((rank + 1) * 0.5, op=op)
    chk.eq(f"allreduce {op} float", got, expect(lambda r: (r + 1) * 0.5))
    for dtype in (np.int32, np.int64, np.uint8, np.float32, np.float64, np.complex128):
        if dtype is np.complex128 and op in ("max", "min"):
            continue  # MPI defines no order on complex numbers
        got = comm.allreduce(dtype(rank + 1), op=op)
        chk.eq(f"allreduce {op} {dtype.__name__} scalar", got,
               dtype(expect(lambda r: r + 1)))
    small = lambda r: np.arange(4, dtype=np.int64) + r  # noqa: E731
    got = once(f"allreduce {op} small array", lambda: comm.allreduce(small(rank), op=op))
    chk.eq(f"allreduce {op} small array", got,
           functools.reduce(getattr(np, {"sum": "add", "prod": "multiply", "max": "maximum",
                                         "min": "minimum"}[op]), [small(r) for r in range(size)]))
    # 40 KB: far beyond any slot, so it takes the second phase (a plain Allreduce).
    large = lambda r: (np.arange(5000, dtype=np.float64) % 7) + r  # noqa: E731
    got = once(f"allreduce {op} large array", lambda: comm.allreduce(large(rank), op=op))
    chk.eq(f"allreduce {op} large array", got,
           functools.reduce(getattr(np, {"sum": "add", "prod": "multiply", "max": "maximum",
                                         "min": "minimum"}[op]), [large(r) for r in range(size)]))
    got = comm.allreduce(np.full((2, 3), rank + 1, dtype=np.int16), op=op)
    chk.eq(f"allreduce {op} 2-d int16", got,
           np.full((2, 3), expect(lambda r: r + 1), dtype=np.int16))

chk.eq("allreduce default op is sum", comm.allreduce(1), size)
chk.eq("allreduce int8 wraps like MPI", comm.allreduce(np.int8(100)),
       np.array(100 * size, dtype=np.int64).astype(np.int8)[()])

# --- barrier, step ----------------------------------------------------------------------------
chk.eq("barrier", once("barrier", comm.barrier), None)
for step in (0, 451, 2 ** 63 - 1, -(2 ** 63) + 1, np.int64(7)):
    chk.eq(f"allgather step={step!r}", comm.allgather(rank, step=step), list(range(size)))
    chk.eq(f"gather step={step!r}", comm.gather(rank, 0, step=step),
           list(range(size)) if rank == 0 else None)
    chk.eq(f"bcast step={step!r}", comm.bcast(rank, 0, schema=int, step=step), 0)
    chk.eq(f"allreduce step={step!r}", comm.allreduce(1, step=step), size)

# --- split, dup, other communicators --------------------------------------------------------
color = rank % 2
members = [r for r in range(size) if r % 2 == color]
sub = once("split", lambda: comm.split(color, key=-rank))
chk.eq("split name", sub.name, f"COMM_WORLD.split({color})")
chk.eq("split size", sub.size, len(members))
chk.eq("split rank (key reverses order)", sub.rank, sorted(members, reverse=True).index(rank))
chk.eq("split seq starts at 0", sub.seq, 0)
chk.eq("split allgather", sub.allgather(rank), sorted(members, reverse=True))
chk.eq("split seq", sub.seq, 1)
none_or_sub = once("split(None)", lambda: comm.split(None if rank % 2 else 0))
chk.eq("split(None) gives None", none_or_sub is None, rank % 2 == 1)
chk.eq("split(None) members", none_or_sub.allgather(rank) if none_or_sub is not None else None,
       None if rank % 2 else list(range(0, size, 2)))

twin = once("dup", comm.dup)
chk.eq("dup name", twin.name, "COMM_WORLD.dup")
chk.eq("dup seq starts at 0", twin.seq, 0)
before = comm.seq
chk.eq("dup allgather", twin.allgather(-rank), [-r for r in range(size)])
chk.eq("dup has its own seq", (twin.seq, comm.seq), (1, before))

self_comm = tc.TypedComm(MPI.COMM_SELF)
chk.eq("COMM_SELF", (self_comm.name, self_comm.size, self_comm.allgather(rank)),
       ("COMM_SELF", 1, [rank]))
raw_sub = WORLD.Split(0, rank)
from_raw = tc.TypedComm(raw_sub, name="mine", timeout=30)
chk.eq("TypedComm(any intracomm)", (from_raw.name, from_raw.timeout, from_raw.allgather(rank)),
       ("mine", 30, list(range(size))))
# Typed traffic runs on a private duplicate: raw messages on the same communicator never mix.
if size > 1:
    if rank == 0:
        WORLD.send("raw", dest=1, tag=5)
    got = comm.allgather(rank)
    chk.eq("typed traffic does not consume raw messages", got, list(range(size)))
    raw = WORLD.recv(source=0, tag=5) if rank == 1 else "raw"
    chk.eq("raw message intact", raw, "raw")

# --- slot boundaries --------------------------------------------------------------------------
def blob(n):
    """bytes whose msgpack encoding (the payload) is exactly n bytes long."""
    value = b"x" * (n - 2 if n <= 257 else n - 3 if n <= 65538 else n - 5)
    assert len(msgspec.msgpack.encode(value)) == n, n
    return value


def slot_for(need):
    """The documented rule: the smallest doubling of MIN_SLOT that holds ``need``, capped."""
    slot = MIN_SLOT
    while slot < need and slot < MAX_SLOT:
        slot *= 2
    return slot


last = size - 1
room = MIN_SLOT - HEADER_SIZE  # payload bytes a fresh slot holds inline
sized = comm.dup()
chk.eq("fresh slot", slot_size(sized), MIN_SLOT)
expected_slot = MIN_SLOT
# Payload sizes on the last rank around every slot boundary; the slot only grows here.
for n in [room - 1, room, room + 1, 199, 200, 201, 455, 456, 457, MAX_SLOT - HEADER_SIZE - 1,
          MAX_SLOT - HEADER_SIZE, MAX_SLOT - HEADER_SIZE + 1, 100_000, 4041]:
    mine = blob(n) if rank == last else blob(10 + rank)
    got = sized.allgather(mine)
    chk.eq(f"allgather payload {n}", got, [blob(n) if r == last else blob(10 + r)
                                           for r in range(size)])
    expected_slot = max(expected_slot, slot_for(HEADER_SIZE + n))
    chk.eq(f"slot after payload {n}", slot_size(sized), expected_slot)
    chk.same(f"slot after payload {n} agrees", slot_size(sized))
chk.eq("boundaries straddled", (slot_for(HEADER_SIZE + room), slot_for(HEADER_SIZE + room + 1)),
       (MIN_SLOT, 2 * MIN_SLOT))
for n in (199, 200, 201, 4041, 100_000):
    for root in range(size):
        c = comm.dup()
        got = c.gather(blob(n) if rank == root else blob(3), root)
        chk.eq(f"gather payload {n} root {root}", got,
               [blob(n) if r == root else blob(3) for r in range(size)] if rank == root else None)
        # an overflowing non-root too
        got = c.gather(blob(n) if rank == last else blob(3), root)
        chk.eq(f"gather payload {n} from rank {last} root {root}", got,
               [blob(n) if r == last else blob(3) for r in range(size)] if rank == root else None)
        got = c.bcast(blob(n) if rank == root else None, root, schema=bytes)
        chk.eq(f"bcast payload {n} root {root}", got, blob(n))
        chk.same(f"slot after gather/bcast {n} agrees", slot_size(c))
# None contributions beside an overflowing one.
got = sized.allgather(None if rank % 2 else [rank] * 3000, schema=Optional[list[int]])
chk.eq("None beside overflow", got, [None if r % 2 else [r] * 3000 for r in range(size)])

# Shrink: after a window (or two: the window under way may hold a large payload) of small
# payloads, the slot returns to the minimum on every rank.
chk.eq("grown before shrink", slot_size(sized), MAX_SLOT)
for i in range(2 * SHRINK_WINDOW + 1):
    got = sized.allgather(i)
chk.eq("last small allgather", got, [2 * SHRINK_WINDOW] * size)
chk.eq("shrunk", slot_size(sized), MIN_SLOT)
chk.same("shrunk slot agrees", slot_size(sized))
chk.eq("after shrink, boundary", sized.allgather(blob(room + 1 if rank == 0 else room)),
       [blob(room + 1 if r == 0 else room) for r in range(size)])
chk.eq("after shrink, regrown", slot_size(sized), 2 * MIN_SLOT)

# --- rule 2: one backend collective in steady state -----------------------------------------
class Counting:
    """The MPI transport, recording which backend collectives each typed collective used."""

    kind = "mpi"

    def __init__(self, inner):
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def counting(*args, **kwargs):
            calls.append(name)
            return method(*args, **kwargs)
        return counting


calls = []
counted = TypedComm._from_transport(Counting(MPITransport(WORLD.Dup())), "counted", None)


def backend_calls(fn):
    del calls[:]
    fn()
    return list(calls)


for label, fn in [
    ("allgather", lambda: counted.allgather(RankState(rank, 1, 2))),
    ("allgather None", lambda: counted.allgather(None, schema=Optional[RankState])),
    ("gather", lambda: counted.gather(rank, 0)),
    ("bcast", lambda: counted.bcast(rank, 0, schema=int)),
    ("allreduce", lambda: counted.allreduce(rank)),
    ("allreduce small array", lambda: counted.allreduce(np.ones(8))),
    ("barrier", counted.barrier),
]:
    fn()  # first call may resolve the schema
    chk.eq(f"{label}: one backend collective", backend_calls(fn), ["allgather_slots"])
chk.eq("overflowing allgather: two", backend_calls(lambda: counted.allgather(blob(5000))),
       ["allgather_slots", "allgatherv"])
chk.eq("overflowing gather: two", backend_calls(lambda: counted.gather(blob(5000), 0)),
       ["allgather_slots", "gatherv"])
chk.eq("overflowing bcast: two",
       backend_calls(lambda: counted.bcast(blob(5000) if rank == 0 else None, 0, schema=bytes)),
       ["allgather_slots", "bcast_bytes"])
chk.eq("large allreduce: two", backend_calls(lambda: counted.allreduce(np.ones(5000))),
       ["allgather_slots", "allreduce_array"])

chk.eq("typed comm seq agrees at the end", WORLD.allgather(comm.seq), [comm.seq] * size)
chk.done()
