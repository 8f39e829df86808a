"""The protocol's cold paths: turning a disagreement, a failure or a timeout into the right error.

Reached only when the agreement block showed that the headers differ or that some rank flagged
an error, or when a deadline passed. Every rank evaluates the same block, so every rank comes
here in the same call; one more exchange (the readable envelopes, lengths first so every rank's
counts agree) gives every rank the same facts, from which each builds the same error.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import msgspec
import numpy as np

from ..codecs import ENCODER, SchemaInfo
from ..codecs.culprit import encode_failure
from .transport import TransportTimeout, failure_of
from .call import Call
from .fresh import on_fresh_stack
from .errors import (CREATE_SEQ, CollectiveTimeout, ConcurrentCallError, DecodeError,
                     DesyncError, EncodeError, PeerError, numbered)
from . import roles
from .arms import branch_of, unpaired_of
from .callers import describe as describe_callers
from .desync import desync_message, failed_elsewhere
from .plumbing import register_internal
from .site_walk import via_name
from .sites import column_of, format_call_site, format_site
from .mismatch import (EnvelopeInfo, Group, MismatchKind, as_the_roots_class, compact_ranks,
                       differing_notes, format_decisions, format_groups, group_envelopes, label,
                       mismatch_kinds, numbering, place, role_split)
from .wire import (AGREE_SIZE, FLAG_LOCAL_ERROR, FLAGS_OFFSET, HEADER_SIZE, IDENTITY_OFFSET,
                   INSTANCE_OFFSET, INTERNAL_PAYLOADS, REDUCE_OP_NAMES, REDUCING_OPS, ROOTED_OPS,
                   agreed, or_into, own_block)

if TYPE_CHECKING:
    from .protocol import Protocol

CREATION_MIN_TIMEOUT = 10.0  # the creation exchange waits at least this long (core/protocol.py)

_INFO_DECODER = msgspec.msgpack.Decoder(Tuple[bytes, EnvelopeInfo])
MAX_INFO = 1 << 20  # an envelope description is a few hundred bytes; notes make it longer


def where(p: "Protocol", call: Call) -> str:
    """How every message about ``call`` starts (:func:`heading`)."""
    return heading(p, call.seq)


def heading(p: Any, seq: int, name: Optional[str] = None) -> str:
    """How every message about collective ``seq`` of ``p`` starts: ``collective #14 on tp``
    (``creation on tp``), and where the communicator numbers its ranks unlike the job, how:
    ``(ranks 0-3 here are world ranks 4-7)``, so that the ranks a message names can be found.
    ``name``: another communicator's over the same channel (its numbering is ``p``'s)."""
    if seq == CREATE_SEQ:
        return f"creation on {name or p.name}{numbering(p)}"
    return f"collective #{seq} on {name or p.name}{numbering(p)}"


def what(call: Call) -> str:
    """``allgather[RankState]``; the bare op where the payload is typedcoll's own (creation)."""
    return label(call.op, "" if call.op in INTERNAL_PAYLOADS else call.schema_name)



def describe_call(p: "Protocol", call: Call, error: Optional[str] = None) -> EnvelopeInfo:
    """This rank's readable envelope for ``call``."""
    shape, dtype = call.array_meta if call.array_meta is not None else (None, None)
    if dtype is not None:  # "int64", and the byte order where it is not the native one
        try:
            kind = np.dtype(dtype)
        except Exception:  # a torch dtype numpy lacks (bfloat16): its name, as given
            kind = None
        if kind is not None:
            order = "big" if dtype[0] == ">" else "little"
            dtype = kind.name if kind.isnative else f"{kind.name} ({order}-endian)"
    internal = call.op in INTERNAL_PAYLOADS  # their payloads are ours, not the caller's
    rooted = call.name is None and call.op in ROOTED_OPS  # may be a role branch's
    branch = branch_of(call.code, call.lasti) if rooted else None
    return EnvelopeInfo(
        rank=p.rank, seq=call.seq, op=call.op,
        schema=call.schema_name if not (call.wild or internal) else "",
        fingerprint=call.info.fingerprint.hex() if call.info is not None and not call.wild
        else "", comm=p.name, site=format_call_site(call.code, call.lasti),
        column=column_of(call.code, call.lasti), name=call.name,
        occurrence=call.occurrence, step=call.step,
        root=call.root if call.op in ROOTED_OPS else None,
        reduce_op=REDUCE_OP_NAMES.get(call.reduce_op) if call.op in REDUCING_OPS else None,
        shape=tuple(shape) if shape is not None else None, dtype=dtype, settings=call.settings,
        thread=threading.current_thread().name,
        error_type=split_error(error)[0] if error is not None else None,
        error=split_error(error)[1] if error is not None else None,
        notes=p.decisions(), branch=branch, via=via_name(call.via),
        callers=describe_callers(call.callers),
        unpaired=unpaired_of(call.code, call.lasti) if rooted and branch is None else None)


def disagreement(p: "Protocol", call: Call, receiving: bool = False) -> None:
    """Raise the error every rank agrees on: DesyncError, or EncodeError / PeerError.

    ``receiving``: the failures were in receiving, not sending (a rank could not find the class
    a root sent): every rank raises the same DecodeError naming the first such rank.
    """
    header = bytes(p.send[:HEADER_SIZE])
    pairs = exchange_infos(p, call, header, describe_call(p, call, call.error))
    failed = [r for r, (h, _) in enumerate(pairs) if h[FLAGS_OFFSET] & FLAG_LOCAL_ERROR]
    infos = [info for _, info in pairs]
    # A rank that failed before it knew its schema or root sent no such field: leave it out of
    # the comparison, so a plain usage error on one rank reads as that error, not as a desync.
    block, mine = bytearray(AGREE_SIZE), bytearray(AGREE_SIZE)
    for r, (h, _) in enumerate(pairs):
        if r not in failed:
            own_block(h, mine)
            or_into(block, mine)
    if not failed and role_branch([h for h, _ in pairs], infos):
        # One rooted collective written in a role branch's two arms: the call goes on, and the
        # next one there sends the role identity instead of its call site.
        roles.learn(p, call, infos)
        return
    if len(failed) < p.size and not agreed(block):
        if failed and role_branch([h for h, _ in pairs], infos, failed):
            # A receiver that failed before it knew its root (a root out of range) left a role
            # branch's first run unpaired: its peers' two arms still pair, so its own error is
            # the verdict, not a call-site desync with a hint that names no bad argument.
            raise failure(p, call, failed, infos)
        shown = _told_apart(as_the_roots_class(infos), [h for h, _ in pairs])
        kinds = mismatch_kinds([info for r, info in enumerate(shown) if r not in failed])
        groups = group_envelopes(shown)
        if MismatchKind.COMMUNICATOR in kinds:
            # Each rank spent a number of a different communicator on this call: give it back,
            # so that every communicator's numbers stay aligned across ranks afterwards.
            p.seq -= 1
            p.counts[p.identity(call)] -= 1
        # Every rank builds the same text from the same envelopes: the head names the lowest
        # rank's seq and communicator (a creation, numbered apart, only where no rank is in a
        # collective; two communicators over one channel where a rank skipped to the other).
        numbered = [i for i in infos if i.seq != CREATE_SEQ]
        seq = numbered[0].seq if numbered else CREATE_SEQ
        name = numbered[0].comm if numbered and numbered[0].comm else p.name
        raise DesyncError(desync_message(seq, name, kinds, groups, head=heading(p, seq, name)),
                          seq=seq, comm=p.name, kinds=kinds, groups=groups,
                          decisions=_decisions(groups))
    if not failed:  # unreachable for well-formed peers: the block said something differed
        raise DesyncError(f"{where(p, call)}: the agreement block and the "
                          f"envelopes disagree (corrupt exchange)", seq=call.seq, comm=p.name)
    if receiving:
        # Named as the root names it (the receivers may not know its class), with the root as
        # the payload's source: the same text and attributes on every rank.
        first, root = failed[0], call.root
        schema = infos[root].schema or call.schema_name
        raise DecodeError(f"{where(p, call)}: rank {first}"
                          f"{'' if len(failed) == 1 else f' (and {compact_ranks(failed[1:])})'} "
                          f"could not decode the root's {label(call.op, schema)} payload at "
                          f"{infos[first].site}: {infos[first].error}", seq=call.seq,
                          comm=p.name, source=root, schema=schema)
    raise failure(p, call, failed, infos)


def role_branch(headers: Sequence[bytes], infos: Sequence[EnvelopeInfo],
                failed: Sequence[int] = ()) -> bool:
    """Every rank's header agrees but for its call identity, the call is a rooted op, and every
    rank wrote it in the same role branch with the root alone in its arm (``role_split``): the
    root's side and the receivers' side of one collective. Read from what every rank
    exchanged, so every rank decides alike. ``failed``: ranks whose headers are left out (they
    failed before they knew their root or schema); their call sites still pair."""
    kept = [r for r in range(len(infos)) if r not in failed]
    first = infos[kept[0]] if kept else None
    # A root that failed still says where it called (its site, its arm): it pairs too.
    if first is None or first.op not in ROOTED_OPS or first.root is None or \
            not 0 <= first.root < len(infos) or not role_split(infos, first.root):
        return False
    block, mine = bytearray(AGREE_SIZE), bytearray(AGREE_SIZE)
    for header in (headers[r] for r in kept):
        masked = bytearray(header[:HEADER_SIZE])
        masked[IDENTITY_OFFSET:IDENTITY_OFFSET + 8] = bytes(8)
        own_block(masked, mine)
        or_into(block, mine)
    return agreed(block)


def failure(p: "Protocol", call: Call, failed: Sequence[int],
            infos: Sequence[EnvelopeInfo]) -> Exception:
    """The error for failed ranks: their own on themselves, PeerError naming them elsewhere."""
    first = failed[0]
    texts = {r: infos[r].error or "" for r in failed}
    kinds = {r: infos[r].error_type or "" for r in failed}
    if "ConcurrentCallError" in kinds.values():
        r = next(r for r in failed if kinds[r] == "ConcurrentCallError")
        err = ConcurrentCallError(
            f"{where(p, call)}: rank {r} saw two threads in one collective "
            f"(the channel is now unusable on every rank): {texts[r]}", seq=call.seq,
            comm=p.name, threads=(infos[r].thread,), ranks=tuple(failed))
        p.channel.broken = err
        return err
    site = place(infos[first], callers=False)
    apart = failed_elsewhere(failed, infos)
    # The failed rank's call as it described it, so that every rank's text is the same (a bcast
    # receiver names no schema, its root does).
    if p.rank in failed:
        return EncodeError(f"{where(p, call)}: rank {p.rank} could not send "
                           f"its {label(infos[p.rank].op, infos[p.rank].schema)} contribution at "
                           f"{place(infos[p.rank], callers=False)}: {texts[p.rank]}{apart}",
                           seq=call.seq, comm=p.name)
    more = "" if len(failed) == 1 else f" (and {compact_ranks(failed[1:])})"
    return PeerError(f"{where(p, call)}: rank {first}{more} failed its "
                     f"{label(infos[first].op, infos[first].schema)} "
                     f"contribution at {site}: {texts[first]}{apart}", seq=call.seq, comm=p.name,
                     ranks=failed, error_type=kinds[first], detail=texts[first])


def _told_apart(infos: List[EnvelopeInfo], headers: Sequence[bytes]) -> List[EnvelopeInfo]:
    """Communicators of one name over one channel (two ``TypedComm(parent, name="tp")``),
    where the ranks are on different ones, named apart by their instance on the channel
    (``tp (instance 2)``): else their names alone would hide the communicator mismatch."""
    instances = [int.from_bytes(h[INSTANCE_OFFSET:INSTANCE_OFFSET + 4], "little")
                 for h in headers]
    seen: Dict[str, Set[int]] = {}
    for info, instance in zip(infos, instances):
        seen.setdefault(info.comm, set()).add(instance)
    if all(len(v) < 2 for v in seen.values()):
        return infos
    return [msgspec.structs.replace(info, comm=f"{info.comm} (instance {instance})")
            if len(seen[info.comm]) > 1 else info for info, instance in zip(infos, instances)]


def root_in_receivers_arm(p: "Protocol", call: Call) -> None:
    """Every rank called from one site, which a rank learned as the receivers' arm of a role
    branch (``roles.unrole`` flagged it): the root is in its receivers' arm, and what it passes
    there (a placeholder, a stale value) would reach every rank as this call's. Raised on every
    rank alike, after one more exchange of the readable envelopes (their notes)."""
    infos = [info for _, info in exchange_infos(p, call, bytes(p.send[:HEADER_SIZE]),
                                                describe_call(p, call))]
    root = call.root
    others = tuple(r for r in range(p.size) if r != root)
    groups = [Group((root,), infos[root])]
    if others:
        groups.append(Group(others, infos[others[0]],
                            tuple(tuple(infos[r].notes) for r in others)))
    kinds = [MismatchKind.CALL]
    called = label(infos[root].op, infos[root].schema)  # the root's: every rank says the same
    head = (f"{where(p, call)}: rank {root}, the root, called {called} at {infos[root].site}, "
            f"in the arm of a role branch where its receivers call it:")
    hint = ("  the root would send what the receivers' arm passes (a placeholder, or an earlier "
            "call's value) and every rank would take it as this call's: the branch's test sent "
            "the root there by a value of its own. Make the test split ranks by role alone; "
            "where the root may take either arm on purpose, give the call in both arms one name=")
    raise DesyncError("\n".join([head] + format_groups(groups, kinds)
                                + format_decisions(groups) + [hint]),
                      seq=call.seq, comm=p.name, kinds=kinds, groups=groups,
                      decisions=_decisions(groups))


def _decisions(groups: Sequence[Group]) -> List[Tuple[str, str, List[Tuple[str, str]]]]:
    return differing_notes(groups)


def exchange_infos(p: "Protocol", call: Call, header: bytes,
                   mine: EnvelopeInfo) -> List[Tuple[bytes, EnvelopeInfo]]:
    """Every rank's (header, readable envelope): lengths first, so every rank's counts agree."""
    payload = ENCODER.encode((header, mine))
    # A cold path: the ranks may not have agreed their settings (a bad timeout on one rank at
    # creation), so never the blocking form that ``None`` asks of a backend.
    deadline = math.inf if call.deadline is None else call.deadline
    try:
        lengths = p.transport.allgatherv(len(payload).to_bytes(4, "little"), [4] * p.size,
                                         deadline)
        counts = [int.from_bytes(lengths[4 * r:4 * r + 4], "little") for r in range(p.size)]
        for r, count in enumerate(counts):  # every rank reads the same counts: all raise alike
            if count > MAX_INFO:
                raise DecodeError(f"{where(p, call)}: rank {r}'s envelope "
                                  f"description claims {count} bytes, expected at most "
                                  f"{MAX_INFO}", seq=call.seq, comm=p.name, source=r,
                                  schema="EnvelopeInfo")
        blob = p.transport.allgatherv(payload, counts, deadline)
    except TransportTimeout:
        timed_out(p, call)
    out, offset = [], 0
    for r, count in enumerate(counts):
        try:
            out.append(_INFO_DECODER.decode(blob[offset:offset + count]))
        except Exception as exc:  # untrusted bytes: any decoder failure is a decode error
            raise DecodeError(f"{where(p, call)}: the envelope description "
                              f"from rank {r} does not decode: {exc}", seq=call.seq,
                              comm=p.name, source=r, schema="EnvelopeInfo") from exc
        offset += count
    return out


def split_error(text: Optional[str]) -> Tuple[str, str]:
    """``"TypeError: detail"`` -> ("TypeError", "detail")."""
    kind, _, detail = (text or "").partition(": ")
    return kind, detail


def error_text(exc: BaseException, call: Call) -> str:
    """A failure to produce this rank's payload, as the text its peers receive.

    msgspec's own messages keep their shape ("Expected `int`, got `str` - at `$.rank`"); a value
    msgspec cannot encode names the part that fails, what was declared there and what it holds.
    """
    info = call.info
    return encode_failure(exc, call.value, info.schema if info is not None else Any,
                          call.schema_name)


def decode_any(info: SchemaInfo, buf: Any) -> Any:
    """Decode ``buf`` as ``info`` alike on every rank, whatever each rank's stack depth.

    msgspec guards its recursion with the interpreter's limit, so a payload that decodes at a
    shallow stack may raise RecursionError deep in another rank's: the payload's nesting was
    already checked against a fixed limit, so such a rank decodes it again on a fresh stack.
    """
    try:
        return info.decode(buf)
    except RecursionError:
        return on_fresh_stack(info.decode, bytes(buf))


def decode_failure(p: "Protocol", call: Call, source: int, exc: BaseException,
                   info: Optional[SchemaInfo] = None) -> Exception:
    """The error for a payload that does not decode as ``info`` (default: the call's schema):
    the sender's own, or its peers'."""
    site = place(EnvelopeInfo(rank=p.rank, seq=call.seq, op=call.op,
                              site=format_site(call.code, call.lasti), name=call.name,
                              via=via_name(call.via)))
    info = info if info is not None else call.info
    name = info.name if info is not None else "?"
    detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, msgspec.DecodeError) \
        else str(exc)
    if source == p.rank:
        error = EncodeError(f"{where(p, call)}: rank {p.rank} could not send "
                            f"its {label(call.op, name)} contribution at {site}: expected "
                            f"{name}: {detail}", seq=call.seq, comm=p.name)
        # Its own payload, refused after the exchange: the value's fault where its peers refuse
        # it too, this rank's alone (a hook reading rank-local state) where a peer decoded it,
        # which only a settle can tell (``settle.py`` raises this one then).
        error.refused_here = DecodeError(
            f"{where(p, call)}: payload from rank {source} (this rank's own, sent) does not "
            f"decode as {name} here ({label(call.op, name)} at {site}): {detail}",
            seq=call.seq, comm=p.name, source=source, schema=name)
        return error
    return DecodeError(f"{where(p, call)}: payload from rank {source} does not "
                       f"decode as {name} ({label(call.op, name)} at {site}): {detail}",
                       seq=call.seq, comm=p.name, source=source, schema=name)


# Transports whose late rank's call fails in the backend instead of completing (their notices
# of give-ups are read only to tell that failure from a dead peer).
LATE_CALLS_FAIL = frozenset({"torch"})


def who_gave_up(p: "Protocol", notices: Sequence[Tuple[int, int]]) -> str:
    """The ranks whose notices this rank found, ``(and possibly others)`` short of every peer:
    over MPI a notice may still be in flight when the late rank looks (one found of three)."""
    heard = sorted({rank for rank, _ in notices})
    return compact_ranks(heard) + (" (and possibly others)" if len(heard) < p.size - 1 else "")


def ended_by_give_up(p: "Protocol", call: Call, shown: str, notices: Sequence[Tuple[int, int]],
                     missing: Optional[Sequence[int]], timeout: float) -> str:
    """The account of a rank whose wait gloo failed after a peer gave up (a give-up closes that
    call's connections, as a death does) while it too waited for a rank that never arrived:
    who came, whom they waited for (the hang report's ``missing``), and who gave up."""
    gave_up = {rank for rank, _ in notices}  # were there, whatever their side channel says now
    gone = [r for r in missing or () if r != p.rank and r not in gave_up]
    there = (f"{compact_ranks([r for r in range(p.size) if r not in gone])} arrived at it and "
             f"waited for {compact_ranks(gone)}; " if gone else "")
    return (f"{where(p, call)}: {what(call)} at {shown} did not complete: {there}"
            f"{compact_ranks(sorted(gave_up))} gave up waiting at "
            f"{_first_given_up(notices, timeout)}, and gloo then failed the call on rank "
            f"{p.rank} as though a peer had died (a give-up closes its connections; gloo's error "
            f"is in .failure)")


def _first_given_up(notices: Sequence[Tuple[int, int]], timeout: float) -> str:
    """Where the first of ``notices`` gave up, and after how long: ``collective #3 (timeout
    1 s)``."""
    first = min(seq for _, seq in notices)
    return f"{numbered(first)} (timeout {timeout:g} s)"


# How the CollectiveTimeout of a rank that came late reads after its call's site; the
# diagnostics tell such a rank's failed call by it.
ABANDONED = " is abandoned: "


def timed_out(p: "Protocol", call: Call) -> None:
    """Raise CollectiveTimeout; the channel is unusable from now on."""
    site = format_site(call.code, call.lasti)
    # The wrappers passed name the call where its caller's line serves several (mismatch.place)
    shown = site + (f" through {via_name(call.via)}"
                    if call.via is not None and call.name is None else "")
    timeout = p.timeout if p.timeout is not None else 0.0
    if call.seq == CREATE_SEQ:
        timeout = max(timeout, CREATION_MIN_TIMEOUT)
    # The backend's failure: the one being handled, or the one the C path's exchange kept.
    failure = failure_of(sys.exc_info()[1]) or failure_of(p.failure)
    p.failure = None
    notices = p.transport.given_up()
    p.transport.give_up(call.seq, failure)  # first: a late peer looks for it as it completes
    # An exchange stops before its deadline only when the backend failed it or when it completed
    # after a peer had given up (the transport found that peer's notice): this rank came late.
    # Where a late rank cannot complete the call (gloo: its peers' give-ups closed the
    # connections), its backend fails it with "connection closed", as for a dead peer: every
    # peer's notice tells the two apart. Only every peer's: a rank failed so while it too waited
    # for an absent one is not late, but its wait was ended by the give-ups it found (``ended``).
    gave_up = {rank for rank, seq in notices if seq <= call.seq}
    if p.transport.kind in LATE_CALLS_FAIL:
        # Every peer left the call before this rank's failure: gave up, or was failed by gloo
        # in turn (a peer that came within the others' wait).
        left = gave_up | {rank for rank, seq in p.transport.failed_in() if seq == call.seq}
        came_late = bool(failure) and bool(gave_up) and len(left | {p.rank}) == p.size
    else:
        came_late = bool(notices) and not failure
    late = came_late and call.deadline is not None and time.monotonic() < call.deadline
    ended = bool(failure) and bool(gave_up) and not late and p.transport.kind in LATE_CALLS_FAIL
    missing: Optional[Sequence[int]] = None
    report = ""
    if p.hang_reporter is not None and not late:
        try:
            missing, report = p.hang_reporter(p, call)
        except Exception as exc:  # a failing report must not hide the timeout itself
            report = f"(hang report unavailable: {type(exc).__name__}: {exc})"
    if ended:
        text = ended_by_give_up(p, call, shown, [n for n in notices if n[0] in gave_up],
                                missing, timeout)
    elif failure and not late:
        text = (f"{where(p, call)}: {what(call)} at {shown} failed in the {p.transport.kind} "
                f"backend before completing (a peer's process or connection is gone?): "
                f"{failure}")
    elif late:
        text = (f"{where(p, call)}: {what(call)} at {shown}{ABANDONED}"
                f"{who_gave_up(p, notices)} gave up waiting at "
                f"{_first_given_up(notices, timeout)} before it completed on rank "
                f"{p.rank}; no rank returns this call's result (their reports name the ranks "
                f"they waited for)")
    else:
        text = (f"{where(p, call)}: {what(call)} at {shown} did not complete within "
                f"{timeout:g} s")
    if report:
        text += "\n" + report
    err = CollectiveTimeout(text, seq=call.seq, comm=p.name, op=call.op,
                            schema=call.schema_name, site=site, timeout=timeout,
                            missing=missing, failure=failure)
    p.channel.broken = err
    p.refresh_fast()
    # Raised where the transport's timeout is handled: that internal exception is no cause of
    # the user's (its failure text, where there is one, is in the message).
    raise err from None


def refuse_broken(p: "Protocol", call: Call) -> None:
    """Raise for a call on a channel whose earlier collective timed out or collided."""
    cause = p.channel.broken
    assert cause is not None  # only called when broken is set
    if isinstance(cause, CollectiveTimeout):
        since = (f"its {label(cause.op, cause.schema)} at {cause.site}" if cause.op == "recv"
                 else f"collective #{cause.seq} on {cause.comm} ({label(cause.op, cause.schema)}"
                 f" at {cause.site})")
        raise CollectiveTimeout(
            f"collective #{p.seq} on {p.name}: {what(call)} refused: the communicator is unusable "
            f"since {since} {'failed in the backend' if cause.failure else 'timed out'}",
            seq=p.seq, comm=p.name, op=call.op, schema=call.schema_name, site=cause.site,
            timeout=cause.timeout, missing=cause.missing, failure=cause.failure)
    raise type(cause)(f"collective #{p.seq} on {p.name}: {what(call)} refused: the communicator is "
                      f"unusable since collective #{cause.seq} on {cause.comm}: {cause}",
                      seq=p.seq, comm=p.name)


register_internal(__file__)
