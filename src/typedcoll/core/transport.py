"""What the protocol needs from a backend, and the exchange every transport implements alike.

A transport moves bytes and knows nothing of schemas or verdicts. Implementations: ``mpi``
(mpi4py), ``torch`` (torch.distributed, gloo) and ``memory`` (threads of one process, for
``typedcoll.testing``). Every method that communicates takes a ``deadline`` (a
``time.monotonic()`` value, or None to wait forever) and raises :class:`TransportTimeout` when it
has not completed by then; the operation is then still pending and the transport unusable.
``None`` also tells a backend that every rank of the call passes None (phase 2 after an agreed
verdict, on a communicator created without a timeout), so it may use a blocking form that only
matches itself; a cold path with no deadline passes ``math.inf``, which waits forever too.

The exchange (phase 1 of every typed collective)
------------------------------------------------
``exchange(send, recv, block, shape, deadline)``: ``send`` is this rank's slot (header, inline
payload). Afterwards ``block`` holds the agreement block over every rank (``core.wire``), and

* ``shape == GATHER``: ``recv`` holds every rank's slot, in rank order;
* ``shape == REDUCE``: ``recv[HEADER_SIZE:]`` holds the OR of every rank's inline payload (only a
  root sends one: a bcast's payload arrives on every rank).

Ranks may disagree about the shape (one calls allgather, its peer bcast). The exchange must then
still complete on every rank, and the agreement block then says that the headers differ, so that
every rank reaches the same verdict in the same call and never meets undefined backend
behaviour. Transports that gather every slot get this for free (:func:`finish_gathered`); the MPI
transport runs one point-to-point schedule for both shapes (``transports.mpi``).
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Tuple, Union

import numpy as np

from .wire import (FLAG_OVERFLOW, FLAGS_OFFSET, GATHER, HEADER_SIZE, LENGTH_OFFSET, block_length,
                   fold)


class TransportTimeout(Exception):
    """The backend operation did not complete by its deadline (it is still pending)."""


class TransportFailure(TransportTimeout):
    """The backend failed the operation before its deadline, or with none (gloo, when a peer's
    process or connection is gone). A kind of timeout to the protocol: the call cannot complete
    and the channel is unusable after it, so every path that handles a timeout handles this."""


def failure_of(exc: Optional[BaseException]) -> str:
    """The backend's own error text when ``exc`` is a TransportFailure, else "" (a timeout)."""
    return str(exc)[:300] if isinstance(exc, TransportFailure) else ""


class Transport(Protocol):
    """The byte-level operations the protocol runs on (see the module docstring)."""

    kind: str  # "mpi", "torch" or "memory"
    rank: int
    size: int
    # The largest slot the slot-size rule may choose (wire.SlotPolicy); the same on every rank.
    max_slot: int

    def exchange(self, send: bytearray, recv: bytearray, block: bytearray, shape: int,
                 deadline: Optional[float]) -> None: ...

    def allgatherv(self, send: bytes, counts: List[int],
                   deadline: Optional[float]) -> bytearray: ...

    def gatherv(self, send: bytes, counts: List[int], root: int,
                deadline: Optional[float]) -> Optional[bytearray]: ...

    # The parts operations learn their counts themselves (lengths first): after a REDUCE
    # exchange only the sender of each part knows its length.
    def gather_parts(self, send: bytes, root: int,
                     deadline: Optional[float]) -> Optional[List[bytes]]: ...

    def scatter_parts(self, parts: Optional[List[bytes]], root: int,
                      deadline: Optional[float]) -> bytes: ...

    def alltoall_parts(self, parts: Optional[List[bytes]],
                       deadline: Optional[float]) -> List[bytes]: ...

    def bcast_bytes(self, buf: bytearray, root: int, deadline: Optional[float]) -> None: ...

    def allreduce_array(self, array: np.ndarray, op: str,
                        deadline: Optional[float]) -> np.ndarray: ...

    def split(self, color: Optional[int], key: int) -> Optional["Transport"]: ...

    def dup(self) -> "Transport": ...

    def abort(self, code: int) -> None: ...

    # Each member's rank in the job (MPI's COMM_WORLD, torch's default group), in this
    # communicator's rank order; None where the backend cannot tell. Messages use it.
    def world_ranks(self) -> Optional[List[int]]: ...

    # A rank that gave up on a call tells its peers: ``failure`` is the backend's error where it
    # failed the call, "" where the deadline passed. A peer that completes a call after another
    # gave up on it must fail it too: ``given_up`` returns the (rank, call number) of each notice
    # received so far (``transports.mpi`` explains when a late rank can complete such a call;
    # where it cannot, gloo, its backend fails the call, and the notices tell that failure from a
    # dead peer's). A transport whose backend fails a call on some ranks only (gloo, with a dead
    # peer) ends its peers' waits with the failure it reports.
    def give_up(self, seq: int, failure: str) -> None: ...

    def given_up(self) -> List[Tuple[int, int]]: ...

    # (peer, seq) of the peers whose call this transport's backend failed (gloo fails a waiting
    # rank's call once a peer gave up): they left the call too. Empty where no backend fails a
    # call so (MPI, memory).
    def failed_in(self) -> List[Tuple[int, int]]: ...

    # ``settled``: every rank freed it together, with no message of it in flight. Where a rank
    # released it alone, or a call on it was abandoned, peers may still send to it: a backend
    # that hands a freed communicator's resources to a later one (MPI reuses its context, and
    # messages sent to the freed one are then received by the new one) keeps them instead.
    def free(self, settled: bool = True) -> None: ...

    # Typed point to point: one message, its envelope first (on a communicator of its own).
    def send_bytes(self, data: bytes, dest: int, tag: int,
                   deadline: Optional[float]) -> None: ...

    def recv_bytes(self, source: int, tag: int, deadline: Optional[float]) -> bytes: ...


def inline_length(header: Union[bytes, bytearray], width: int) -> int:
    """How many payload bytes sit inline after ``header`` in a slot of ``width`` payload bytes
    (none when the payload overflowed)."""
    if header[FLAGS_OFFSET] & FLAG_OVERFLOW:
        return 0
    return min(int.from_bytes(header[LENGTH_OFFSET:LENGTH_OFFSET + 4], "little"), width)


def finish_gathered(recv: bytearray, slot: int, size: int, block: bytearray, shape: int) -> None:
    """Complete an exchange from every rank's gathered slot (``recv``).

    The REDUCE shape's payload region is the OR of each slot's *inline* bytes only: a slot also
    carries stale bytes past its length, which must not leak into the root's payload. The region
    is written up to the OR of the lengths (what a reader may read, the same on every rank), not
    the whole slot: a large slot would cost a barrier a slot-sized integer per call.
    """
    fold(recv, slot, size, block)
    if shape == GATHER:
        return
    width = slot - HEADER_SIZE
    acc = 0
    for r in range(size):
        start = r * slot + HEADER_SIZE
        n = inline_length(recv[r * slot:start], width)
        acc |= int.from_bytes(recv[start:start + n], "little")
    filled = min(block_length(block), width)
    recv[HEADER_SIZE:HEADER_SIZE + filled] = acc.to_bytes(filled, "little") \
        if acc.bit_length() <= 8 * filled else bytes(filled)


def displacements(counts: List[int]) -> List[int]:
    displs, total = [], 0
    for c in counts:
        displs.append(total)
        total += c
    return displs
