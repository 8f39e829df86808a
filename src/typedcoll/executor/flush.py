"""SymmetricFlush: conditional messages posted locally, drained by one typed collective.

The bug class (field notes §1): a collective issued under a rank-local condition (this rank has a
previous batch, timed-out requests, metrics turned on) makes the ranks' collective sequences differ
by one, and every later collective pairs the wrong calls. The fix is structural: code under a
rank-local condition never issues a collective; it only *posts* a message to a named channel.
At a flush point that every rank reaches the same number of times, one collective drains every
channel at once: each rank contributes its pending messages (an empty batch when it has none),
and every rank receives every rank's.

Wire format. A flush is one typed ``allgather`` whose envelope op is ``"flush"``, with the call
site pinned, and whose schema is the batch Struct: one field per channel (declaration order),
each a tuple of that channel's message type, array_like, so the payload is decoded by msgspec
into typed messages, never unpickled. The sender encodes a plain tuple of tuples,
msgpack-identical to the Struct, without building one. A rank with nothing pending sends the
empty batch (1 + one byte per channel), not None under ``Optional[...]``, whose typing object
Python hashes slowly on every lookup of its schema. Coalescing is the point: the fix that
inspired this drains each channel with its own collective; here one collective carries the whole
control plane of an iteration (field notes §1: "the fix still costs one collective per drained
channel per iteration").

How a flush reached under a rank-local condition is caught. The flush is itself a collective, so
calling it on some ranks only re-creates the bug one level up. Its envelope makes that a
:class:`~typedcoll.DesyncError` on every rank, in the flush call itself or in the very next
collective, never a silent misdelivery:
  - the other ranks are in a different collective at that sequence number: the envelopes differ
    in op (``flush`` against ``allgather``...), schema, and call site;
  - the other ranks are in a flush too, but a different flush point: the call site is part of the
    compared header (``pin_site``), so ``CALL_SITE`` differs, even when schema and step agree;
  - the other ranks are at the same flush point, but one iteration later: the step differs (pass
    the iteration as ``step``; by default the step is the flush's own ordinal, which differs just
    the same);
  - the ranks built the flush with different channels: the batch Struct's fingerprint differs
    (``SCHEMA``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import msgspec

from .. import codecs
from .._callsite import register_internal
from .._comm import TypedComm



class Delivery:
    """What one flush delivered: every rank's messages per channel, in rank then post order.

    ``delivery[channel]`` is a list with one tuple per rank (empty when that rank posted nothing);
    ``delivery.messages(channel)`` yields ``(source_rank, message)`` pairs. Views are built when
    asked for: a flush whose delivery is only partly read pays only for what is read.
    """

    __slots__ = ("step", "seq", "channels", "_batches", "_views", "_count")

    def __init__(self, step: int, seq: int, channels: Tuple[str, ...], batches: List[Any]) -> None:
        self.step = step
        self.seq = seq
        self.channels = channels
        self._batches = batches  # one decoded batch Struct per rank
        self._views: Dict[str, List[Tuple[Any, ...]]] = {}
        self._count = -1

    def __getitem__(self, channel: str) -> List[Tuple[Any, ...]]:
        view = self._views.get(channel)
        if view is None:
            if channel not in self.channels:
                raise KeyError(f"expected a channel in {list(self.channels)}, got {channel!r}")
            view = self._views[channel] = [getattr(batch, channel) for batch in self._batches]
        return view

    def messages(self, channel: str) -> Iterator[Tuple[int, Any]]:
        for rank, posted in enumerate(self[channel]):
            for message in posted:
                yield rank, message

    def latest(self, channel: str) -> List[Any]:
        """Each rank's last message on ``channel``, None for ranks that posted none."""
        return [posted[-1] if posted else None for posted in self[channel]]

    def __len__(self) -> int:
        if self._count < 0:
            self._count = sum(len(posted) for batch in self._batches
                              for posted in msgspec.structs.astuple(batch))
        return self._count

    def __repr__(self) -> str:
        return f"Delivery(step={self.step}, seq={self.seq}, messages={len(self)})"


class SymmetricFlush:
    """Named channels of typed messages, drained on every rank by one ``flush`` collective.

    ``channels`` maps each channel name to its message type (any type msgspec can decode, usually
    a Struct); every rank must declare the same channels in the same order, or the first flush
    raises :class:`~typedcoll.DesyncError` (schema). :meth:`post` is local and never
    communicates, so it may be called under any rank-local condition; :meth:`flush` is a
    collective and must be reached the same number of times on every rank, from the same line
    (see the module docstring for how a violation is reported).
    """

    def __init__(self, comm: TypedComm, channels: Mapping[str, Any], *,
                 name: str = "FlushBatch") -> None:
        if not channels:
            raise ValueError("expected at least one channel, got none")
        self.comm = comm
        self.channels: Tuple[str, ...] = tuple(channels)
        # One Struct per flush layout; frozen tuples so a delivered batch cannot be mutated by one
        # consumer under another's feet. array_like: field names would be repeated per rank.
        self._batch_type = msgspec.defstruct(
            name, [(ch, Tuple[tp, ...], ()) for ch, tp in channels.items()],  # type: ignore[valid-type]
            frozen=True, array_like=True)
        # Sent as a plain tuple of tuples: msgpack-identical to the array_like batch Struct it
        # decodes as, without building the Struct on the sending side.
        self._empty = ((),) * len(self.channels)
        # Resolved here, on every rank alike: a bad channel type fails at construction, on the
        # rank that built it, rather than at the first flush.
        codecs.resolve(self._batch_type)
        self._queues: List[List[Any]] = [[] for _ in self.channels]
        # post() is called several times per iteration: one dict lookup gives the queue and the
        # type to check (None where isinstance cannot check it, e.g. Optional[...]).
        self._post_to = {ch: (queue, tp if isinstance(tp, type) else None)
                         for (ch, tp), queue in zip(channels.items(), self._queues)}
        self._flushed = [0] * len(self.channels)
        self._allgather = comm._p.allgather
        self.flushes = 0

    def post(self, channel: str, message: Any) -> None:
        """Queue ``message`` on ``channel`` until the next flush; local, never communicates.

        Raises KeyError for an undeclared channel and TypeError when ``message`` is not an
        instance of the channel's type (for Struct, scalar and container channel types): both are
        bugs of the posting code, raised here on the posting rank rather than as a decode error on
        every rank at the flush.
        """
        target = self._post_to.get(channel)
        if target is None:
            raise KeyError(f"expected a channel in {list(self.channels)}, got {channel!r}")
        queue, expected = target
        if expected is not None and not isinstance(message, expected):
            raise TypeError(f"channel {channel!r}: expected {expected.__name__}, got "
                            f"{type(message).__name__}")
        queue.append(message)

    @property
    def num_pending(self) -> int:
        """Messages posted on this rank since the last flush."""
        return sum(map(len, self._queues))

    @property
    def posted(self) -> Dict[str, int]:
        """Messages posted on this rank so far, per channel (flushed or pending); a new dict on
        every read (what each rank received is counted by its :class:`Delivery`)."""
        return {ch: done + len(queue)
                for ch, done, queue in zip(self.channels, self._flushed, self._queues)}

    def flush(self, step: Optional[int] = None) -> Delivery:
        """Drain every channel on every rank: one ``flush`` collective, call site pinned.

        ``step`` (the iteration, say) goes into the envelope; None uses this flush's ordinal.
        Every rank receives every rank's pending messages; this rank's queues are emptied.
        """
        if step is None:
            step = self.flushes
        queues = self._queues
        batch = self._empty
        if any(queues):
            batch = tuple(map(tuple, queues))
            flushed = self._flushed
            for i, queue in enumerate(queues):
                if queue:
                    flushed[i] += len(queue)
                    queue.clear()
        seq = self.comm._p.seq
        received = self._allgather(batch, self._batch_type, step, "flush", True)
        self.flushes += 1
        return Delivery(step, seq, self.channels, received)


register_internal(__file__)
