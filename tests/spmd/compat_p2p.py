"""SPMD: typed point to point over MPI (the private p2p communicator), at 2 and 4 ranks.

A ring of records whose receivers name no schema, tags taken out of order, wildcard sources,
a large exchange both ways at once (no deadlock), then the mismatches: the receiver of a send
with another schema raises DesyncError naming both call sites, a value that does not encode
raises on its sender and PeerError on its receiver, and a receive with nothing to receive times
out naming its source, leaving the communicator usable. Last, a message left unreceived on a
freed communicator is not taken by the next one's receive.
"""

import os

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from spmd.harness import WORLD, Checker


class Token(msgspec.Struct):
    hop: int
    payload: np.ndarray


class Other(msgspec.Struct):
    hop: int


def line_of(marker: str) -> str:
    with open(__file__) as source:
        for number, line in enumerate(source, 1):
            if marker in line and "line_of" not in line:
                return f"{os.path.basename(__file__)}:{number}"
    raise AssertionError(marker)


def main() -> None:
    chk = Checker("compat_p2p")
    comm = tc.TypedComm(MPI.COMM_WORLD, timeout=20)
    r, n = comm.rank, comm.size
    right, left = (r + 1) % n, (r - 1) % n

    # A ring: each rank's record reaches its right neighbour as its own class.
    sending = comm.isend(Token(r, np.arange(r + 1)), right, tag=1)
    got = comm.recv(left, 1)
    sending.wait()
    chk.eq("ring: class", type(got).__name__, "Token")
    chk.eq("ring: value", (got.hop, got.payload), (left, np.arange(left + 1)))

    # Tags out of order, then wildcards in arrival order.
    if r == 0:
        for tag in (3, 4):
            comm.send(f"tag{tag}", 1, tag=tag)
        chk.count += 2
    elif r == 1:
        chk.eq("tag 4 first", comm.recv(0, 4), "tag4")
        chk.eq("then any tag", comm.recv(None, None), "tag3")
    else:
        chk.count += 2

    # Every other rank reports to rank 0, which takes them from any source.
    if r == 0:
        seen = sorted(comm.recv(None, 7) for _ in range(n - 1))
        chk.eq("any source", seen, list(range(1, n)))
    else:
        comm.send(r, 0, tag=7)
        chk.count += 1

    # A large exchange both ways at once: neither send waits for the other's receive.
    big = np.full(300_000, r, dtype=np.int64)
    got = comm.sendrecv(big, right, left, sendtag=8, recvtag=8)
    chk.eq("large sendrecv", (got.shape, int(got[0])), ((300_000,), left))

    if n >= 2:  # at least two ranks (the test runs at 2 and 4)
        # A send matched with the wrong receive: the receiver names both sites.
        if r == 0:
            comm.send(Token(0, np.zeros(1)), 1, tag=9)  # TOKEN-SEND
            chk.count += 2
        elif r == 1:
            with chk.expect(tc.DesyncError, "schema mismatch") as err:
                comm.recv(0, 9, schema=Other)  # OTHER-RECV
            err.message(f"recv #0 from rank 0 (tag 9) on COMM_WORLD diverged (schema):\n"
                        f"  rank 0: send[Token] at {line_of('# TOKEN-SEND')}, its 1st call\n"
                        f"  rank 1: recv[Other] at {line_of('# OTHER-RECV')}, its 1st call")
        else:
            chk.count += 2

        # A value that does not encode: EncodeError on the sender, PeerError on the receiver.
        if r == 0:
            with chk.expect(tc.EncodeError, "unencodable send"):
                comm.send({1j: 2}, 1, tag=10)
            chk.count += 1
        elif r == 1:
            with chk.expect(tc.PeerError, "peer of unencodable send") as err:
                comm.recv(0, 10)
            chk.eq("peer error names the sender", err.error.ranks, (0,))
        else:
            chk.count += 2

    # Nothing to receive: a timeout naming the source; the communicator stays usable.
    short = tc.TypedComm(MPI.COMM_WORLD, timeout=0.5)
    if r == 0:
        with chk.expect(tc.CollectiveTimeout, "recv timeout") as err:
            short.recv(left, 11)
        chk.eq("timeout names the source", err.error.missing, (left,))
    else:
        chk.count += 2
    WORLD.Barrier()
    chk.eq("usable afterwards", short.allgather(r), list(range(n)))

    # A message never received on a freed communicator stays with it. MPICH sends a small one at
    # once and hands the freed context to the next communicator: the next dup's first receive
    # took it as its own ("stale" for "fresh"), with no error, every time.
    for make in (lambda: comm.dup(), lambda: comm.split(0, name="pair")):
        old = make()
        if r == 0:
            old.isend(Other(-1), 1, tag=12).wait()
        old.free()
        new = make()
        if r == 0:
            new.send(Other(1), 1, tag=12)
        elif r == 1:
            chk.eq("a freed communicator's message stays with it", new.recv(0, 12), Other(1))
        chk.count += r != 1
        new.free()
    short.free()
    comm.free()
    chk.done()


main()
