"""Typed point to point: every message carries its envelope, checked by the receiver.

A message is one transport message on the private point-to-point channel::

    u32 little-endian length of the envelope, the envelope (:class:`Envelope`, msgpack),
    then the payload (msgspec-encoded, or a numpy array in its own format)

Every message travels with the one transport tag ``TRANSPORT_TAG``; the caller's tag rides in
the envelope and messages are matched here, as MPI matches them: a receive takes the first
message, in arrival order from each source, whose communicator instance, source and tag fit
(either may be a wildcard), and posted receives are served in the order they were posted. This
is what lets a receive name "any tag" on transports that only receive by an explicit one, and
keeps the several TypedComms that share one private channel apart.

What the receiver checks before it decodes, so that a send matched with the wrong receive never
returns the other call's data:
  - the sender flagged an error (it could not encode its value): PeerError naming the sender;
  - the schemas differ (fingerprints), both calls were named and the names differ, the step
    clocks differ, or the message is not the one this receive expects from that source and tag
    (its number: a receive that timed out still counts, so its late message is not taken for the
    next one's; one from any rank or of any tag, which cannot know the number it missed, counts
    against the first message that fits it and reaches a receive posted after it):
    DesyncError naming both sides' call sites.
A receive without ``schema`` takes the sender's class, found by module and qualified name among
modules this rank already imported and checked against the sender's fingerprint.

Only the receiver raises on a mismatch (a send has completed by then). The communicator's
``timeout`` bounds every receive. Over MPI a receive that times out leaves no receive posted,
so the communicator stays usable, and its late message raises in the receive that takes it (one
still in the backend at ``free`` keeps the backend from being freed, ``lifecycle.free``). Over
gloo a receive that times out closes its connection, which the collectives use: they fail from
then on (``p2p_receive.recv_timed_out``). To wait again without giving a receive up, poll
``irecv()``'s ``test()``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List, Optional, Tuple

from ..codecs import KIND_MSGSPEC, SchemaInfo, encode_array, nesting_ok
from ..codecs.nesting import MAX_NESTING
from ..codecs.culprit import encode_failure
from ..codecs.schema import ENCODER
from .args import check_dest, check_step, payload_mode, schema_of
from .errors import CollectiveError, CollectiveTimeout, EncodeError
from .identity import check_name
from .plumbing import register_internal
from .mailbox import (ENVELOPE_ENCODER, LENGTH_PREFIX, TRANSPORT_TAG, Envelope, Message, head_text,
                      mailbox_of)
from .mismatch import comm_name, label
from .p2p_receive import Caller, p2p_state, recv_timed_out, take
from .transport import TransportTimeout, failure_of

MAX_TAG = 2 ** 31 - 1
# Transports whose sends never wait for their receiver (buffered, or left in flight).
_SENDS_NEVER_WAIT = frozenset({"memory", "torch"})


# --- messages ---------------------------------------------------------------------------------
def _refuse_freed(p: Any, op: str, peer: Optional[int], tag: Optional[int]) -> None:
    if p.freed:
        raise CollectiveError(f"{head_text(op, None, peer, tag, comm_name(p))}: refused: the "
                              f"communicator was freed", seq=-1, comm=p.name)


def _check_tag(tag: Any, wildcard: bool) -> Optional[str]:
    if wildcard and tag is None:
        return None
    if isinstance(tag, int) and not isinstance(tag, bool) and 0 <= tag <= MAX_TAG:
        return None
    return (f"ValueError: expected tag to be {'None (any tag) or ' if wildcard else ''}an int "
            f"in 0..{MAX_TAG}, got {tag!r}")[:300]


def _encode_payload(info: SchemaInfo, value: Any) -> Tuple[bytes, Optional[str]]:
    """(payload, None) or (b"", error text); never raises."""
    mode, encoded, _, error = payload_mode(info, value)
    if error is not None:
        return b"", error
    try:
        if info.kind != KIND_MSGSPEC:
            return encode_array(encoded), None
        payload = ENCODER.encode(encoded)
    except Exception as exc:  # any failure to encode becomes the flagged error
        return b"", encode_failure(exc, value, info.schema, info.name)
    if len(payload) > MAX_NESTING and not nesting_ok(payload):
        return b"", (f"ValueError: expected a value nested at most {MAX_NESTING} deep, got one "
                     f"nested deeper")
    return payload, None


def _message(p: Any, value: Any, dest: Any, tag: Any, schema: Any, name: Any,
             refused: Optional[str] = None, op: str = "send",
             step: Any = None) -> Tuple[bytes, int, int, Optional[EncodeError]]:
    """The message to send, its dest and tag, and the error to raise here after sending it.

    ``refused``: a layer above already found the value unsendable (its error text).
    """
    _refuse_freed(p, op, dest if isinstance(dest, int) else None,
                  tag if isinstance(tag, int) else None)
    # Without a valid peer and tag there is nobody to tell: these fail on this rank alone.
    local = check_dest(dest, p.size, "dest") or _check_tag(tag, False) or check_name(name)
    if local is not None:
        raise EncodeError(f"{op} on {p.name}: refused: {local}", seq=-1, comm=p.name)
    dest, tag = int(dest), int(tag)
    # A bad step is told to the receiver, as a value that does not encode, not left waiting.
    bad_step = check_step(step)
    caller = Caller(p, name, None if bad_step else step)
    sent = p2p_state(p).sent
    seq = sent.get((dest, tag), 0)
    sent[(dest, tag)] = seq + 1
    info, error = schema_of(value, schema)
    payload = b""
    if refused is not None or bad_step is not None:
        error = refused or bad_step
    elif info is not None:
        payload, error = _encode_payload(info, value)
    envelope = Envelope(
        p.instance, p.rank, tag, seq, info.name if info is not None else "?",
        info.fingerprint if info is not None else b"", info.path if info is not None else "",
        info.kind if info is not None else KIND_MSGSPEC, name, caller.place, caller.occurrence,
        caller.step, error)
    head = ENVELOPE_ENCODER.encode(envelope)
    data = len(head).to_bytes(LENGTH_PREFIX, "little") + head + (payload if error is None else b"")
    mailbox_of(p).count_sent()  # a send that then fails counts too: free keeps the backend
    failure = None
    if error is not None:
        failure = EncodeError(f"{head_text(op, seq, dest, tag, comm_name(p))}: rank {p.rank} "
                              f"could not send its {label(op, envelope.schema)} at "
                              f"{caller.place}: {error}", seq=seq, comm=p.name)
    return data, dest, tag, failure


# --- requests ----------------------------------------------------------------------------------
class SendRequest:
    """A started send: ``wait()`` completes it (returns None); ``test()`` -> (done, None)."""

    __slots__ = ("_handle", "_failure", "_done")

    def __init__(self, handle: Any, failure: Optional[EncodeError]) -> None:
        self._handle = handle
        self._failure = failure
        self._done = handle is None

    def wait(self) -> None:
        if not self._done:
            self._handle.wait(None)
            self._done = True
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def test(self) -> Tuple[bool, None]:
        if not self._done and self._handle.test():
            self._done = True
        if self._done:
            self.wait()
        return self._done, None


class RecvRequest:
    """A posted receive: ``wait()`` returns the value; ``test()`` -> (done, value or None)."""

    __slots__ = ("p", "source", "tag", "size", "info", "caller", "_box", "message",
                 "expected", "order", "_done", "_value", "_error", "failure", "__weakref__")

    def __init__(self, p: Any, source: Optional[int], tag: Optional[int],
                 info: Optional[SchemaInfo], caller: Caller) -> None:
        self.p = p
        self.source = source
        self.tag = tag
        self.size = p.size
        self.info = info
        self.caller = caller
        self._box = mailbox_of(p)
        self.message: Optional[Message] = None
        self.expected = 0  # the number the bound message should carry
        state = p2p_state(p)
        self.order = state.posted  # a timed-out wildcard receive owes only later ones a message
        state.posted += 1
        self._done = False
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self.failure = ""  # the backend's error where it failed the receive (a peer is gone)
        self._box.post(self)

    def matches(self, message: Message) -> bool:
        env = message.envelope
        if env is None:  # an envelope that does not decode goes to whoever listens to its source
            return self.source is None or self.source == message.source
        return (env.instance == self.p.instance
                and (self.source is None or self.source == message.source)
                and (self.tag is None or self.tag == env.tag))

    def bind(self, message: Message) -> None:
        """Take ``message``: it is the next one from its source and tag for this receive, in
        the order receives were matched (not the order they are waited for)."""
        self.message = message
        env = message.envelope
        if env is not None:
            received = p2p_state(self.p).received
            key = (message.source, env.tag)
            self.expected = received.get(key, 0)
            received[key] = self.expected + 1

    def wait(self) -> Any:
        if not self._done:
            p = self.p
            deadline = None if p.timeout is None else time.monotonic() + p.timeout
            try:
                if not self._box.progress(self, deadline):
                    self._box.withdraw(self)
                    recv_timed_out(p, self)
                self._value = take(p, self)
            except CollectiveError as exc:  # the request's one outcome: a later wait repeats it
                self._error = exc
            self._done = True
        if self._error is not None:
            raise self._error
        return self._value

    def test(self) -> Tuple[bool, Any]:
        if self._done:
            return True, self._value
        if self.message is None and not self._box.progress(self, None, once=True):
            return False, None
        return True, self.wait()


# --- the operations ---------------------------------------------------------------------------
def isend(p: Any, value: Any, dest: Any, tag: Any, schema: Any, name: Any,
          refused: Optional[str] = None, step: Any = None) -> SendRequest:
    """Start sending ``value``: its envelope and payload in one message.

    A value that does not encode still sends its envelope, flagged with the error, so the
    receiver raises PeerError instead of waiting; this rank raises EncodeError when the request
    completes.
    """
    data, dest, tag, failure = _message(p, value, dest, tag, schema, name, refused, step=step)
    transport = p.transport
    start = getattr(transport, "isend_bytes", None)
    if start is not None:
        return SendRequest(start(data, dest, TRANSPORT_TAG), failure)
    if transport.kind in _SENDS_NEVER_WAIT:
        try:
            transport.send_bytes(data, dest, TRANSPORT_TAG, None)
        except TransportTimeout as exc:  # gloo refused to post it: the peer's connection closed
            raise CollectiveTimeout(
                f"{head_text('isend', None, dest, tag, comm_name(p))}: isend failed in the "
                f"backend (a peer's process or connection is gone?): {failure_of(exc)}", seq=-1,
                comm=p.name, op="isend", timeout=p.timeout or 0.0, missing=(dest,),
                failure=failure_of(exc)) from None
        return SendRequest(None, failure)
    return SendRequest(_SendingThread(transport, data, dest), failure)


class _SendingThread:
    """A blocking send on its own thread, for transports without a nonblocking one: a large
    message must not wait for its receiver to be matched before this rank can receive."""

    def __init__(self, transport: Any, data: bytes, dest: int) -> None:
        self.error: List[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(transport, data, dest),
                                       name="typedcoll-isend", daemon=True)
        self.thread.start()

    def _run(self, transport: Any, data: bytes, dest: int) -> None:
        try:
            transport.send_bytes(data, dest, TRANSPORT_TAG, None)
        except BaseException as exc:  # handed to wait()
            self.error.append(exc)

    def test(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, deadline: Optional[float]) -> None:
        self.thread.join()
        if self.error:
            raise self.error[0]


def send(p: Any, value: Any, dest: Any, tag: Any, schema: Any, name: Any,
         refused: Optional[str] = None, complete: bool = False, step: Any = None) -> None:
    """Send ``value``; ``complete``: return once the receiver took it, where a backend leaves
    sends in flight (gloo: torch's own sends wait, and a rank that exits after one must not
    drop it)."""
    data, dest, tag, failure = _message(p, value, dest, tag, schema, name, refused, step=step)
    deadline = None if p.timeout is None else time.monotonic() + p.timeout
    try:
        p.transport.send_bytes(data, dest, TRANSPORT_TAG, deadline)
        wait_sent = getattr(p.transport, "wait_last_send", None) if complete else None
        if wait_sent is not None:
            wait_sent(deadline)
    except TransportTimeout as exc:
        broke = failure_of(exc)
        why = (f"failed in the backend (a peer's process or connection is gone?): {broke}"
               if broke else f"did not complete within {p.timeout:g} s (rank {dest} never "
               f"received it)")
        raise CollectiveTimeout(f"{head_text('send', None, dest, tag, comm_name(p))}: send {why}",
                                seq=-1, comm=p.name, op="send", timeout=p.timeout or 0.0,
                                missing=(dest,), failure=broke) from None
    if failure is not None:
        raise failure


def irecv(p: Any, source: Any, tag: Any, schema: Any, name: Any,
          step: Any = None) -> RecvRequest:
    """Post a receive from ``source`` (None: any) with ``tag`` (None: any)."""
    _refuse_freed(p, "recv", source if isinstance(source, int) else None,
                  tag if isinstance(tag, int) else None)
    local = ((check_dest(source, p.size, "source") if source is not None else None)
             or _check_tag(tag, True) or check_name(name) or check_step(step))
    info = None
    if local is None and schema is not None:
        info, local = schema_of(None, schema)
    if local is not None:
        raise EncodeError(f"recv on {p.name}: refused: {local}", seq=-1, comm=p.name)
    return RecvRequest(p, None if source is None else int(source),
                       None if tag is None else int(tag), info, Caller(p, name, step))


def recv(p: Any, source: Any, tag: Any, schema: Any, name: Any, step: Any = None) -> Any:
    return irecv(p, source, tag, schema, name, step).wait()


def sendrecv(p: Any, value: Any, dest: Any, source: Any, sendtag: Any, recvtag: Any,
             schema: Any, recv_schema: Any, name: Any, refused: Optional[str] = None,
             step: Any = None) -> Any:
    """Post the receive, start the send, then complete both (a pair exchanging never
    deadlocks: neither waits for its send before its receive is posted)."""
    if check_step(step) is not None:  # told to the receiver (send's path), nothing posted
        isend(p, value, dest, sendtag, schema, name, refused, step).wait()
    request = irecv(p, source, recvtag, recv_schema, name, step)
    sending = isend(p, value, dest, sendtag, schema, name, refused, step)
    try:
        value = request.wait()
    finally:
        sending.wait()
    return value


def matched(request: RecvRequest) -> Tuple[int, int, int]:
    """(source, tag, number) of the message a completed receive took (wildcards resolved)."""
    message = request.message
    if message is None or message.envelope is None:
        raise ValueError("expected a completed receive")
    return message.source, message.envelope.tag, message.envelope.seq


def head(p: Any, request: RecvRequest) -> str:
    """How messages about a completed receive start: ``recv #0 from rank 1 (tag 0) on WORLD``."""
    source, tag, seq = matched(request)
    return head_text("recv", seq, source, tag, comm_name(p))


register_internal(__file__)
