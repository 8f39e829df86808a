"""Typed point to point, the transport side: the envelope, and matching messages to receives.

Every message travels with the one transport tag ``TRANSPORT_TAG``; the caller's tag rides in
the envelope and messages are matched here, as MPI matches them: a receive takes the first
message, in arrival order from each source, whose communicator instance, source and tag fit
(either may be a wildcard), and posted receives are served in the order they were posted. One
mailbox per private channel, shared by the TypedComms on it. ``core.p2p`` checks what the
matched message says.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, List, Optional

import msgspec

from .errors import CollectiveError
from .plumbing import register_internal
from .mismatch import comm_name
from .transport import TransportTimeout, failure_of

if TYPE_CHECKING:
    from .p2p import RecvRequest

TRANSPORT_TAG = 0  # the private channel carries nothing else; the caller's tag is in the envelope
LENGTH_PREFIX = 4
_POLL_MIN, _POLL_MAX = 1e-5, 1e-3  # backoff between polls of several sources
# Transports whose receive with a deadline already passed only looks, leaving nothing pending:
# receives from any rank, and test(), poll with it.
_CAN_POLL = frozenset({"mpi", "memory"})


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """What a send says about its message; the receiver checks it before decoding."""

    instance: int  # the communicator instance on the shared channel
    source: int
    tag: int
    seq: int  # this message's number among the sender's messages to (dest, tag)
    schema: str
    fingerprint: bytes
    path: str  # module:qualname of the schema class ("" when it is not one)
    kind: int  # KIND_MSGSPEC, KIND_ARRAY or KIND_NUMPY_SCALAR
    name: Optional[str]
    site: str
    occurrence: int
    step: Optional[int]
    error: Optional[str] = None  # the sender could not encode its value: this is why


ENVELOPE_ENCODER = msgspec.msgpack.Encoder()
_ENVELOPE_DECODER = msgspec.msgpack.Decoder(Envelope)


def _peer(rank: Optional[int], what: str) -> str:
    return f"{what} rank {rank}" if rank is not None else f"{what} any rank"


def _tag_text(tag: Optional[int]) -> str:
    return f"tag {tag}" if tag is not None else "any tag"


def head_text(op: str, seq: Optional[int], peer: Optional[int], tag: Optional[int],
          comm: str) -> str:
    """``recv #2 from rank 0 (tag 5) on WORLD``: how point-to-point messages start."""
    number = f" #{seq}" if seq is not None else ""
    way = "to" if op in ("send", "isend") else "from"
    return f"{op}{number} {_peer(peer, way)} ({_tag_text(tag)}) on {comm}"


class Message:
    __slots__ = ("envelope", "payload", "source", "error")

    def __init__(self, envelope: Optional[Envelope], payload: memoryview, source: int,
                 error: Optional[str]) -> None:
        self.envelope = envelope
        self.payload = payload
        self.source = source
        self.error = error  # the envelope itself did not decode


def parse(data: bytes, source: int) -> Message:
    view = memoryview(data)
    n = int.from_bytes(view[:LENGTH_PREFIX], "little")
    try:
        envelope = _ENVELOPE_DECODER.decode(view[LENGTH_PREFIX:LENGTH_PREFIX + n])
    except Exception as exc:  # untrusted bytes: any decoder failure is a decode error
        return Message(None, view[:0], source, f"{type(exc).__name__}: {exc}")
    return Message(envelope, view[LENGTH_PREFIX + n:], source, None)


class Mailbox:
    """The messages of one private channel that arrived before a receive wanted them, and the
    receives posted before their message arrived; shared by the TypedComms on the channel."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.unexpected: List[Message] = []
        self.posted: List["RecvRequest"] = []
        self.lock = threading.RLock()
        self.turn = 0  # where the next poll of every source starts (fairness)
        # Messages this rank handed to the transport, and took out of it: summed over the
        # ranks at ``free``, they tell whether any is still in the backend (lifecycle.free).
        # Sends count under a lock of their own: ``lock`` is held through a blocking receive,
        # which may wait for the very message another thread is about to send.
        self.sent = 0
        self.delivered = 0
        self._sent_lock = threading.Lock()

    def count_sent(self) -> None:
        with self._sent_lock:
            self.sent += 1

    def post(self, request: "RecvRequest") -> None:
        with self.lock:
            for i, message in enumerate(self.unexpected):
                if request.matches(message):
                    del self.unexpected[i]
                    request.bind(message)
                    return
            self.posted.append(request)

    def withdraw(self, request: "RecvRequest") -> None:
        with self.lock:
            if request in self.posted:
                self.posted.remove(request)

    def deliver(self, data: bytes, source: int) -> None:
        self.delivered += 1  # under the lock, as every caller holds it
        message = parse(data, source)
        for i, request in enumerate(self.posted):
            if request.matches(message):
                del self.posted[i]
                request.bind(message)
                return
        self.unexpected.append(message)

    def progress(self, request: "RecvRequest", deadline: Optional[float],
                 once: bool = False) -> bool:
        """Receive until ``request`` has its message (True), or the deadline passes (False).

        ``once``: look at what has arrived without waiting (a request's ``test``).
        """
        with self.lock:
            if request.source is not None and not once:
                return self._wait_for(request, request.source, deadline)
            if self.transport.kind not in _CAN_POLL:
                raise CollectiveError(
                    f"{head_text('recv', None, request.source, request.tag, comm_name(request.p))}"
                    f": refused: expected a transport that can look for a message without "
                    f"waiting for it (a receive from any rank, or test()), got "
                    f"{self.transport.kind}'s; name the source and wait", seq=-1,
                    comm=request.p.name)
            pause = _POLL_MIN
            while request.message is None:
                if self._poll(request):
                    pause = _POLL_MIN
                    continue
                if once or (deadline is not None and time.monotonic() >= deadline):
                    return False
                time.sleep(pause)
                pause = min(2 * pause, _POLL_MAX)
            return True

    def _wait_for(self, request: "RecvRequest", source: int,
                  deadline: Optional[float]) -> bool:
        """Receive from ``source`` until ``request`` has its message: one waiting receive at a
        time (a receive that gives up may not be retried on every transport: gloo closes the
        connection of a receive that timed out)."""
        while request.message is None:
            try:
                data = self.transport.recv_bytes(source, TRANSPORT_TAG, deadline)
            except TransportTimeout as exc:
                request.failure = failure_of(exc)
                return False
            self.deliver(data, source)
        return True

    def _poll(self, request: "RecvRequest") -> bool:
        """One look at each candidate source; True when a message arrived."""
        sources = ([request.source] if request.source is not None
                   else self._rotation(request.size))
        for source in sources:
            try:
                data = self.transport.recv_bytes(source, TRANSPORT_TAG, time.monotonic())
            except TransportTimeout:
                continue
            self.deliver(data, source)
            return True
        return False

    def _rotation(self, size: int) -> List[int]:
        start = self.turn % size
        self.turn += 1
        return list(range(start, size)) + list(range(start))


_MAILBOX_LOCK = threading.Lock()


def mailbox_of(p: Any) -> Mailbox:
    """The mailbox of ``p``'s channel, shared by every communicator on it."""
    box: Optional[Mailbox] = p.channel.mailbox
    if box is None:
        with _MAILBOX_LOCK:
            box = p.channel.mailbox
            if box is None:
                box = p.channel.mailbox = Mailbox(p.transport)
    return box


register_internal(__file__)
