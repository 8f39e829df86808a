"""SPMD property test: random correct programs return exactly what mpi4py's own collectives do.

Rank 0 runs hypothesis (derandomized, bounded) and broadcasts each drawn program (a list of
steps) over the raw world communicator; every rank runs the program twice, through TypedComm and
through mpi4py's pickle collectives (comm.allgather, gather, bcast, allreduce) on the same data,
and the ranks agree on the verdict through a collective. Only rank 0 raises, so hypothesis
shrinks a failure while the other ranks keep serving the programs it draws; the falsifying
example is printed on rank 0 and aborts the job. Run at 1, 2 and 4 ranks.
"""

import os
import time
from typing import Optional

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import typedcoll as tc
from typedcoll._wire import HEADER_SIZE, MIN_SLOT
from spmd.harness import WORLD, Checker, equal, slot_size

MAX_RANKS = 4
EXAMPLES = int(os.environ.get("TYPEDCOLL_PROPERTY_EXAMPLES", "100"))


class Item(msgspec.Struct, frozen=True):
    rank: int
    data: list[int]
    note: Optional[str] = None


# A step: (op, root, schema name, one value per rank of a 4-rank world).
small_int = st.integers(-2 ** 63, 2 ** 64 - 1)
reduce_int = st.integers(-2 ** 20, 2 ** 20)
# Lists and bytes from empty to a few KiB, built from a drawn length (hypothesis left alone draws
# mostly short ones): some fit the 256-byte slot, some overflow it, some exceed the 4 KiB maximum.
int_list = st.one_of(
    st.lists(st.integers(-2 ** 31, 2 ** 31), max_size=8),
    st.tuples(st.integers(0, 1500), st.integers(-2 ** 31, 2 ** 31)).map(
        lambda t: [t[1] + i for i in range(t[0])]))
blob = st.one_of(st.binary(max_size=8),
                 st.tuples(st.integers(0, 6000), st.integers(0, 255)).map(
                     lambda t: bytes((t[1] + i) % 256 for i in range(t[0]))))
item = st.builds(Item, st.integers(0, 3), int_list, st.none() | st.text(max_size=300))
VALUES = {
    "int": small_int,
    "Optional[int]": st.none() | small_int,
    "list[int]": int_list,
    "Optional[list[int]]": st.none() | int_list,
    "bytes": blob,
    "Optional[Item]": st.none() | item,
}
SCHEMAS = {"int": int, "Optional[int]": Optional[int], "list[int]": list[int],
           "Optional[list[int]]": Optional[list[int]], "bytes": bytes,
           "Optional[Item]": Optional[Item]}


KINDS = ([(op, schema) for op in ("allgather", "gather", "bcast") for schema in sorted(VALUES)]
         + [("allreduce", reduce_op) for reduce_op in ("sum", "max", "min", "prod")])


@st.composite
def steps(draw):
    op, schema = draw(st.sampled_from(KINDS))
    if op == "allreduce":
        return (op, schema, "int",
                draw(st.lists(reduce_int, min_size=MAX_RANKS, max_size=MAX_RANKS)))
    root = draw(st.integers(0, MAX_RANKS - 1))
    values = draw(st.lists(VALUES[schema], min_size=MAX_RANKS, max_size=MAX_RANKS))
    return (op, root, schema, values)


# Every op with every schema once, small and overflowing, whatever hypothesis happens to draw.
SAMPLES = {
    "int": [0, -1, 2 ** 64 - 1, -2 ** 63],
    "Optional[int]": [None, 5, None, 7],
    "list[int]": [[], list(range(100)), list(range(3000)), [1]],
    "Optional[list[int]]": [None, list(range(3000)), [2], None],
    "bytes": [b"", b"x" * 199, b"y" * 5000, b"z" * 201],
    "Optional[Item]": [None, Item(1, list(range(2000)), "n"), Item(2, [], None), None],
}
COVERAGE = [(op, arg, "int", [3, -4, 5, 6]) for op, arg in KINDS if op == "allreduce"] + [
    (op, root, schema, SAMPLES[schema]) for op, schema in KINDS if op != "allreduce"
    for root in (0, 3)]

MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}


def run(comm, program):
    """Run ``program`` both ways; the list of (step index, typed, pickled) that differ."""
    rank, size = comm.rank, comm.size
    diffs = []
    for i, (op, arg, schema, values) in enumerate(program):
        mine = values[rank]
        root = arg % size if op in ("gather", "bcast") else 0
        if op == "allgather":
            typed = comm.allgather(mine, schema=SCHEMAS[schema])
            pickled = WORLD.allgather(mine)
        elif op == "gather":
            typed = comm.gather(mine, root, schema=SCHEMAS[schema])
            pickled = WORLD.gather(mine, root)
        elif op == "bcast":
            typed = comm.bcast(mine if rank == root else None, root, schema=SCHEMAS[schema])
            pickled = WORLD.bcast(mine if rank == root else None, root)
        else:
            typed = comm.allreduce(mine, op=arg)
            pickled = WORLD.allreduce(mine, op=MPI_OPS[arg])
        if not equal(typed, pickled):
            diffs.append((i, typed, pickled))
    return diffs


chk = Checker("core_property")
comm = tc.TypedComm(MPI.COMM_WORLD)
rank, size = comm.rank, comm.size
examples = [0]
overflowing = [0]  # examples with a payload beyond what a fresh slot holds inline


def send_program(program):
    WORLD.Ibarrier().Wait()
    WORLD.bcast(program, root=0)


def receive_program():
    # Idle ranks sleep while rank 0 draws: on 2 cores, 4 busy-polling ranks slow hypothesis 3x.
    request = WORLD.Ibarrier()
    while not request.Test():
        time.sleep(0.0005)
    return WORLD.bcast(None, root=0)


def run_everywhere(program):
    """Called on rank 0 for each example; the other ranks run it from the broadcast."""
    send_program(program)
    return run_and_agree(program)


def run_and_agree(program):
    diffs = run(comm, program)
    verdicts = WORLD.allgather((diffs, comm.seq, slot_size(comm)))
    examples[0] += 1
    return verdicts


if rank == 0:
    print(f"hypothesis: derandomized, {EXAMPLES} examples, {size} ranks", flush=True)

    @settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.lists(steps(), min_size=1, max_size=10))
    def test_programs(program):
        if any(len(msgspec.msgpack.encode(v)) > MIN_SLOT - HEADER_SIZE for _, _, _, values in program
               for v in values[:size]):
            overflowing[0] += 1
        verdicts = run_everywhere(program)
        for r, (diffs, seq, slot) in enumerate(verdicts):
            assert not diffs, f"rank {r}: typed and pickled results differ: {diffs!r}"
        assert len({(seq, slot) for _, seq, slot in verdicts}) == 1, verdicts

    try:
        coverage = run_everywhere(COVERAGE)
        test_programs()
    finally:
        send_program(None)  # releases the other ranks, even when a failure propagates
    print(f"hypothesis: {overflowing[0]} of {examples[0]} examples overflowed a slot",
          flush=True)
    chk.true("a fair share of examples overflow", overflowing[0] >= examples[0] // 5)
    chk.eq("the coverage program", [diffs for diffs, _, _ in coverage], [[]] * size)
else:
    while (program := receive_program()) is not None:
        run_and_agree(program)

if rank != 0:
    chk.count += 2  # the two checks above, made on rank 0 only
chk.true("ran examples", examples[0] >= 1)
chk.same("every rank ran every example", examples[0])
chk.done()
