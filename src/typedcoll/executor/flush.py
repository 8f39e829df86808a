"""SymmetricFlush: conditional messages posted locally, drained by one typed collective.

The bug class: a collective issued under a rank-local condition (this rank has a previous batch,
timed-out requests, metrics turned on) makes the ranks' sequences of collectives differ by one,
and every later collective pairs the wrong calls. The fix is structural: code under a rank-local
condition never issues a collective, it only *posts* a message to a named channel. At a flush
point that every rank reaches the same number of times, one collective drains every channel at
once: each rank contributes its pending messages (an empty batch when it has none), and every
rank receives every rank's.

Wire format. A flush is one typed allgather whose envelope op is ``flush`` and whose schema is
the batch Struct: one field per channel (in declaration order), each a tuple of that channel's
message type, ``array_like``, so every rank decodes typed messages, never unpickled ones. A rank
with nothing pending sends the prebuilt empty batch (one byte per channel and one more).
Coalescing is the point: draining each channel with its own collective costs one collective per
channel per iteration; here one collective carries the whole control plane of an iteration.

How a flush reached under a rank-local condition is caught. The flush is itself a collective, so
calling it on some ranks only would re-create the bug one level up. Its envelope makes that a
:class:`~typedcoll.DesyncError` on every rank, in the flush itself or in the very next
collective, never a misdelivery:
  - the other ranks are in another collective: the envelopes differ in op (``flush`` against
    ``allgather``...), schema and call;
  - the other ranks are at another flush point: a flush's identity is its call site (or its
    ``name=``), compared like every collective's;
  - the other ranks are at the same flush point one iteration later: the step differs (pass the
    iteration as ``step``);
  - the ranks declared different channels: the batch Struct's fingerprint differs (schema);
  - the ranks flushed different SymmetricFlush objects from one line (a loop over them, a helper
    that flushes the one it is given): each object's batch Struct is named where the object was
    created, ``FlushBatch@engine.py:40`` (``#2`` for the second made there with the same
    channels on the communicator, in each rank's order of making them), so the schemas differ.
    Objects that are one flush point (a driver's and its workers', built at two lines) say so by
    flushing with one ``name=``, which uses the plain batch (``batch_name``, else
    ``FlushBatch``).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import msgspec

from .. import codecs
from .._comm import TypedComm
from ..core import fast, ops
from ..core.errors import EncodeError
from ..core.plumbing import register_internal
from ..core.site_walk import user_frame
from ..core.sites import format_site


_C = fast.entries()  # the C path's entry points (None without the extension)


class Delivery:
    """What one flush delivered: every rank's messages per channel, in rank then post order.

    ``delivery[channel]`` is a list with one tuple per rank (empty when that rank posted
    nothing); ``delivery.messages(channel)`` yields ``(source_rank, message)`` pairs. Views are
    built when first asked for: a consumer that reads one channel pays for that one only.
    """

    __slots__ = ("step", "seq", "channels", "_batches", "_views", "_count")

    def __init__(self, step: int, seq: int, channels: Tuple[str, ...],
                 batches: List[Any]) -> None:
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

    ``channels`` maps each channel name to its message type (any type msgspec decodes, usually a
    Struct); every rank must declare the same channels in the same order, or the first flush
    raises :class:`~typedcoll.DesyncError` (schema). :meth:`post` is local and never
    communicates, so it may be called under any rank-local condition; :meth:`flush` is a
    collective and must be reached the same number of times on every rank, from the same line
    or with the same ``name=`` (see the module docstring for how a violation is reported).
    ``batch_name`` names the batch schema, which is part of every flush's envelope. By default
    it is where this object was created (``FlushBatch@engine.py:40``, then ``...#2`` for the
    second made there with the same channels on this communicator, in the order each rank makes
    them), so a rank that flushes one object where its peers flush another raises DesyncError
    instead of receiving the other's messages. Objects made in an order that differs between
    ranks (lazily, per stage) each need a ``batch_name`` of their own. A flush given a
    ``name=`` is that named collective whatever object flushes it: its batch is ``batch_name``,
    else plain ``FlushBatch``.
    """

    def __init__(self, comm: TypedComm, channels: Mapping[str, Any], *,
                 batch_name: Optional[str] = None) -> None:
        if not channels:
            raise ValueError("expected at least one channel, got none")
        self.comm = comm
        self.channels: Tuple[str, ...] = tuple(channels)
        # Frozen tuples, so one consumer of a delivery cannot mutate it under another's feet;
        # array_like, so channel names are not repeated in every rank's payload.
        fields = [(ch, Tuple[tp, ...], ()) for ch, tp in channels.items()]
        plain = msgspec.defstruct(batch_name or "FlushBatch", fields, frozen=True,
                                  array_like=True)
        # Resolved here, on every rank alike: a channel type msgspec cannot handle fails at
        # construction on the rank that built it, rather than at the first flush.
        channels_fingerprint = codecs.resolve(plain).fingerprint
        own = plain
        if batch_name is None:
            own = msgspec.defstruct(_created_here(comm, channels_fingerprint), fields,
                                    frozen=True, array_like=True)
            codecs.resolve(own)
        self._batch_type, self._empty = own, own()
        self._named_type, self._named_empty = plain, plain()  # for flushes given a name=
        self._queues: List[List[Any]] = [[] for _ in self.channels]
        # post() runs several times per iteration: one dict lookup gives the queue and the type
        # to check: the class, or for Optional[Rec], list[Rec]... the schema's walk of the
        # records inside it (codecs.records; None where it holds none: msgspec checks those).
        self._post_to = {ch: (queue, codecs.resolve(tp).record_class or (
                                  tp if isinstance(tp, type) and tp is not Any else None))
                         for (ch, tp), queue in zip(channels.items(), self._queues)}
        self._flushed = [0] * len(self.channels)
        self._types = tuple(channels.values())
        self.flushes = 0
        # (channel, message, why): messages this rank posted that do not fit their channel's
        # type. A flush that could not send them took them out of its queues (they would fail
        # every later flush) and raised EncodeError naming them; they are kept here.
        self.rejected: List[Tuple[str, Any, str]] = []

    def post(self, channel: str, message: Any) -> None:
        """Queue ``message`` on ``channel`` until the next flush; local, never communicates.

        Raises KeyError for an undeclared channel and TypeError when ``message`` is not an
        instance of the channel's type: both are bugs of the posting code, raised here on the
        posting rank rather than as an error on every rank at the flush. Any thread may post,
        also while :meth:`flush` runs on another: a message goes out in this flush or the next.
        """
        target = self._post_to.get(channel)
        if target is None:
            raise KeyError(f"expected a channel in {list(self.channels)}, got {channel!r}")
        queue, expected = target
        if expected is not None and not isinstance(message, expected):
            walk = getattr(expected, "check", None)
            wanted = codecs.resolve(self._types[self.channels.index(channel)]).name if walk \
                else expected.__name__
            got = walk(message) if walk else type(message).__name__
            raise TypeError(f"channel {channel!r}: expected {wanted}, got {got}")
        queue.append(message)

    @property
    def num_pending(self) -> int:
        """Messages posted on this rank since the last flush."""
        return sum(map(len, self._queues))

    @property
    def posted(self) -> Dict[str, int]:
        """Messages posted on this rank so far, per channel (flushed or pending)."""
        return {ch: done + len(queue)
                for ch, done, queue in zip(self.channels, self._flushed, self._queues)}

    def flush(self, step: Optional[int] = None, *, name: Optional[str] = None) -> Delivery:
        """Drain every channel on every rank: one ``flush`` collective.

        ``step`` (the iteration, say) goes into the envelope and, once the flush succeeded,
        becomes the communicator's step clock (:meth:`TypedComm.set_step`), so the collectives
        after the flush are stamped with it too; those before it carry the clock as it was (a
        flush at an iteration's end needs ``set_step(it)`` at the top to stamp the iteration's
        earlier collectives: a rank that skipped a whole iteration would otherwise meet its
        peers' previous iteration there unnoticed). Without one, the flush carries
        the clock if it was set, else its own ordinal. ``name`` gives the flush an identity of
        its own (default: its call site). Every rank receives every rank's pending messages and
        this rank's queues are emptied; a flush that raises leaves them pending.
        """
        comm = self.comm
        sets_clock = step is not None
        if step is None:
            clock = comm.step
            step = self.flushes if clock is None else clock
        queues = self._queues
        pending = any(queues)
        if name is None:
            batch_type, empty = self._batch_type, self._empty
        else:
            batch_type, empty = self._named_type, self._named_empty
        # What is sent, taken once: another thread may post while the collective runs, and
        # only what was sent leaves the queues below.
        sent = tuple(map(tuple, queues)) if pending else ()
        batch = batch_type(*sent) if pending else empty
        seq = comm.seq
        # A bad step or name is flagged in the flush itself: every rank raises there together.
        # The C path's steady state is called from here (see TypedComm.allgather).
        p = comm._p
        out = None
        try:
            if p.fast is not None:
                out = _C.allgather(p, batch, batch_type, step, name, "flush")
            received = out if out.__class__ is list else ops.allgather(
                p, batch, batch_type, step, name, op="flush", out=out)
        except EncodeError as exc:
            rejected = self._take_unfit() if pending else []
            if not rejected:
                raise
            raise EncodeError(
                f"{exc}\n  messages that do not fit their channel's type, taken out of this "
                f"rank's queues (in SymmetricFlush.rejected) so that the next flush delivers the "
                f"rest: {'; '.join(rejected)}", seq=exc.seq, comm=exc.comm) from exc
        if sets_clock:
            # Only once every rank agreed on the step: a failed flush leaves every rank's clock
            # as it was.
            comm.set_step(step)
        # Emptied only once delivered: a flush that raised leaves its messages pending.
        if pending:
            flushed = self._flushed
            for i, (queue, taken) in enumerate(zip(queues, sent)):
                if taken:
                    flushed[i] += len(taken)
                    del queue[:len(taken)]  # posts only append: these are the ones sent
        self.flushes += 1
        return Delivery(step, seq, self.channels, received)

    def _take_unfit(self) -> List[str]:
        """This rank's batch did not encode or fit its type: take out the messages that do not
        fit their channel's type (each checked alone, as its peers would decode it), into
        ``rejected``; what was taken, as text."""
        taken: List[str] = []
        for channel, queue, tp in zip(self.channels, self._queues, self._types):
            decode = codecs.resolve(tp).decode  # the decoder the peers' batch type uses
            keep, checked = [], queue[:]
            for message in checked:
                try:
                    decode(codecs.ENCODER.encode(message))
                except Exception as exc:  # what the encoder hooks or a message's own code raise
                    # (an unsupported type is NotImplementedError): unfit, whatever it is
                    why = f"{type(exc).__name__}: {exc}"
                    self.rejected.append((channel, message, why))
                    taken.append(f"{channel!r}: {message!r:.200} ({why})")
                else:
                    keep.append(message)
            queue[:len(checked)] = keep  # a message posted meanwhile by another thread stays
        return taken


_MADE_LOCK = threading.Lock()  # two threads making flushes on one communicator count apart


def _created_here(comm: TypedComm, channels_fingerprint: bytes) -> str:
    """The default batch name: ``FlushBatch@`` the creating call site, with ``#k`` from the
    second object made there with the same channels on ``comm``. Counted per channels, so an
    object of other channels made at a factory's line does not renumber the rest."""
    frame = user_frame(1)  # this module's frames are passed over
    site = format_site(frame.f_code, frame.f_lasti) if frame is not None else "?"
    key = (site, channels_fingerprint)
    with _MADE_LOCK:
        made: Dict[Tuple[str, bytes], int] = comm._p.extensions.setdefault("flushes", {})
        count = made[key] = made.get(key, 0) + 1
    return f"FlushBatch@{site}" + (f"#{count}" if count > 1 else "")


register_internal(__file__)
