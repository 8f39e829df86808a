"""Communicator lifetime as collectives: creation, split, dup and free, each checked like any other.

Creation agrees on the settings every rank must share (the timeout: with one, the backend calls
are nonblocking, without one blocking, and backends never match one with the other), so a bad or
different setting on one rank raises on every rank instead of hanging the others. ``split`` and
``dup`` first exchange their arguments in band (a bad color on one rank raises everywhere), then
make the backend communicator; ``free`` is a collective too, so a rank that frees while its peers
still call raises a DesyncError rather than leaving them waiting.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import msgspec

from ..codecs import resolve
from .args import check_color_key, check_timeout, first_error
from .call import MODE_EMPTY, MODE_MSG, Call
from .channel import Channel
from .desync import desync_message
from .errors import CREATE_SEQ, DesyncError
from .plumbing import register_internal
from .sites import COLUMNS, NO_COLUMNS
from .mismatch import MismatchKind, group_envelopes
from .ops import _common, run
from .payloads import gathered
from .protocol import Protocol
from .verdict import describe_call, where
from .wire import GATHER, REDUCE

# (timeout given, its seconds, the interpreter compiles column positions: sites.COLUMNS)
_SETTINGS = resolve(Tuple[bool, float, bool])
_SPLIT = resolve(Tuple[int, int])
_P2P_COUNTS = resolve(Tuple[int, int])  # (messages sent, messages taken from the transport)
_p2p_counts_decoder = msgspec.msgpack.Decoder(Tuple[int, int])
_settings_decoder = msgspec.msgpack.Decoder(Tuple[bool, float, bool])


def _settings_text(timeout: Optional[float], columns: bool = COLUMNS) -> str:
    text = "timeout=None" if timeout is None else f"timeout={timeout:g}"
    return text if columns else f"{text}, {NO_COLUMNS}"


def create(p: Protocol, timeout: Any) -> None:
    """The creation exchange: every rank checks and compares the settings (its timeout, and
    whether call sites hold columns: ranks that differ would name every call differently)."""
    error = check_timeout(timeout)
    value = ((False, 0.0) if error is not None or timeout is None else (True, float(timeout))) \
        + (COLUMNS,)
    call = Call("create", GATHER, _SETTINGS, MODE_MSG, value, error=error,
                settings=_settings_text(None if error else timeout), clocked=False)
    call.seq = CREATE_SEQ

    def compare(c: Call) -> None:
        if c.deadline is None:  # the settings are not agreed yet: no blocking backend forms
            c.deadline = math.inf
        settings = []
        for buf in gathered(p, c):
            given, seconds, columns = _settings_decoder.decode(buf)
            settings.append((seconds if given else None, columns))
        if len(set(settings)) == 1:
            return
        mine = describe_call(p, c)
        infos = [msgspec.structs.replace(mine, rank=r, settings=_settings_text(*s), thread="",
                                         notes=()) for r, s in enumerate(settings)]
        kinds = [MismatchKind.SETTINGS]
        groups = group_envelopes(infos)
        raise DesyncError(desync_message(c.seq, p.name, kinds, groups, head=where(p, c)),
                          seq=c.seq, comm=p.name, kinds=kinds, groups=groups)
    run(p, call, compare)


def split(p: Protocol, color: Any, key: Any, step: Any, name: Any,
          make: Callable[[Any, str], Any]) -> Any:
    """The exchange of (color, key), then the backend split; ``make(transport, name)``. The
    child is called by the call's ``name=`` where one was given (``tp``: the name every rank
    of the split agreed on), else ``parent.split(color)``."""
    arg_error = check_color_key(color, key)
    step, name, common_error = _common(step, name)
    value = (-1 if color is None else int(color), int(key)) if arg_error is None else (0, 0)
    call = Call("split", GATHER, _SPLIT, MODE_MSG, value, step=step, name=name,
                error=first_error(arg_error, common_error))

    def rest(c: Call) -> Any:
        sub = p.transport.split(None if color is None else int(color), int(key))
        return None if sub is None else make(sub, name or f"{p.name}.split({color})")
    return run(p, call, rest)


def dup(p: Protocol, step: Any, name: Any, make: Callable[[Any, str], Any]) -> Any:
    step, name, error = _common(step, name)
    call = Call("dup", REDUCE, None, MODE_EMPTY, None, step=step, name=name, error=error)
    return run(p, call, lambda c: make(p.transport.dup(), name or f"{p.name}.dup"))


def free(p: Protocol) -> None:
    """Collective: every rank frees together; the private channel goes with its last user.

    Each rank brings how many point-to-point messages it sent on the channel and how many it
    took from the transport. Where the sums differ, a message is still in the backend (sent and
    never received, or late for a receive that timed out): MPI would hand the freed context,
    and that message with it, to a later communicator, whose first receive would take it as
    its own. Every rank then keeps the channel's transport instead of freeing it (as for a
    timed-out call), the same verdict everywhere. The counts are the channel's, shared by its
    TypedComms: only the last user's free decides (an earlier one's message may still be
    taken). A program that sends on the channel from another thread while freeing it breaks
    the one-thread-per-communicator rule, and the counts then prove nothing.
    """
    if p.freed:
        return
    box = p.channel.mailbox
    counts = (box.sent, box.delivered) if box is not None else (0, 0)
    # Not stamped with the step clock: after a caught DesyncError the ranks' clocks may differ,
    # and freeing must still work.
    call = Call("free", GATHER, _P2P_COUNTS, MODE_MSG, counts, clocked=False)

    def balanced(c: Call) -> bool:
        totals = [_p2p_counts_decoder.decode(buf) for buf in gathered(p, c)]
        return sum(sent for sent, _ in totals) == sum(taken for _, taken in totals)
    release(p, settled=run(p, call, balanced) or p.channel.users > 1)


def release(p: Protocol, settled: bool = False) -> None:
    """Mark ``p`` freed, and free its channel's transport when it was the last user.
    ``settled``: every rank frees ``p`` together (``free``); otherwise it is released on this
    rank alone (a ``with`` block left by an exception, a failed creation), and its peers may
    still send to it, so the channel's transport is kept rather than freed (Transport.free)."""
    p.freed = True
    p.refresh_fast()
    channel: Channel = p.channel
    if not settled:
        channel.settled = False
    if channel.release():
        channel.close()


register_internal(__file__)
