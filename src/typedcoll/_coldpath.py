"""The protocol's cold paths: turning a disagreement or a timeout into the right error.

Reached only when phase 1 showed that the headers differ, that some rank flagged an error, or
that the deadline passed. Every rank evaluates the same received slots, so every rank takes the
same branch here and raises in the same call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

import msgspec
import numpy as np

from ._callsite import format_site, register_internal
from ._errors import CollectiveTimeout, DecodeError, DesyncError, EncodeError, PeerError
from ._mismatch import EnvelopeInfo, desync_message, group_envelopes, mismatch_kinds
from .codecs import ENCODER
from ._transport import TransportTimeout
from ._wire import (CHECKED, FLAG_LOCAL_ERROR, FLAG_OVERFLOW, HEADER_SIZE, LENGTH_OFFSET,
                    NO_STEP, REDUCE_OP_NAMES, REDUCING_OPS, ROOTED_OPS)

if TYPE_CHECKING:
    from ._protocol import Protocol

_ENVELOPE_INFO_DECODER = msgspec.msgpack.Decoder(EnvelopeInfo)


def label(op: str, info: Any) -> str:
    """``allgather[RankState]``, or the bare op for collectives without a payload schema."""
    name = info.name if info is not None else "?"
    return f"{op}[{name}]" if name else op


def disagreement(p: "Protocol", seq: int, op: str, info: Any, code: Any, lasti: int,
                 pin_site: bool, root: int, reduce_op: int, step: int, array: Any,
                 flags_all: bytearray, deadline: Optional[float], own_error: Optional[str] = None,
                 own_overflow: Optional[bytes] = None) -> None:
    """Raise the error every rank agrees on: DesyncError, or EncodeError / PeerError.

    ``own_error`` is this rank's full error text when it failed (its slot may hold only the
    start of it); ``own_overflow`` the bytes it could not fit inline.
    """
    slot, recv = p.slot, p.recv
    failed = [r for r in range(p.size) if flags_all[r] & FLAG_LOCAL_ERROR]
    # A rank that failed before it knew its schema sent no fingerprint: leave it out of the
    # comparison, so a plain usage error on one rank reads as that error, not as a desync.
    regions = {bytes(recv[r * slot:r * slot + CHECKED]) for r in range(p.size) if r not in failed}
    if len(regions) > 1:
        mine = EnvelopeInfo(
            rank=p.rank, seq=seq, op=op, schema=info.name if info is not None else "?",
            fingerprint=info.fingerprint.hex() if info is not None else "",
            site=format_site(code, lasti), site_checked=pin_site,
            step=None if step == NO_STEP else step,
            root=root if op in ROOTED_OPS else None,
            reduce_op=REDUCE_OP_NAMES.get(reduce_op) if op in REDUCING_OPS else None,
            shape=tuple(array.shape) if isinstance(array, np.ndarray) else None,
            dtype=str(array.dtype) if isinstance(array, np.ndarray) else None,
            error=_split_error(own_error)[1] if own_error is not None else None)
        envelopes = exchange_infos(p, mine, deadline, seq, op, info, code, lasti)
        kinds = mismatch_kinds(envelopes)
        groups = group_envelopes(envelopes)
        raise DesyncError(desync_message(seq, p.name, kinds, groups), seq=seq, comm=p.name,
                          kinds=kinds, groups=groups)
    if not failed:
        return
    what = label(op, info)
    # Texts longer than the slot: every rank sees the same flags and lengths, so every rank
    # joins the same allgatherv of them (or none does).
    long_texts = None
    counts = [p_len if flags_all[r] & FLAG_LOCAL_ERROR and flags_all[r] & FLAG_OVERFLOW else 0
              for r, p_len in enumerate(p._lengths())]
    if any(counts):
        own = (own_overflow or b"") if counts[p.rank] else b""  # only an error text travels here
        try:
            long_texts = p.transport.allgatherv(own, counts, deadline)
        except TransportTimeout:
            timed_out(p, seq, op, info, code, lasti)
    if p.rank in failed:
        detail = _split_error(own_error)[1] if own_error is not None else error_text(p, p.rank)[1]
        raise EncodeError(f"collective #{seq} on {p.name}: rank {p.rank} could not send its "
                          f"{what} contribution: {detail}", seq=seq, comm=p.name)
    first = failed[0]
    if counts[first]:
        start = sum(counts[:first])
        error_type, detail = _split_error(bytes(long_texts[start:start + counts[first]])  # type: ignore[index]
                                          .decode(errors="replace"))
    else:
        error_type, detail = error_text(p, first)
    others = "" if len(failed) == 1 else f" (and {len(failed) - 1} more)"
    raise PeerError(f"collective #{seq} on {p.name}: rank {first}{others} failed its {what} "
                    f"contribution: {detail}", seq=seq, comm=p.name, ranks=failed,
                    error_type=error_type, detail=detail)


def error_text(p: "Protocol", rank: int) -> "tuple[str, str]":
    """(exception type name, message) that a failed rank put in its slot."""
    offset = rank * p.slot
    n = int.from_bytes(p.recv[offset + LENGTH_OFFSET:offset + HEADER_SIZE], "little")
    n = min(n, p.slot - HEADER_SIZE)  # a corrupt length must not read past the slot
    return _split_error(bytes(p.recv[offset + HEADER_SIZE:offset + HEADER_SIZE + n])
                        .decode(errors="replace"))


def _split_error(text: Optional[str]) -> "tuple[str, str]":
    kind, _, detail = (text or "").partition(": ")
    return kind, detail


def exchange_infos(p: "Protocol", mine: EnvelopeInfo, deadline: Optional[float], seq: int,
                   op: str, info: Any, code: Any, lasti: int) -> List[EnvelopeInfo]:
    """Allgather every rank's readable envelope: lengths first, so every rank's counts agree."""
    payload = ENCODER.encode(mine)
    try:
        lengths = p.transport.allgatherv(len(payload).to_bytes(4, "little"), [4] * p.size,
                                         deadline)
        counts = [int.from_bytes(lengths[4 * r:4 * r + 4], "little") for r in range(p.size)]
        blob = p.transport.allgatherv(payload, counts, deadline)
    except TransportTimeout:
        timed_out(p, seq, op, info, code, lasti)
    out, offset = [], 0
    for r, count in enumerate(counts):
        try:
            out.append(_ENVELOPE_INFO_DECODER.decode(blob[offset:offset + count]))
        except Exception as exc:  # untrusted bytes: any decoder failure is a decode error
            raise DecodeError(f"collective #{seq} on {p.name}: the envelope description from "
                              f"rank {r} does not decode: {exc}", seq=seq, comm=p.name, source=r,
                              schema="EnvelopeInfo") from exc
        offset += count
    return out


def timed_out(p: "Protocol", seq: int, op: str, info: Any, code: Any, lasti: int) -> None:
    """Raise CollectiveTimeout; the communicator is unusable from now on."""
    schema = info.name if info is not None else "?"
    site = format_site(code, lasti)
    text = (f"collective #{seq} on {p.name}: {label(op, info)} at {site} did not complete "
            f"within {p.timeout:g} s")
    missing = None
    if p.hang_reporter is not None:
        try:
            missing, report = p.hang_reporter(p, seq)
            if report:
                text += "\n" + report
        except Exception as exc:  # a failing report must not hide the timeout itself
            text += f"\n(hang report unavailable: {type(exc).__name__}: {exc})"
    err = CollectiveTimeout(text, seq=seq, comm=p.name, op=op, schema=schema, site=site,
                            timeout=p.timeout or 0.0, missing=missing)
    p.broken = err
    raise err


def refuse_broken(p: "Protocol", op: str, info: Any) -> None:
    """Raise for a call on a communicator whose earlier collective timed out."""
    cause = p.broken
    assert cause is not None  # only called when broken is set
    raise CollectiveTimeout(
        f"collective #{p.seq} on {p.name}: {label(op, info)} refused: the communicator is "
        f"unusable since collective #{cause.seq} ({cause.op}[{cause.schema}] at {cause.site}) "
        f"timed out", seq=p.seq, comm=p.name, op=op,
        schema=info.name if info is not None else "?", site=cause.site, timeout=cause.timeout,
        missing=cause.missing)


def decode_failure(p: "Protocol", seq: int, op: str, info: Any, source: int,
                   exc: Exception) -> Exception:
    """The error for a payload that does not decode: the sender's own, or its peers'."""
    if source == p.rank:
        return EncodeError(f"collective #{seq} on {p.name}: rank {p.rank} could not send its "
                           f"{label(op, info)} contribution: {exc}", seq=seq, comm=p.name)
    return DecodeError(f"collective #{seq} on {p.name}: payload from rank {source} does not "
                       f"decode as {info.name}: {exc}", seq=seq, comm=p.name, source=source,
                       schema=info.name)


register_internal(__file__)
