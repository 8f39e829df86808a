"""SPMD property test: the mpi4py drop-in returns what mpi4py itself returns, on random programs.

Rank 0 runs hypothesis (derandomized, bounded) and broadcasts each drawn program over the raw
world communicator; every rank runs it twice, through ``typedcoll.compat.mpi4py`` and through
mpi4py's own pickle API on a duplicate of the world (with ``rc.fast_reduce`` off, so mpi4py too
combines reductions in rank order), and rank 0 checks every rank's comparison. Values differ in
type from rank to rank (an idle rank's None beside its peers' records), as mpi4py allows.
Then fixed cases that only a typed drop-in catches: a skipped vote of plain ints, a value that
cannot be sent without pickle, a class only one rank imported. Run at 2 and 4 ranks.
"""

import dataclasses
import enum
import math
import os
import sys
import types
from typing import Any, NamedTuple, Optional

import mpi4py

mpi4py.rc.fast_reduce = False  # mpi4py's reductions in rank order, as the drop-in's
import msgspec  # noqa: E402
import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mpi4py import MPI  # noqa: E402

import typedcoll as tc  # noqa: E402
from typedcoll import compat  # noqa: E402
from spmd.harness import WORLD, Checker  # noqa: E402

MAX_RANKS = 4
EXAMPLES = int(os.environ.get("TYPEDCOLL_PROPERTY_EXAMPLES", "40"))
ORACLE = WORLD.Dup()  # mpi4py's own collectives: never mixed with the verdict traffic on WORLD


@dataclasses.dataclass
class Stats:
    rank: int
    sizes: list[int]
    note: Optional[str] = None


class Request(msgspec.Struct):
    id: int
    prompt: str
    embedding: np.ndarray


class Span(NamedTuple):
    start: int
    stop: int


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types, arrays and NaN included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(
            np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, float) or isinstance(a, np.floating):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, msgspec.Struct):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if dataclasses.is_dataclass(a):
        return same(dataclasses.astuple(a), dataclasses.astuple(b))
    return a == b


# --- values ------------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(),
    st.text(max_size=20), st.binary(max_size=20), st.complex_numbers(allow_nan=False))
arrays = st.one_of(
    st.tuples(st.sampled_from(["int64", "float32", "uint8", "bool", ">i4"]),
              st.integers(0, 40)).map(lambda t: (np.arange(t[1]) % 7).astype(t[0])),
    st.integers(0, 3).map(lambda n: np.ones((n, 2), dtype="float64")))
records = st.one_of(
    st.builds(Stats, st.integers(0, 3), st.lists(st.integers(0, 1000), max_size=5),
              st.none() | st.text(max_size=10)),
    st.builds(Request, st.integers(0, 99), st.text(max_size=10), arrays),
    st.builds(Span, st.integers(0, 9), st.integers(0, 9)),
    st.sampled_from(list(Phase)),
    st.sampled_from([np.float32(1.5), np.int64(-3), np.bool_(True)]))
values = st.recursive(
    st.one_of(scalars, arrays, records),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=5) | st.integers(0, 9), inner, max_size=4),
        st.frozensets(st.integers(0, 9), max_size=3), st.sets(st.text(max_size=3), max_size=3)),
    max_leaves=8)

# For reductions, values on which mpi4py's own op is defined (it applies the op's Python
# meaning, MPI.SUM(a, b) = a + b), without NaN (a documented difference: NaN wins in typedcoll).
small_int = st.integers(-2 ** 20, 2 ** 20)
REDUCIBLE = {
    "sum": st.one_of(small_int, st.floats(-1e6, 1e6), st.text(max_size=3),
                     st.lists(small_int, max_size=3)),
    "prod": st.one_of(small_int, st.floats(-10, 10)),
    "max": st.one_of(small_int, st.floats(-1e6, 1e6)),
    "min": st.one_of(small_int, st.floats(-1e6, 1e6)),
    "land": st.one_of(small_int, st.booleans(), st.none(), st.text(max_size=2)),
    "lor": st.one_of(small_int, st.booleans(), st.none(), st.text(max_size=2)),
    "lxor": st.one_of(small_int, st.booleans(), st.none()),
    "band": st.one_of(small_int, st.booleans()),
    "bor": st.one_of(small_int, st.booleans()),
    "bxor": st.one_of(small_int, st.booleans()),
}
SAME_KIND = {"sum": "numbers", "prod": "numbers"}  # str + int raises alike on both sides: skip
MPI_OPS = {name: getattr(MPI, name.upper()) for name in REDUCIBLE}


@st.composite
def steps(draw):
    op = draw(st.sampled_from(["allgather", "gather", "bcast", "scatter", "alltoall",
                               "allreduce", "reduce", "sendrecv"]))
    root = draw(st.integers(0, MAX_RANKS - 1))
    if op in ("allreduce", "reduce"):
        reduce_op = draw(st.sampled_from(sorted(REDUCIBLE)))
        kind = draw(REDUCIBLE[reduce_op].map(type))  # one type for every rank of this step
        vals = draw(st.lists(REDUCIBLE[reduce_op].filter(lambda v: type(v) is kind),
                             min_size=MAX_RANKS, max_size=MAX_RANKS))
        return (op, root, reduce_op, vals)
    per_rank = st.lists(values, min_size=MAX_RANKS, max_size=MAX_RANKS)
    if op in ("scatter", "alltoall"):
        vals = draw(st.lists(per_rank, min_size=MAX_RANKS, max_size=MAX_RANKS))
    else:
        vals = draw(per_rank)
    return (op, root, None, vals)


def run_step(comm: Any, step: tuple) -> Any:
    """One step through ``comm`` (mpi4py's communicator or the drop-in: the same calls)."""
    op, root, reduce_op, vals = step
    n, r = comm.Get_size(), comm.Get_rank()
    root %= n
    cycle = lambda items: [items[j % len(items)] for j in range(n)]  # noqa: E731 (any size)
    mine = vals[r % len(vals)]
    if op == "allgather":
        return comm.allgather(mine)
    if op == "gather":
        return comm.gather(mine, root=root)
    if op == "bcast":
        return comm.bcast(mine if r == root else None, root=root)
    if op == "scatter":
        return comm.scatter(cycle(vals[root % len(vals)]) if r == root else None, root=root)
    if op == "alltoall":
        return comm.alltoall(cycle(mine))
    if op == "allreduce":
        return comm.allreduce(mine, op=MPI_OPS[reduce_op])
    if op == "reduce":
        return comm.reduce(mine, op=MPI_OPS[reduce_op], root=root)
    return comm.sendrecv(mine, dest=(r + 1) % n, source=(r - 1) % n)


def run_program(drop_in: Any, program: list) -> Optional[str]:
    """None when every step agrees with mpi4py, else what differed."""
    for i, step in enumerate(program):
        expected = run_step(ORACLE, step)
        got = run_step(drop_in, step)
        if not same(got, expected):
            return f"step {i} {step[:3]}: got {got!r}, mpi4py gave {expected!r}"
    return None


# Every op once with values that tell orders and types apart, whatever hypothesis draws.
PAYLOADS = [None, (1, (2, "x")), {"k": {1, 2}}, Stats(1, [2, 3]),
            Request(7, "p", np.arange(3, dtype=">f8")), Span(1, 2), Phase.DECODE,
            np.float32(2.5), 2 ** 80, b"\x00", 1 + 2j, {(1, 2): [frozenset({3})]}]
SAMPLES = (
    [(op, 1, None, [PAYLOADS[(i + r) % len(PAYLOADS)] for r in range(MAX_RANKS)])
     for i in range(len(PAYLOADS)) for op in ("allgather", "gather", "bcast", "sendrecv")]
    + [(op, 2, None, [[PAYLOADS[(i + r + j) % len(PAYLOADS)] for j in range(MAX_RANKS)]
                      for r in range(MAX_RANKS)])
       for i in range(0, len(PAYLOADS), 3) for op in ("scatter", "alltoall")]
    + [(op, 3, reduce_op, vals) for op in ("allreduce", "reduce") for reduce_op, vals in [
        ("sum", ["a", "b", "c", "d"]), ("sum", [[1], [2], [3], [4]]), ("sum", [1, 2.5, 3, 4]),
        ("prod", [2, 3, 5, 7]), ("max", [3, 9.5, 1, 2]), ("min", ["b", "a", "d", "c"]),
        ("land", [3, 5, 1, 2]), ("lor", [0, None, "", 4]), ("lxor", [1, 0, 1, 1]),
        ("band", [7, 3, 15, 31]), ("bor", [1, 2, 4, 8]), ("bxor", [True, 3, 5, 6]),
        ("sum", [np.arange(3), np.ones(3, dtype=np.int64), np.arange(3), np.arange(3)]),
        ("bxor", [np.arange(4)] * 4)]]
)


def property_test(chk: Checker, drop_in: Any) -> None:
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    chk.eq("every op and payload once", run_program(drop_in, SAMPLES), None)
    if rank != 0:
        while True:
            program = WORLD.bcast(None, root=0)
            if program is None:
                chk.count += 1
                return
            WORLD.gather(run_program(drop_in, program), root=0)

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(steps(), min_size=1, max_size=5))
    def matches_mpi4py(program):
        WORLD.bcast(program, root=0)
        failures = WORLD.gather(run_program(drop_in, program), root=0)
        assert all(f is None for f in failures), failures

    try:
        matches_mpi4py()
    finally:
        WORLD.bcast(None, root=0)
    chk.count += 1
    print(f"hypothesis: derandomized, {EXAMPLES} programs at {size} ranks", flush=True)


# --- what only a typed drop-in catches ----------------------------------------------------------
def fixed_cases(chk: Checker, drop_in: Any) -> None:
    rank = WORLD.Get_rank()
    # A skipped vote: both votes are plain ints, identical on the wire.
    with chk.expect(tc.DesyncError, "skipped vote") as err:
        if rank != 0:
            drop_in.allgather(len("batch"))
        drop_in.allgather(int(rank > 0))
    chk.eq("skipped vote: kinds", err.error.kinds, (tc.MismatchKind.CALL,))
    chk.same("skipped vote: same error on every rank", str(err.error))

    # A value that cannot be sent without pickle: EncodeError there, PeerError on the others.
    class Opaque:
        pass

    expected = tc.EncodeError if rank == 1 else tc.PeerError
    with chk.expect(expected, "refusal") as err:
        drop_in.gather([Opaque()] if rank == 1 else rank, root=0)
    detail = ("expected a value the drop-ins can send without pickle (builtins, dataclasses, "
              "msgspec Structs, NamedTuple, TypedDict, Enum, numpy arrays and scalars), got "
              "Opaque at $[0]: make it a msgspec Struct or a dataclass, or convert it to one of "
              "those before the call")
    err.message(f"collective #1 on COMM_WORLD: rank 1 could not send its gather[Any] contribution "
                f"at {err.site()}: {detail}" if rank == 1 else
                f"collective #1 on COMM_WORLD: rank 1 failed its gather[Any] contribution at "
                f"{err.site()}: {detail}")

    # A class only rank 0 imported: every rank raises DecodeError in the same call.
    if rank == 0:
        module = types.ModuleType("only_rank_zero")
        exec("import dataclasses\n@dataclasses.dataclass\nclass Hidden:\n    a: int\n",
             module.__dict__)
        sys.modules[module.__name__] = module
        value = module.Hidden(1)  # type: ignore[attr-defined]
    else:
        value = None
    with chk.expect(tc.DecodeError, "class only rank 0 has") as err:
        drop_in.bcast(value, root=0)
    chk.true("names the missing class", "expected the class only_rank_zero:Hidden in an "
                                        "imported module" in err.text or rank == 0 and
             "could not rebuild" in err.text)
    chk.same("usable afterwards", drop_in.allgather(rank))


# --- mpi4py's communicator calls -----------------------------------------------------------------
def communicator_cases(chk: Checker, drop_in: Any) -> None:
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    drop_in.Barrier()
    # Split as mpi4py splits: the same ranks, order and sizes, and a .comm that is that split.
    sub = drop_in.Split(rank % 2, key=-rank)
    theirs = ORACLE.Split(rank % 2, key=-rank)
    chk.eq("Split: rank and size", (sub.Get_rank(), sub.Get_size()),
           (theirs.Get_rank(), theirs.Get_size()))
    chk.eq("Split: .comm", (sub.comm.Get_rank(), sub.comm.Get_size()),
           (theirs.Get_rank(), theirs.Get_size()))
    chk.eq("Split: allgather", sub.allgather(rank), theirs.allgather(rank))
    sub.Free()
    chk.true("Split: Free frees the communicator it made", sub.comm == MPI.COMM_NULL)
    theirs.Free()
    # MPI.UNDEFINED: COMM_NULL there, a communicator of the others elsewhere.
    rest = drop_in.Split(MPI.UNDEFINED if rank == 0 else 1)
    if rank == 0:
        chk.true("Split: UNDEFINED gives COMM_NULL", rest == MPI.COMM_NULL)
    else:
        chk.eq("Split: the others", rest.allgather(rank), list(range(1, size)))
        rest.Free()
    # A bad color on one rank: raised on every rank, and nothing split beneath.
    expected = tc.EncodeError if rank == size - 1 else tc.PeerError
    with chk.expect(expected, "Split: bad color") as err:
        drop_in.Split(-5 if rank == size - 1 else 0)
    chk.true("Split: names the color", "expected color to be None or an int" in err.text)
    with chk.expect(expected, "Split: an array for a color") as err:
        drop_in.Split(np.array([1, 2]) if rank == size - 1 else 0)
    # One rank at another call: DesyncError on every rank, before mpi4py's Split pairs anything.
    if size > 1:
        with chk.expect(tc.DesyncError, "Split: skipped") as err:
            if rank == 0:
                drop_in.allgather(rank)
            else:
                drop_in.Split(0)
        chk.same("Split: skipped: one error", str(err.error))
    else:
        chk.count += 2
    twin = drop_in.Dup()
    chk.eq("Dup: allgather", twin.allgather(rank), list(range(size)))
    chk.eq("Dup: its own mpi4py communicator, congruent",
           MPI.Comm.Compare(twin.comm, drop_in.comm), MPI.CONGRUENT)
    twin.Free()
    try:
        drop_in.Allreduce
    except AttributeError as exc:
        chk.true("buffer calls: says where they are", ".comm" in str(exc))
    else:
        chk.true("buffer calls: AttributeError", False)
    chk.same("usable after the communicator calls", drop_in.allgather(rank))


def point_to_point_cases(chk: Checker, drop_in: Any) -> None:
    """mpi4py's PROC_NULL at the ends of a line of ranks, and receives posted ahead of their
    iteration (double buffering) naming the step they are for."""
    rank, size = drop_in.rank, drop_in.size
    right = rank + 1 if rank + 1 < size else MPI.PROC_NULL
    left = rank - 1 if rank > 0 else MPI.PROC_NULL
    status = MPI.Status()
    got = drop_in.sendrecv(("line", rank), dest=right, source=left, status=status)
    chk.eq("PROC_NULL: sendrecv along a line", got, None if rank == 0 else ("line", rank - 1))
    chk.eq("PROC_NULL: status", status.Get_source(), MPI.PROC_NULL if rank == 0 else rank - 1)
    drop_in.send(rank, dest=right if rank % 2 == 0 else MPI.PROC_NULL, tag=3)
    pending = drop_in.irecv(source=left if rank % 2 == 1 else MPI.PROC_NULL, tag=3)
    chk.eq("PROC_NULL: send and irecv", pending.wait(),
           rank - 1 if rank % 2 == 1 else None)
    got = []
    drop_in.set_step(0)
    ahead = drop_in.irecv(source=left, tag=4)
    for it in range(3):
        drop_in.set_step(it)
        drop_in.send((it, rank), dest=right, tag=4)
        got.append(ahead.wait())
        if it < 2:
            ahead = drop_in.irecv(source=left, tag=4, step=it + 1)
    chk.eq("irecv posted ahead with its step", got,
           [None if rank == 0 else (it, rank - 1) for it in range(3)])
    drop_in.set_step(None)


def main() -> None:
    chk = Checker("compat_mpi4py")
    drop_in = compat.mpi4py(MPI.COMM_WORLD, timeout=60)
    chk.eq("rank", (drop_in.Get_rank(), drop_in.rank, drop_in.Get_size(), drop_in.size),
           (WORLD.Get_rank(), WORLD.Get_rank(), WORLD.Get_size(), WORLD.Get_size()))
    chk.true("communicator beneath", drop_in.comm is MPI.COMM_WORLD)
    fixed_cases(chk, drop_in)
    communicator_cases(chk, drop_in)
    point_to_point_cases(chk, drop_in)
    if WORLD.Get_size() > 1:
        property_test(chk, drop_in)
    else:
        chk.count += 1
    chk.done()


main()
