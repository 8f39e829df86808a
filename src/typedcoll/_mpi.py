"""The MPI transport: raw byte collectives over an mpi4py intracommunicator.

It moves bytes and knows nothing of envelopes. Every method takes an optional ``deadline``
(a ``time.monotonic()`` value): without one it calls the blocking MPI primitive, with one the
nonblocking primitive and waits until the deadline, raising :class:`TransportTimeout`.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional

import numpy as np
from mpi4py import MPI

from ._callsite import register_internal
from ._transport import TransportTimeout

_MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}

# Waiting with a deadline: spin on Test() first (a collective about to complete should not pay a
# wake-up), then yield the core between tests (ranks that oversubscribe cores need it to make
# progress: sleeping instead cost ~80 ms per executor iteration at 4 ranks on 2 cores), and only
# after a while sleep with backoff, so a rank waiting for a stuck peer does not burn a core.
_SPIN_TESTS = 200
_YIELD_SECONDS = 0.05
_MAX_SLEEP = 0.002


def wait_until(request: MPI.Request, deadline: float) -> None:
    for _ in range(_SPIN_TESTS):
        if request.Test():
            return
    now = time.monotonic()
    yield_until = min(now + _YIELD_SECONDS, deadline)
    while now < yield_until:
        os.sched_yield()
        if request.Test():
            return
        now = time.monotonic()
    pause = 1e-4
    while not request.Test():
        if time.monotonic() >= deadline:
            raise TransportTimeout()
        time.sleep(pause)
        pause = min(pause * 2, _MAX_SLEEP)


def direct_allgather(comm: MPI.Intracomm) -> Optional[object]:
    """The C fast path's binding of MPI_Allgather over ``comm`` (``_speedups.direct``), or None.

    None, and the fast path calls ``comm.Allgather`` instead, when the extension is not built,
    the platform cannot look symbols up, mpi4py does not report where its handles live, or
    ``TYPEDCOLL_DIRECT_MPI=0`` is set (to compare the two, or for an MPI profiling tool that
    interposes only on mpi4py's own calls).
    """
    if os.environ.get("TYPEDCOLL_DIRECT_MPI", "1") == "0":
        return None
    try:
        from . import _speedups
        handle_size = MPI._sizeof(MPI.Comm)
        if MPI._sizeof(MPI.Datatype) != handle_size:
            return None
        return _speedups.direct(MPI.__file__, comm, MPI._addressof(comm), MPI.BYTE.handle,
                                MPI.COMM_NULL.handle, handle_size, comm.Get_size(),
                                MPI.Exception)
    except (ImportError, AttributeError, TypeError, ValueError, OverflowError):
        return None


def comm_name(comm: MPI.Comm) -> str:
    if comm == MPI.COMM_WORLD:
        return "COMM_WORLD"
    if comm == MPI.COMM_SELF:
        return "COMM_SELF"
    name = comm.Get_name()
    return name.removeprefix("MPI_") if name else "comm"


def _displacements(counts: List[int]) -> List[int]:
    displs, total = [], 0
    for c in counts:
        displs.append(total)
        total += c
    return displs


class MPITransport:
    """Byte collectives over a private duplicate of the user's communicator."""

    kind = "mpi"

    def __init__(self, comm: MPI.Intracomm) -> None:
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise TypeError(f"expected an mpi4py intracommunicator, got {comm!r}")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        # The hot path: bound once, called with (send, recv) byte buffers.
        self.allgather_slots = comm.Allgather
        self._direct = direct_allgather(comm)

    @property
    def direct_allgather(self) -> Optional[object]:
        """The C fast path's own binding of ``allgather_slots`` (see :func:`direct_allgather`),
        only while ``allgather_slots`` is still ``comm.Allgather``: a replaced one (tracing,
        fault injection) must see every call."""
        return self._direct if self.allgather_slots == self.comm.Allgather else None

    def allgather_slots_until(self, send: bytearray, recv: bytearray, deadline: float) -> None:
        wait_until(self.comm.Iallgather(send, recv), deadline)

    def allgatherv(self, send: bytes, counts: List[int],
                   deadline: Optional[float] = None) -> bytearray:
        recv = bytearray(sum(counts))
        spec = [recv, (counts, _displacements(counts)), MPI.BYTE]
        if deadline is None:
            self.comm.Allgatherv([send, len(send), MPI.BYTE], spec)
        else:
            wait_until(self.comm.Iallgatherv([send, len(send), MPI.BYTE], spec), deadline)
        return recv

    def gatherv(self, send: bytes, counts: List[int], root: int,
                deadline: Optional[float] = None) -> Optional[bytearray]:
        recv = bytearray(sum(counts)) if self.rank == root else None
        spec = [recv, (counts, _displacements(counts)), MPI.BYTE] if recv is not None else None
        if deadline is None:
            self.comm.Gatherv([send, len(send), MPI.BYTE], spec, root=root)
        else:
            wait_until(self.comm.Igatherv([send, len(send), MPI.BYTE], spec, root=root), deadline)
        return recv

    def bcast_bytes(self, buf: bytearray, root: int, deadline: Optional[float] = None) -> None:
        if deadline is None:
            self.comm.Bcast([buf, len(buf), MPI.BYTE], root=root)
        else:
            wait_until(self.comm.Ibcast([buf, len(buf), MPI.BYTE], root=root), deadline)

    def allreduce_array(self, arr: np.ndarray, op: str,
                        deadline: Optional[float] = None) -> np.ndarray:
        send = np.ascontiguousarray(arr)
        out = np.empty_like(send)
        if deadline is None:
            self.comm.Allreduce(send, out, op=_MPI_OPS[op])
        else:
            wait_until(self.comm.Iallreduce(send, out, op=_MPI_OPS[op]), deadline)
        return out

    def split(self, color: Optional[int], key: int) -> Optional["MPITransport"]:
        sub = self.comm.Split(MPI.UNDEFINED if color is None else color, key)
        return None if sub == MPI.COMM_NULL else MPITransport(sub)

    def dup(self) -> "MPITransport":
        return MPITransport(self.comm.Dup())

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)

    def free(self) -> None:
        if self.comm not in (MPI.COMM_WORLD, MPI.COMM_SELF, MPI.COMM_NULL):
            self.comm.Free()


register_internal(__file__)
