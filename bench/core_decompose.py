"""Where a checked allgather's time goes, at the core issue's 2 ranks: the floor, the floor plus
msgspec's own work, and typedcoll with and without its flight recorder, interleaved in one run.

Run: ``mpiexec -n 2 python bench/core_decompose.py``

  raw64_np       comm.Allgather of a 64-byte numpy buffer (the core issue's floor)
  raw128_ba      comm.Allgather of 128-byte bytearrays (typedcoll's slot size and buffer type)
  raw128_direct  MPI_Allgather of the same bytearrays called from C through typedcoll's binding
                 (_speedups.direct: no mpi4py argument parsing), which the typed path uses
  raw128+encdec  raw128_ba plus what any decoded path must do: msgspec-encode the record once and
                 decode one payload per rank, in plain Python, without typedcoll
  typed          TypedComm.allgather (envelope, check, flight recorder, decode)
  typed_mpi4py   the same exchanging through mpi4py's comm.Allgather (TYPEDCOLL_DIRECT_MPI=0)
  typed_norec    the same with TYPEDCOLL_TRACE_BUFFER=0
"""

import os
import statistics
import time

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from _record import RankState  # bench/ is on sys.path when a script runs
from typedcoll import _speedups
from typedcoll._mpi import direct_allgather


def main() -> None:
    world = MPI.COMM_WORLD
    record = RankState(world.rank, 3, 17)
    recorded = tc.TypedComm(world)
    os.environ["TYPEDCOLL_DIRECT_MPI"] = "0"  # read when a communicator is created
    through_mpi4py = tc.TypedComm(world)
    del os.environ["TYPEDCOLL_DIRECT_MPI"]
    os.environ["TYPEDCOLL_TRACE_BUFFER"] = "0"
    unrecorded = tc.TypedComm(world)
    raw = world.Dup()
    binding = direct_allgather(raw)
    if binding is None or through_mpi4py._p.transport.direct_allgather is not None:
        raise SystemExit("expected the direct MPI binding here (C extension built, mpi4py 4)")
    small, small_out = np.zeros(64, np.uint8), np.zeros(64 * world.size, np.uint8)
    slot, slots = bytearray(128), bytearray(128 * world.size)
    decoder, encoder = msgspec.msgpack.Decoder(RankState), msgspec.msgpack.Encoder()
    payload = encoder.encode(record)

    def encode_decode() -> None:
        encoder.encode(record)
        for _ in range(world.size):
            decoder.decode(payload)

    methods = {
        "raw64_np": lambda: raw.Allgather(small, small_out),
        "raw128_ba": lambda: raw.Allgather(slot, slots),
        "raw128_direct": lambda: _speedups.exchange(binding, slot, slots),
        "raw128+encdec": lambda: (raw.Allgather(slot, slots), encode_decode()),
        "typed": lambda: recorded.allgather(record),
        "typed_mpi4py": lambda: through_mpi4py.allgather(record),
        "typed_norec": lambda: unrecorded.allgather(record),
    }
    samples = {name: [] for name in methods}
    for _ in range(15):
        for name, fn in methods.items():
            for _ in range(300):
                fn()
            raw.Barrier()
            t0 = time.perf_counter()
            for _ in range(2000):
                fn()
            samples[name].append((time.perf_counter() - t0) / 2000 * 1e6)
    worst = {name: max(world.allgather(statistics.median(v))) for name, v in samples.items()}
    if world.rank == 0:
        print(f"# {world.size} ranks; 15 interleaved rounds x 2000 calls; median, slowest rank; us")
        for name, us in worst.items():
            print(f"{name:<14} {us:6.2f}")


if __name__ == "__main__":
    main()
