"""Where a typed allgather's time goes: its floor, its exchange, its Python steps, its copies.

Run: ``mpiexec -n 2 python bench/core_decompose.py [--rounds R] [--iters I] [--json F]``
(``TYPEDCOLL_PURE_PYTHON=1`` for the Python path where the C extension is built; Open MPI:
``mpirun --oversubscribe --bind-to core -n N ...``). ``--cases "1 MiB array" ...`` picks a
subset.

Small record (``RankState``), interleaved like every benchmark:
  raw64        ``comm.Allgather`` of a 64-byte numpy buffer (the floor)
  exchange     the typed phase 1 alone: ``transport.exchange`` of this rank's slot (C engine
               where bound, else the Python Sendrecv rounds)
  exchange+codec  the same plus msgspec's own work: encode the record once, decode N payloads
  typed        ``TypedComm.allgather``; typed_norec: the same with the flight recorder off
  py_call, py_start, py_encode, py_verdict, py_decode   the Python steps alone, no
               communication: the Call record, start (identity, sequence, recorder), encode and
               header, the verdict from the agreement block, decoding N payloads
Large payloads (64 KiB and 1 MiB float64 arrays, a list of 2,048 ints as ``list[int]``):
  raw          ``comm.Allgather`` of the same bytes (the floor); pickle: mpi4py ``allgather``
  typed        ``TypedComm.allgather``, and its steps alone: encode (``Protocol.encode``),
               exchange (phase 1: the header slot), allgatherv (phase 2 as the protocol calls
               it), decode (N payloads from phase 2's buffer)
  copy_free    what the protocol costs without its extra copies: phase 1, then one Allgatherv
               from the value's own memory (the list: its msgpack bytes) into one
               uninitialised buffer, then N arrays viewed in place (the list: N msgspec
               decodes with no nesting scan)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from harness import records, report, timing
from typedcoll.core import ops, payloads
from typedcoll.core.wire import GATHER

SMALL = "RankState"
# case -> (value of a rank, schema typed calls name)
LARGE: Dict[str, Tuple[Callable[[int], Any], Any]] = {
    "64 KiB array": (lambda r: records.array(r, 64 << 10), None),
    "1 MiB array": (lambda r: records.array(r, 1 << 20), None),
    "2,048 ints": (records.int_list, List[int]),
}
METHODS = ("raw64", "raw", "exchange", "exchange+codec", "typed", "typed_norec", "pickle",
           "encode", "allgatherv", "decode", "copy_free", "py_call", "py_start", "py_encode",
           "py_verdict", "py_decode")
RATIOS = ([report.Ratio(SMALL, "typed", "raw64", ("<=", 1.5)),
           report.Ratio(SMALL, "exchange", "raw64"),
           report.Ratio(SMALL, "exchange+codec", "raw64")]
          + [r for case, goal in (("64 KiB array", 1.1), ("1 MiB array", 1.0), ("2,048 ints", 1.0))
             for r in (report.Ratio(case, "typed", "raw",
                                    ("<=", 1.25) if "array" in case else None),
                       report.Ratio(case, "typed", "pickle", ("<=", goal)),
                       report.Ratio(case, "copy_free", "raw",
                                    ("<=", 1.25) if "array" in case else None),
                       report.Ratio(case, "copy_free", "pickle", ("<=", goal)))])


def small_cells(world: MPI.Intracomm, raw: MPI.Intracomm) -> List[timing.Cell]:
    size = world.size
    record = records.rank_state(world.rank)
    typed = tc.TypedComm(world)
    stages = tc.TypedComm(world, name="stages")
    previous = os.environ.get("TYPEDCOLL_TRACE_BUFFER")
    os.environ["TYPEDCOLL_TRACE_BUFFER"] = "0"  # read when a communicator is created
    unrecorded = tc.TypedComm(world)
    if previous is None:
        del os.environ["TYPEDCOLL_TRACE_BUFFER"]
    else:
        os.environ["TYPEDCOLL_TRACE_BUFFER"] = previous
    small, small_out = np.zeros(64, np.uint8), np.zeros(64 * size, np.uint8)
    decoder, encoder = msgspec.msgpack.Decoder(records.RankState), msgspec.msgpack.Encoder()
    encoded = encoder.encode(record)
    stages.allgather(record)  # its buffers now hold a steady-state exchange to replay
    p = stages._p
    transport = p.transport

    def exchange() -> None:
        transport.exchange(p.send, p.recv, p.block, GATHER, None)

    def exchange_codec() -> None:
        exchange()
        encoder.encode(record)
        for _ in range(size):
            decoder.decode(encoded)

    call = ops.value_call("allgather", GATHER, record, None, None, None)

    def start() -> None:
        p.start(call)  # every rank numbers the same calls alike: sequences stay equal
        p.completed(call)

    def encode() -> None:
        payload, _ = p.encode(call)
        p.write(call, payload, 0)

    calls: Dict[str, Callable[[], Any]] = {
        "raw64": lambda: raw.Allgather(small, small_out),
        "exchange": exchange, "exchange+codec": exchange_codec,
        "typed": lambda: typed.allgather(record),
        "typed_norec": lambda: unrecorded.allgather(record),
        "py_call": lambda: ops.value_call("allgather", GATHER, record, None, None, None),
        "py_start": start, "py_encode": encode,
        "py_verdict": lambda: p.after_exchange(call),
        "py_decode": lambda: ops._decode_all(p, call),
    }
    return [timing.Cell(SMALL, m, calls[m]) for m in METHODS if m in calls]


def large_cells(world: MPI.Intracomm, raw: MPI.Intracomm, case: str, build: Callable[[int], Any],
                schema: Any) -> Tuple[List[timing.Cell], List[str]]:
    rank, size = world.rank, world.size
    value = build(rank)
    expected = [build(r) for r in range(size)]
    typed = tc.TypedComm(world)
    wrong = records.problem(typed.allgather(value, schema=schema), expected, f"{case} typed")
    p = typed._p
    transport = p.transport
    call = ops.value_call("allgather", GATHER, value, schema, None, None)
    payload, error = p.encode(call)
    assert error is None, error
    # An array past its slot moves its own memory in phase 2; its dtype and shape ride inline.
    split = call.split
    moved = split[1] if split is not None else payload
    counts = world.allgather(len(moved))
    phase2 = transport.allgatherv(moved, counts, None)
    offsets = np.cumsum([0] + counts[:-1]).tolist()
    bufs: List[Any] = [memoryview(phase2)[o:o + c] for o, c in zip(offsets, counts)]
    if split is not None:
        bufs = [payloads.SplitArray(split[0], b) for b in bufs]
    is_array = isinstance(value, np.ndarray)
    floors = [x.tobytes() if is_array else msgspec.msgpack.encode(x) for x in expected]
    width = max(len(f) for f in floors)
    floor_send = np.frombuffer(floors[rank].ljust(width, b"\0"), np.uint8).copy()
    floor_recv = np.empty(width * size, np.uint8)

    # The copy-free design: the data moves once, from the value's memory to its final place.
    data_counts = [len(f) for f in floors]
    data_offsets = np.cumsum([0] + data_counts[:-1]).tolist()
    spec = (data_counts, data_offsets)
    decoder = msgspec.msgpack.Decoder(List[int])

    def copy_free() -> List[Any]:
        transport.exchange(p.send, p.recv, p.block, GATHER, None)
        out = np.empty(sum(data_counts), np.uint8)
        source = value if is_array else msgspec.msgpack.encode(value)
        transport.comm.Allgatherv([source, MPI.BYTE], [out, spec, MPI.BYTE])
        if is_array:
            return [np.frombuffer(out, value.dtype, c // value.itemsize, o).reshape(value.shape)
                    for o, c in zip(data_offsets, data_counts)]
        view = out.data
        return [decoder.decode(view[o:o + c]) for o, c in zip(data_offsets, data_counts)]
    problems = [x for x in (wrong, records.problem(copy_free(), expected, f"{case} copy_free"))
                if x]

    calls: Dict[str, Callable[[], Any]] = {
        "raw": lambda: raw.Allgather(floor_send, floor_recv),
        "pickle": lambda: raw.allgather(value),
        "typed": lambda: typed.allgather(value, schema=schema),
        "encode": lambda: p.encode(call),
        "exchange": lambda: transport.exchange(p.send, p.recv, p.block, GATHER, None),
        "allgatherv": lambda: transport.allgatherv(moved, counts, None),
        "decode": lambda: [payloads.decode(p, call, b, r) for r, b in enumerate(bufs)],
        "copy_free": copy_free,
    }
    return [timing.Cell(case, m, calls[m]) for m in METHODS if m in calls], problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing.add_arguments(parser, rounds=11, iters=2000)
    parser.add_argument("--cases", nargs="+", default=[SMALL, *LARGE],
                        help=f"a subset of {[SMALL, *LARGE]}")
    args = parser.parse_args(argv)
    settings = timing.Settings(args)
    wanted = args.cases
    unknown = [c for c in wanted if c != SMALL and c not in LARGE]
    if unknown:
        raise SystemExit(f"expected cases among {[SMALL, *LARGE]}, got {unknown}")
    world = MPI.COMM_WORLD
    control, raw = world.Dup(), world.Dup()
    probe = tc.TypedComm(world)
    cells: List[timing.Cell] = []
    problems: List[str] = []
    if SMALL in wanted:
        cells += small_cells(world, raw)
    for case, (build, schema) in LARGE.items():
        if case in wanted:
            more, wrong = large_cells(world, raw, case, build, schema)
            cells += more
            problems += wrong
    report.stop_on_wrong_results(control, problems)
    results = timing.measure(control, cells, settings)
    if results is None:
        return 0
    doc = report.document("core_decompose", "where a typed allgather's time goes", world.size,
                          settings.as_dict(), results, RATIOS, report.versions(probe))
    doc["notes"].append("py_* and encode/decode rows run on one rank without communicating; "
                        "the rest are collectives")
    large = [c for c in LARGE if c in wanted]
    both = SMALL in wanted and bool(large)
    print(report.table(doc, METHODS, cases=[SMALL] if SMALL in wanted else large,
                       with_summary=not both))
    if both:
        print()
        print(report.table(doc, METHODS, cases=large, with_header=False))
    report.write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
