"""What the protocol needs from a backend: fixed-size and variable-size byte collectives.

A transport moves bytes and knows nothing of envelopes. Implementations: ``_mpi.MPITransport``
(mpi4py) and ``_torch.TorchTransport`` (torch.distributed). Every method but the first takes an
optional ``deadline`` (a ``time.monotonic()`` value) and raises :class:`TransportTimeout` when
the backend operation has not completed by then; it is then still pending.

    rank, size, kind                                    ints, and "mpi" / "torch"
    allgather_slots(send, recv)                         blocking; len(recv) == size * len(send)
    allgather_slots_until(send, recv, deadline)         the same, bounded by deadline
    allgatherv(send, counts, deadline) -> bytearray     counts[r] bytes from rank r, concatenated
    gatherv(send, counts, root, deadline) -> bytearray | None   (None off the root)
    bcast_bytes(buf, root, deadline)                    in place
    allreduce_array(array, op, deadline) -> ndarray     op in "sum" "max" "min" "prod"
    split(color, key) -> transport | None;  dup() -> transport;  abort(code);  free()
"""

from __future__ import annotations


class TransportTimeout(Exception):
    """The backend collective did not complete by its deadline (it is still pending)."""
