"""SPMD: desyncs (rule 3) and failing contributions (rule 4) raise on every rank, same call.

Run by tests/test_core_spmd.py at 1, 2 and 4 ranks (desync cases need two ranks or more). The
odd rank out is the last one; every message is compared exactly, every rank's DesyncError text
must be identical, and after each error the communicator must still work.
"""

from typing import Optional

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from typedcoll import Group, MismatchKind
from typedcoll.codecs import resolve
from typedcoll._wire import HEADER_SIZE, MIN_SLOT
from spmd.harness import Checker

K = MismatchKind


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int


class TimeoutFlag(msgspec.Struct):
    timed_out: bool


def other_version():
    """A second, incompatible version of RankState (same name, one more field)."""
    class RankState(msgspec.Struct):
        rank: int
        num_active_requests: int
        num_active_tokens: int
        num_paused: int = 0
    return RankState


RankStateV2 = other_version()

chk = Checker("core_errors")
comm = tc.TypedComm(MPI.COMM_WORLD)
rank, size = comm.rank, comm.size
odd = size - 1
# Group labels, spelled out by hand (compact_ranks is what is under test).
MANY = "rank 0" if size == 2 else f"ranks 0-{size - 2}"
ODD = f"rank {odd}"
state = RankState(rank, 3, 17)


def table(seq, kinds, rows):
    width = max(len(label) + 1 for label, _ in rows)
    return "\n".join([f"collective #{seq} on COMM_WORLD diverged ({kinds}):"]
                     + [f"  {label + ':':<{width}} {text}" for label, text in rows])


def desync(label, err, seq, kinds, rows, groups=None):
    """Every rank raised DesyncError with exactly this text, seq and kinds; comm still works."""
    e = err.error
    err.message(table(seq, ", ".join(k.value for k in kinds), rows))
    chk.eq(f"{label}: seq", e.seq, seq)
    chk.eq(f"{label}: comm", e.comm, "COMM_WORLD")
    chk.eq(f"{label}: kinds", e.kinds, tuple(kinds))
    chk.true(f"{label}: groups are Groups", all(isinstance(g, Group) for g in e.groups))
    if groups is not None:
        chk.eq(f"{label}: group ranks", [g.ranks for g in e.groups], groups)
    chk.same(f"{label}: same text on every rank", str(e))
    chk.usable(comm, label)


if size > 1:
    # --- rule 3: the example -------------------------------------------------------
    seq = comm.seq
    with chk.expect(tc.DesyncError, "schema") as err:
        if rank == odd: comm.allgather(TimeoutFlag(True), step=451)  # noqa: E701
        else: comm.allgather(state, step=451)  # noqa: E701
    desync("schema", err, seq, [K.SCHEMA],
           [(MANY, f"allgather[RankState] at {err.site(2)} step 451"),
            (ODD, f"allgather[TimeoutFlag] at {err.site(1)} step 451")],
           [tuple(range(odd)), (odd,)])
    envelopes = [g.envelope for g in err.error.groups]
    chk.eq("schema: envelopes", [(e.op, e.schema, e.site, e.step, e.root, e.seq) for e in envelopes],
           [("allgather", "RankState", err.site(2), 451, None, seq),
            ("allgather", "TimeoutFlag", err.site(1), 451, None, seq)])
    chk.eq("schema: fingerprints", [e.fingerprint for e in envelopes],
           [resolve(RankState).fingerprint.hex(), resolve(TimeoutFlag).fingerprint.hex()])

    # An idle rank that forgot schema=Optional[...] sends a NoneType schema.
    seq = comm.seq
    with chk.expect(tc.DesyncError, "None without schema") as err:
        comm.allgather(None if rank == odd else state)
    desync("None without schema", err, seq, [K.SCHEMA],
           [(MANY, f"allgather[RankState] at {err.site()}"),
            (ODD, f"allgather[None] at {err.site()}")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "op") as err:
        if rank == odd: comm.gather(rank, 0)  # noqa: E701
        else: comm.allgather(rank)  # noqa: E701
    desync("op", err, seq, [K.OP, K.ROOT],
           [(MANY, f"allgather[int] root=None at {err.site(2)}"),
            (ODD, f"gather[int] root=0 at {err.site(1)}")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "barrier vs allgather") as err:
        if rank == odd: comm.barrier()  # noqa: E701
        else: comm.allgather(rank)  # noqa: E701
    desync("barrier vs allgather", err, seq, [K.OP, K.SCHEMA],
           [(MANY, f"allgather[int] at {err.site(2)}"), (ODD, f"barrier at {err.site(1)}")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "root") as err:
        comm.gather(rank, odd if rank == odd else 0, schema=int)
    desync("root", err, seq, [K.ROOT],
           [(MANY, f"gather[int] root=0 at {err.site()}"),
            (ODD, f"gather[int] root={odd} at {err.site()}")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "bcast root") as err:
        comm.bcast(rank, odd if rank == odd else 0, schema=int, step=7)
    desync("bcast root", err, seq, [K.ROOT],
           [(MANY, f"bcast[int] root=0 at {err.site()} step 7"),
            (ODD, f"bcast[int] root={odd} at {err.site()} step 7")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "reduce op") as err:
        comm.allreduce(rank, op="max" if rank == odd else "sum")
    desync("reduce op", err, seq, [K.REDUCE_OP],
           [(MANY, f"allreduce[int] op=sum at {err.site()}"),
            (ODD, f"allreduce[int] op=max at {err.site()}")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "step") as err:
        comm.allgather(state, step=452 if rank == odd else 451)
    desync("step", err, seq, [K.STEP],
           [(MANY, f"allgather[RankState] at {err.site()} step 451"),
            (ODD, f"allgather[RankState] at {err.site()} step 452")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "step given on one rank only") as err:
        comm.allgather(state, step=3 if rank == odd else None)
    desync("step given on one rank only", err, seq, [K.STEP],
           [(MANY, f"allgather[RankState] at {err.site()}"),
            (ODD, f"allgather[RankState] at {err.site()} step 3")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "shape") as err:
        comm.allreduce(np.zeros(4 if rank == odd else 3))
    desync("shape", err, seq, [K.SHAPE],
           [(MANY, f"allreduce[ndarray] op=sum shape=(3,) dtype=float64 at {err.site()}"),
            (ODD, f"allreduce[ndarray] op=sum shape=(4,) dtype=float64 at {err.site()}")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "dtype") as err:
        comm.allreduce(np.zeros((2, 2), dtype=np.int32 if rank == odd else np.int64), op="min")
    desync("dtype", err, seq, [K.DTYPE],
           [(MANY, f"allreduce[ndarray] op=min shape=(2, 2) dtype=int64 at {err.site()}"),
            (ODD, f"allreduce[ndarray] op=min shape=(2, 2) dtype=int32 at {err.site()}")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "allgather shape") as err:
        comm.allgather(np.ones(5 if rank == odd else 2, dtype=np.uint8))
    desync("allgather shape", err, seq, [K.SHAPE],
           [(MANY, f"allgather[ndarray] shape=(2,) dtype=uint8 at {err.site()}"),
            (ODD, f"allgather[ndarray] shape=(5,) dtype=uint8 at {err.site()}")])

    seq = comm.seq
    with chk.expect(tc.DesyncError, "numpy scalar dtype") as err:
        comm.allreduce(np.float32(1) if rank == odd else np.float64(1))
    desync("numpy scalar dtype", err, seq, [K.SCHEMA, K.DTYPE],
           [(MANY, f"allreduce[float64] op=sum shape=() dtype=float64 at {err.site()}"),
            (ODD, f"allreduce[float32] op=sum shape=() dtype=float32 at {err.site()}")])

    # Two versions of one schema name: the fingerprints tell them apart.
    seq = comm.seq
    with chk.expect(tc.DesyncError, "schema version") as err:
        comm.allgather(RankStateV2(rank, 3, 17) if rank == odd else state)
    old, new = (resolve(t).fingerprint.hex()[:8] for t in (RankState, RankStateV2))
    chk.true("schema version: fingerprints differ", old != new)
    desync("schema version", err, seq, [K.SCHEMA],
           [(MANY, f"allgather[RankState@{old}] at {err.site()}"),
            (ODD, f"allgather[RankState@{new}] at {err.site()}")])

    # Several aspects at once, and the order of kinds is fixed.
    seq = comm.seq
    with chk.expect(tc.DesyncError, "many kinds") as err:
        if rank == odd: comm.gather(TimeoutFlag(False), 0, step=3)  # noqa: E701
        else: comm.allgather(state, step=2)  # noqa: E701
    desync("many kinds", err, seq, [K.OP, K.SCHEMA, K.STEP, K.ROOT],
           [(MANY, f"allgather[RankState] root=None at {err.site(2)} step 2"),
            (ODD, f"gather[TimeoutFlag] root=0 at {err.site(1)} step 3")])

    # A desync that follows an overflowing payload: the slot sizes must still agree after it.
    seq = comm.seq
    with chk.expect(tc.DesyncError, "overflowing desync") as err:
        comm.allgather(b"x" * 9000 if rank == odd else "y" * 9000)
    desync("overflowing desync", err, seq, [K.SCHEMA],
           [(MANY, f"allgather[str] at {err.site()}"), (ODD, f"allgather[bytes] at {err.site()}")])
    chk.eq("big payload after overflowing desync", comm.allgather(b"z" * 9000),
           [b"z" * 9000] * size)

if size == 4:
    seq = comm.seq
    with chk.expect(tc.DesyncError, "three groups") as err:
        if rank == 1: comm.allgather(rank)  # noqa: E701
        elif rank == 3: comm.allgather(TimeoutFlag(True))  # noqa: E701
        else: comm.allgather(state)  # noqa: E701
    desync("three groups", err, seq, [K.SCHEMA],
           [("ranks 0,2", f"allgather[RankState] at {err.site(3)}"),
            ("rank 1", f"allgather[int] at {err.site(1)}"),
            ("rank 3", f"allgather[TimeoutFlag] at {err.site(2)}")],
           [(0, 2), (1,), (3,)])

    # A rank that failed to encode is shown with its error when the others disagree anyway.
    seq = comm.seq
    with chk.expect(tc.DesyncError, "desync with a failed rank") as err:
        if rank == 3: comm.allgather(RankState(3, np.int64(1), 0))  # noqa: E701
        else: comm.allgather(rank if rank < 2 else str(rank))  # noqa: E701
    desync("desync with a failed rank", err, seq, [K.SCHEMA],
           [("ranks 0-1", f"allgather[int] at {err.site(2)}"),
            ("rank 2", f"allgather[str] at {err.site(2)}"),
            ("rank 3", f"allgather[RankState] at {err.site(1)} (failed: Encoding objects of "
                       f"type numpy.int64 is unsupported)")])


# --- rule 4: one rank's own value is bad ------------------------------------------------------
def own_failure(label, fn, what, detail, error_type, peer=tc.PeerError, failed=(odd,), on=comm):
    """``fn(bad)`` on every rank, bad on ``failed``: EncodeError there, ``peer`` elsewhere."""
    seq = on.seq
    bad = rank in failed
    if isinstance(what, tuple):  # (the failing rank's label, its peers' label)
        what = what[0] if bad else what[1]
    exc_type = tc.EncodeError if bad else peer
    with chk.expect(exc_type, label) as err:
        fn(bad)
    e = err.error
    chk.eq(f"{label}: seq", (e.seq, e.comm), (seq, on.name))
    if bad:
        err.message(f"collective #{seq} on {on.name}: rank {rank} could not send its {what} "
                    f"contribution: {detail}")
        chk.true(f"{label}: EncodeError is no peer error",
                 not isinstance(e, (tc.PeerError, tc.DecodeError)))
    elif peer is tc.PeerError:
        more = "" if len(failed) == 1 else f" (and {len(failed) - 1} more)"
        err.message(f"collective #{seq} on {on.name}: rank {failed[0]}{more} failed its {what} "
                    f"contribution: {detail}")
        chk.eq(f"{label}: PeerError attributes", (e.ranks, e.error_type, e.detail),
               (tuple(failed), error_type, detail))
    else:
        # The value encoded but does not match the schema: its peers find out by decoding it.
        err.message(f"collective #{seq} on {on.name}: payload from rank {failed[0]} does not "
                    f"decode as {e.schema}: {detail}")
        chk.eq(f"{label}: DecodeError source", e.source, failed[0])
    chk.usable(on, label)


own_failure("numpy int in a Struct", lambda bad: comm.allgather(
    RankState(rank, np.int64(3) if bad else 3, 17)), "allgather[RankState]",
    "Encoding objects of type numpy.int64 is unsupported", "TypeError")
own_failure("int beyond 64 bits", lambda bad: comm.allgather(2 ** 64 if bad else 1),
            "allgather[int]", "can't serialize ints < -2**63 or > 2**64 - 1", "OverflowError")
own_failure("str in an int field (allgather)", lambda bad: comm.allgather(
    RankState(rank, "three" if bad else 3, 17)), "allgather[RankState]",
    "Expected `int`, got `str` - at `$.num_active_requests`", "ValidationError",
    peer=tc.DecodeError)
own_failure("str in an int field (gather)", lambda bad: comm.gather(
    RankState(rank, "three" if bad else 3, 17), 0), "gather[RankState]",
    "Expected `int`, got `str` - at `$.num_active_requests`", "ValidationError")
own_failure("bad bcast value on the root", lambda bad: comm.bcast(
    "three" if bad else None, odd, schema=int), "bcast[int]", "Expected `int`, got `str`",
    "ValidationError", peer=tc.DecodeError)
own_failure("value is not the schema's array", lambda bad: comm.allgather(
    1 if bad else np.zeros(2), schema=np.ndarray), "allgather[ndarray]",
    "expected numpy.ndarray, got int", "TypeError")
own_failure("bad root on one rank (gather)", lambda bad: comm.gather(rank, size if bad else 0),
            "gather[int]", f"expected root in 0..{size - 1}, got {size}", "ValueError")
own_failure("bad root on one rank (bcast)", lambda bad: comm.bcast(
    rank, -1 if bad else 0, schema=int), "bcast[int]", f"expected root in 0..{size - 1}, got -1",
    "ValueError")
own_failure("bad reduce op on one rank", lambda bad: comm.allreduce(
    rank, op="avg" if bad else "sum"), "allreduce[int]",
    "expected op 'sum', 'max', 'min' or 'prod', got 'avg'", "ValueError")
own_failure("non-numeric allreduce", lambda bad: comm.allreduce("x" if bad else 1),
            ("allreduce[?]", "allreduce[int]"),
            "expected an int, float, numpy scalar or numpy array, got str", "TypeError")
own_failure("bool array allreduce", lambda bad: comm.allreduce(
    np.zeros(3, dtype=bool if bad else np.int64)), "allreduce[ndarray]",
    "expected a numeric dtype, got bool", "TypeError")
own_failure("bad step on one rank", lambda bad: comm.allgather(rank, step="x" if bad else 1),
            "allgather[int]", "expected step to be None or a 64-bit int, got 'x'", "TypeError")
# (2 ** 63, the out-of-range case, makes a text longer than a fresh slot: see the report.)
own_failure("step not an int", lambda bad: comm.gather(rank, 0, step=2.5 if bad else 1),
            "gather[int]", "expected step to be None or a 64-bit int, got 2.5", "TypeError")
own_failure("bad split color", lambda bad: comm.split(-1 if bad else 0), "split",
            "expected color to be None or an int >= 0, got -1", "ValueError")
if size > 1:
    own_failure("several failing ranks", lambda bad: comm.allgather(
        RankState(rank, np.int64(3) if bad else 3, 17)), "allgather[RankState]",
        "Encoding objects of type numpy.int64 is unsupported", "TypeError",
        failed=tuple(range(1, size)))
own_failure("every rank fails", lambda bad: comm.allgather(2 ** 65), "allgather[int]",
            "can't serialize ints < -2**63 or > 2**64 - 1", "OverflowError",
            failed=tuple(range(size)))
# A failure text longer than a (fresh) slot reaches every rank whole: it travels in phase 2.
Long = msgspec.defstruct("Long", [("f" * 300, int)])
full = "ValidationError: Expected `int`, got `str` - at `$." + "f" * 300 + "`"
assert len(full) > MIN_SLOT - HEADER_SIZE
fresh = comm.dup()
own_failure("long failure text", lambda bad: fresh.gather(Long("x" if bad else 1), 0),
            "gather[Long]", full.partition(": ")[2], "ValidationError", on=fresh)

chk.done()
