"""The receiving side of typed point to point: each communicator's message counters, who is
calling, and the receiver's verdict on a matched message (the checks listed in ``p2p.py``'s
module docstring, then decoding), kept apart from the sending and matching in ``p2p.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import msgspec

from ..codecs import (KIND_MSGSPEC, KIND_NUMPY_SCALAR, SchemaInfo, decode_array, find_class,
                      nesting_ok, resolve)
from ..codecs.nesting import MAX_NESTING
from .errors import CollectiveTimeout, DecodeError, DesyncError, PeerError
from .identity import name_fingerprint, site_fingerprint
from .plumbing import register_internal
from .site_walk import call_site, via_name
from .sites import format_site
from .mailbox import Envelope, head_text
from .mismatch import EnvelopeInfo, Group, MismatchKind, format_groups, label, numbering, \
    comm_name
from .verdict import LATE_CALLS_FAIL, decode_any
from .wire import NO_STEP

if TYPE_CHECKING:
    from .p2p import RecvRequest


class P2PState:
    """A communicator's point-to-point counters."""

    __slots__ = ("sent", "received", "counts", "posted", "owed")

    def __init__(self) -> None:
        self.sent: Dict[Tuple[int, int], int] = {}  # (dest, tag) -> messages sent
        self.received: Dict[Tuple[int, int], int] = {}  # (source, tag) -> messages taken
        self.counts: Dict[bytes, int] = {}  # identity -> point-to-point calls so far
        self.posted = 0  # receives posted so far: each one's order
        # Receives from any rank or of any tag that timed out: (source, tag, order, place). A
        # timed-out receive from one source and tag counts in ``received``; one with a
        # wildcard cannot know which count its message would have taken, so the first message
        # that fits it, bound to a receive posted after it, is taken as its late message.
        self.owed: List[Tuple[Optional[int], Optional[int], int, str]] = []


def p2p_state(p: Any) -> P2PState:
    state = p.extensions.get("p2p")
    if state is None:
        state = p.extensions["p2p"] = P2PState()
    return state  # type: ignore[no-any-return]


class Caller:
    """Who is calling: the site (or name), its occurrence, and the step clock. ``place`` is the
    site as messages show it: with the thin wrapper the call went through, as a collective's."""

    __slots__ = ("site", "place", "name", "occurrence", "step", "step_given")

    def __init__(self, p: Any, name: Optional[str], step: Optional[int] = None) -> None:
        frame, via = call_site(2)
        code, lasti = (frame.f_code, frame.f_lasti) if frame is not None else (None, 0)
        self.site = format_site(code, lasti)
        wrapper = via_name(via) if name is None else None
        self.place = self.site if wrapper is None else f"{self.site} through {wrapper}"
        self.name = name
        identity = name_fingerprint(name) if name is not None else \
            site_fingerprint(code, lasti, via)
        counts = p2p_state(p).counts
        self.occurrence = counts.get(identity, 0) + 1
        counts[identity] = self.occurrence
        # The clock as it is now, unless the call says which step it is for (a receive
        # posted ahead, for the next iteration).
        self.step = int(step) if step is not None else None if p.step == NO_STEP else p.step
        self.step_given = step is not None


def recv_timed_out(p: Any, request: RecvRequest) -> None:
    # The late message of a receive that timed out must not pass for the next one's: count it.
    seq = None
    state = p2p_state(p)
    if request.source is not None and request.tag is not None:
        seq = state.received.get((request.source, request.tag), 0)
        state.received[(request.source, request.tag)] = seq + 1
    else:
        state.owed.append((request.source, request.tag, request.order, request.caller.place))
    schema = request.info.name if request.info is not None else ""
    caller = request.caller
    timeout = p.timeout if p.timeout is not None else 0.0
    source = f"rank {request.source}" if request.source is not None else "any rank"
    why = (f"failed in the backend before any message from {source} arrived (a peer's process "
           f"or connection is gone?): {request.failure}" if request.failure else
           f"did not complete within {timeout:g} s: no message from {source} arrived")
    closes = p.transport.kind in LATE_CALLS_FAIL and not request.failure
    if closes:
        why += (": gloo closes the connection of a receive that times out, which this "
                "communicator's collectives use, so they fail from now on, its peers told why")
    err = CollectiveTimeout(
        f"{head_text('recv', seq, request.source, request.tag, comm_name(p))}: "
        f"{label('recv', schema)} at {caller.place} {why}",
        seq=-1 if seq is None else seq, comm=p.name, op="recv", schema=schema, site=caller.site,
        timeout=timeout, missing=(request.source,) if request.source is not None else None,
        failure=request.failure)
    if closes:  # refused here at once, rather than failed in the backend
        p.channel.broken = err
        p.refresh_fast()
    raise err


def take(p: Any, request: RecvRequest) -> Any:
    """Check the matched message against the receive, then decode it."""
    message = request.message
    assert message is not None  # progress() returned True
    caller = request.caller
    env = message.envelope
    if env is None:
        raise DecodeError(f"{head_text('recv', None, message.source, request.tag, p.name)}"
                          f"{numbering(p)}: the "
                          f"envelope from rank {message.source} does not decode: "
                          f"{message.error}", seq=-1, comm=p.name, source=message.source,
                          schema="Envelope")
    expected = request.expected
    # Every receive builds it; the numbering (a backend query) joins it where an error is raised.
    head = head_text("recv", expected, message.source, env.tag, p.name)
    info = request.info
    late_for = _owed_to_a_timed_out_receive(p, request, message.source, env.tag)
    if env.error is not None:
        raise PeerError(f"{head}{numbering(p)}: rank {message.source} failed its "
                        f"{label('send', env.schema)} "
                        f"at {env.site}: {env.error}", seq=expected, comm=p.name,
                        ranks=(message.source,), error_type=env.error.partition(": ")[0],
                        detail=env.error.partition(": ")[2])
    kinds = []
    if env.seq != expected or late_for is not None:
        kinds.append(MismatchKind.SEQUENCE)
        if env.seq < expected:
            # The late message of a receive that timed out, which counted it already: the
            # next message is again the one the next receive expects.
            p2p_state(p).received[(message.source, env.tag)] -= 1
    if env.name is not None and caller.name is not None and env.name != caller.name:
        kinds.append(MismatchKind.CALL)
    if info is not None and info.fingerprint != env.fingerprint:
        kinds.append(MismatchKind.SCHEMA)
    if env.step != caller.step:
        kinds.append(MismatchKind.STEP)
    if kinds:
        diverged(p, head, kinds, expected, message.source, env, info, caller, late_for)
    if info is None:
        info = sender_class(p, head, env, message.source)
    return decode_payload(p, head, info, message.payload, message.source, caller.place)


def _owed_to_a_timed_out_receive(p: Any, request: RecvRequest, source: int,
                                 tag: int) -> Optional[str]:
    """The oldest wildcard receive that timed out before ``request`` was posted and that this
    message fits, as a message names it (``from any rank (any tag) at engine.py:40``), taken
    off the list; else None."""
    owed = p2p_state(p).owed
    for i, (owed_source, owed_tag, order, place) in enumerate(owed):
        if order < request.order and owed_source in (None, source) and owed_tag in (None, tag):
            del owed[i]
            peer = "any rank" if owed_source is None else f"rank {owed_source}"
            of_tag = "any tag" if owed_tag is None else f"tag {owed_tag}"
            return f"from {peer} ({of_tag}) at {place}"
    return None


def diverged(p: Any, head: str, kinds: List[MismatchKind], expected: int, source: int,
             env: Envelope, info: Optional[SchemaInfo], caller: Caller,
             late_for: Optional[str] = None) -> None:
    sent = EnvelopeInfo(rank=source, seq=env.seq, op="send", schema=env.schema,
                        fingerprint=env.fingerprint.hex(), comm=p.name, site=env.site,
                        name=env.name, occurrence=env.occurrence, step=env.step)
    mine = EnvelopeInfo(rank=p.rank, seq=expected, op="recv",
                        schema=info.name if info is not None else "",
                        fingerprint=info.fingerprint.hex() if info is not None else "",
                        comm=p.name, site=caller.place, name=caller.name,
                        occurrence=caller.occurrence, step=caller.step)
    groups = [Group((source,), sent), Group((p.rank,), mine)]
    lines = [f"{head}{numbering(p)} diverged ({', '.join(k.value for k in kinds)}):"]
    lines += format_groups(groups, kinds)
    if late_for is not None:
        lines.append(f"  the receive {late_for} timed out before this message arrived, and "
                     f"may have been waiting for it: a receive from any rank or of any tag "
                     f"that times out counts against the first message that fits it, which is "
                     f"not taken for a later receive (to wait again without giving one up, "
                     f"poll irecv()'s test())")
    if MismatchKind.SEQUENCE in kinds and env.seq != expected:
        lines.append(f"  expected message #{expected} from rank {source}, got #{env.seq} (a "
                     f"receive that timed out, or a send or receive skipped on one side)")
    if kinds == [MismatchKind.STEP] and caller.step_given:
        lines.append(f"  a side skipped or repeated an iteration: this receive is for step "
                     f"{caller.step} (its step=), the message was sent at step {env.step}")
    elif kinds == [MismatchKind.STEP]:
        lines.append("  a side skipped or repeated an iteration, or the receive was posted "
                     "ahead of it: a receive carries the step clock as it was when posted, so "
                     "one posted for a later iteration (irecv of the next step's message) "
                     "passes that step: irecv(..., step=it + 1)")
    raise DesyncError("\n".join(lines), seq=expected, comm=p.name, kinds=kinds, groups=groups)


def sender_class(p: Any, head: str, env: Envelope, source: int) -> SchemaInfo:
    """The sender's schema, found by its class path (never importing) and checked."""
    if not env.path:
        raise DecodeError(f"{head}{numbering(p)}: expected the sender's schema to be a class "
                          f"this rank can find by name, got {env.schema}; pass schema= to recv",
                          seq=env.seq, comm=p.name, source=source, schema=env.schema)
    try:
        info = resolve(find_class(env.path))
    except (LookupError, TypeError) as exc:
        raise DecodeError(f"{head}{numbering(p)}: {exc}", seq=env.seq, comm=p.name, source=source,
                          schema=env.schema) from exc
    if info.fingerprint != env.fingerprint:
        raise DecodeError(f"{head}{numbering(p)}: expected {env.path} with the sender's structure "
                          f"({env.fingerprint.hex()[:8]}), got a class of another structure "
                          f"({info.fingerprint.hex()[:8]}) on this rank; pass schema=",
                          seq=env.seq, comm=p.name, source=source, schema=env.schema)
    return info


def decode_payload(p: Any, head: str, info: SchemaInfo, payload: Any, source: int,
                   site: str) -> Any:
    try:
        if info.kind == KIND_MSGSPEC:
            if len(payload) > MAX_NESTING and not nesting_ok(payload):
                raise ValueError(f"expected a payload nested at most {MAX_NESTING} deep, got "
                                 f"one nested deeper")
            return decode_any(info, bytes(payload))
        array = decode_array(payload)
        return array[()] if info.kind == KIND_NUMPY_SCALAR else array
    except Exception as exc:  # untrusted bytes: whatever the decoder or a user type raises
        detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, msgspec.DecodeError) \
            else str(exc)
        raise DecodeError(f"{head}{numbering(p)}: payload does not decode as {info.name} (recv "
                          f"at {site}): {detail}", seq=-1, comm=p.name, source=source,
                          schema=info.name) from exc


register_internal(__file__)
