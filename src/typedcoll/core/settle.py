"""Settling decoding that runs user code: every rank raises in the call, or none does.

Decoding is a function of the bytes and the schema, the same on every rank that decodes a
payload, except where the schema's classes define hooks that msgspec runs as it builds them
(``__post_init__``, attrs validators: ``codecs.hooks``). A hook may read rank-local state, and
then the same payload decodes on one rank and is refused on another: without this step the
first returns while the second raises, and a ``SymmetricFlush`` keeps the refused batch pending
on one rank after its peers delivered it.

So a call whose header says that some rank's schema runs a hook (``FLAG_DECODE_HOOK``, read from
the agreement block, hence on every rank alike) ends with one more REDUCE exchange, op
``settle``, in which each rank flags whether its own decoding failed (after an error that
every rank raised anyway, too: a rank cannot know that its peers raised). Where any rank
flagged, the readable envelopes are exchanged once more; a rank that failed raises its own
error, the others a :class:`PeerError` naming it. Schemas without hooks never pay this step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from .call import Call
from .errors import CollectiveError, DecodeError, EncodeError, PeerError
from .mismatch import compact_ranks, label, place
from .plumbing import register_internal
from .verdict import describe_call, disagreement, exchange_infos, where
from .wire import FLAG_LOCAL_ERROR, FLAGS_OFFSET, HEADER_SIZE, agreed, block_flags

if TYPE_CHECKING:
    from .protocol import Protocol


def settled(p: "Protocol", call: Call, rest: Callable[[Call], Any]) -> Any:
    """``rest(call)`` (phase 2 and decoding), settled on every rank where ``call.settles``
    (set from the exchange's flags, or by a receiver's search for the root's class in
    ``rest`` itself: read after it)."""
    try:
        result = rest(call)
    except (DecodeError, EncodeError, PeerError) as exc:
        if call.settles:
            settle_decoding(p, call, exc)
        raise
    except CollectiveError:
        raise  # a timeout, a lost peer: not every rank may come to a settle
    except BaseException as exc:  # an interrupt in a hook: its peers must not wait for it
        if call.settles:
            settle_decoding(p, call, exc)
        raise
    if call.settles:
        settle_decoding(p, call, None)
    return result


def settle_decoding(p: "Protocol", call: Call, exc: Optional[BaseException]) -> None:
    """The settle exchange; returns where no rank failed, or where this one did (its caller
    raises its own error; where that is the EncodeError of its own payload, which a peer
    decoded, this raises its DecodeError instead), else raises the PeerError naming the ranks
    that failed."""
    error = None
    # This rank's own payload refused here: its peers are told the error it raises where they
    # decoded the payload, the only case in which they read what it says.
    local = getattr(exc, "refused_here", None)
    told = local or exc
    if told is not None:
        text, head = str(told), where(p, call) + ": "
        error = f"{type(told).__name__}: {text[len(head):] if text.startswith(head) else text}"
    # A deadline of its own: the time the hooks took is the caller's, not a late peer's.
    call.deadline = p.deadline()
    error = p.settle_exchange(call, error)
    if not block_flags(p.block) & FLAG_LOCAL_ERROR:
        if not agreed(p.block):
            disagreement(p, call)  # headers that differ in a settle: a corrupt peer; raises
        return
    header = bytes(p.send[:HEADER_SIZE])
    pairs = exchange_infos(p, call, header, describe_call(p, call, error))
    failed = [r for r, (h, _) in enumerate(pairs) if h[FLAGS_OFFSET] & FLAG_LOCAL_ERROR]
    if exc is not None:
        if local is not None and len(failed) < p.size:
            # A peer decoded what this rank sent and refused itself: the refusal is this
            # rank's, not the value's (it was sent, and EncodeError would say it was not).
            raise local from exc.__cause__
        return
    first = pairs[failed[0]][1]
    more = "" if len(failed) == 1 else f" (and {compact_ranks(failed[1:])})"
    detail = f"{first.error_type}: {first.error}" if first.error_type else first.error or ""
    # Named from what every rank exchanged (a bcast receiver that named no schema knows none).
    schema = next((info.schema for _, info in pairs if info.schema), "")
    interrupted = first.error_type in _INTERRUPTS
    verb = "was interrupted" if interrupted else "refused"
    why = "" if interrupted else (
        " (decoding runs the schema's __post_init__ or validators, which judged the same "
        "bytes differently on different ranks: they must decide from the fields alone)")
    raise PeerError(f"{where(p, call)}: rank {first.rank}{more} {verb} in decoding what the "
                    f"other ranks decoded, in {label(call.op, schema)} at "
                    f"{place(first, callers=False)}: {detail}{why}", seq=call.seq,
                    comm=p.name, ranks=failed, error_type=first.error_type or "",
                    detail=first.error or "")


# Not errors of a hook's judgement: what a rank raised because it was told to stop.
_INTERRUPTS = frozenset({"KeyboardInterrupt", "SystemExit", "GeneratorExit", "CancelledError"})


register_internal(__file__)
