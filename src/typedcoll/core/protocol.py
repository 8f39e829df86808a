"""The backend-independent protocol: one exchange, one verdict, then the op's own second phase.

Every typed collective, whatever its kind, runs these steps (``ops`` holds each op's choices):

  1. Start. Refuse at once, on this rank only, a call on a freed or broken communicator or one
     entered while another thread is inside a collective on the same channel (nothing was sent:
     no peer is waiting for this call). Take the next sequence number and find the call's
     identity: its ``name=``, else its call site.
  2. Encode (``encode_step``, a base of ``Protocol``). This rank's contribution becomes its
     payload; any failure (a bad argument, a value msgspec cannot encode or that fails the
     schema) becomes an error text instead, flagged in the header. A rank never raises
     before step 3: its peers would wait for it.
  3. Exchange (``transport.exchange``; one backend operation of one of two shapes). Each rank
     writes its slot: the 64-byte header (``wire``) and, when it fits, its payload. GATHER gives
     every rank every slot (allgather, allreduce, flush, split); REDUCE gives every rank the OR
     of every header and a root's payload in O(log N) (bcast, barrier, gather, scatter, reduce,
     alltoall: their payloads then move on the backend's own rooted collective). Either way every
     rank also gets the agreement block, and ranks that disagree about the shape still meet.
  4. Verdict, from the agreement block, the same bytes on every rank, hence the same verdict.
     A receiver of ``bcast`` or ``scatter`` that names no schema sends, as if it had named it,
     the root's class it took at the same call last time, and where headers differ and any
     rank did so, every rank exchanges once more (``guesses``); so does a call that sent the
     role identity it learned in a role branch in place of its call site (``roles``). Then:
     headers differ or some rank flagged an error -> ``verdict.disagreement`` exchanges the
     readable envelopes once and raises the same DesyncError (or EncodeError on the failed
     rank and PeerError elsewhere) on every rank. Every rank also feeds the same number to
     the same slot-size rule, so the next slot size needs no message.
  5. Phase 2 (``payloads``; only for payloads that overflowed, or for ops whose payload moves
     on a rooted collective): counts come from headers every rank has seen, so every rank joins
     the same backend operations. Then typed decoding, never pickle: a payload that does not
     decode raises the same error on every rank that decodes it, whatever its stack depth.
     Where some rank's schema runs user code when decoding (``__post_init__``), every rank
     then settles the outcome with one more exchange (``settle``): every rank raises or none.

With ``timeout``, one deadline bounds every backend operation of the call. The C fast path
(``fast``) runs steps 1-4 and the decoding of the steady state; it hands anything else to these
Python steps with the exchange's result, so both reach the same verdicts from the same bytes.
"""

from __future__ import annotations

import threading
import time
import weakref
from types import FrameType
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..codecs import SchemaInfo
from . import callers, guesses, roles, verdict
# The creation exchange is the first traffic on a new backend group, which may still be
# connecting its ranks (gloo does so lazily, slowly on a loaded host): it waits at least
# CREATION_MIN_TIMEOUT whatever the communicator's timeout, so a tight timeout bounds
# collectives, not start-up.
from .verdict import CREATION_MIN_TIMEOUT
from .call import MODE_EMPTY, Call
from .callers import callers_of
from .channel import BUSY_CODE, BUSY_LASTI, Channel, thread_label
from .errors import CREATE_SEQ, CollectiveError, ConcurrentCallError, sendable
from .mismatch import Note
from .encode_step import EncodeStep
from .identity import name_fingerprint, site_fingerprint
from .plumbing import register_internal
from .site_walk import call_site, user_frame
from .sites import format_site
from .recorder import FlightRecorder, capacity_from_env
from .wire import (AGREE_SIZE, FLAG_DECODE_HOOK, FLAG_GUESSED, FLAG_LOCAL_ERROR, FLAG_OVERFLOW,
                   FLAG_RECEIVERS_ARM, FLAG_ROLE, FLAG_SPLIT_ARRAY, FLAG_WILD_SCHEMA, HEADER,
                   HEADER_SIZE, MAGIC, NATIVE_LITTLE, NO_ROOT, NO_STEP, OPS, REDUCE, SlotPolicy,
                   agreed, block_flags, block_length, instances_differ, slot_log2)
from .transport import TransportTimeout

_ZEROS = bytes(8)
_INT64 = 2 ** 63
_MAX_ERROR_TEXT = 4096  # bytes of a failed rank's error text that reach its peers

# Called as hook(protocol, error) before a CollectiveError propagates (diagnostics dumps).
ERROR_HOOKS: List[Callable[["Protocol", BaseException], None]] = []
# Called as hook(protocol) when a communicator is created (diagnostics attach hang reporters).
NEW_PROTOCOL_HOOKS: List[Callable[["Protocol"], None]] = []
# Every live protocol, for dumps on signals and at exit.
LIVE: "weakref.WeakSet[Protocol]" = weakref.WeakSet()
# Called as hook(protocol) when a communicator that was never freed is garbage-collected (a
# local of a function that returned): diagnostics keep how many collectives it issued.
GONE_HOOKS: List[Callable[["Protocol"], None]] = []

_pack = HEADER.pack_into
_get_ident = threading.get_ident


class Protocol(EncodeStep):
    """One communicator's protocol state: sequence, step clock, slot buffers, flight recorder."""

    __slots__ = ("channel", "transport", "rank", "size", "name", "instance", "timeout", "seq",
                 "step", "policy", "slot", "send", "send_view", "recv", "recv_view", "recv_u32",
                 "block", "counts", "guesses", "roles", "recorder", "fast", "failure", "observer",
                 "deferred", "hang_reporter", "extensions", "freed", "notes", "step_error",
                 "__weakref__")

    def __init__(self, channel: Channel, instance: int, name: str,
                 timeout: Optional[float]) -> None:
        self.channel = channel
        self.transport = channel.transport
        self.rank: int = self.transport.rank
        self.size: int = self.transport.size
        self.name = name
        self.instance = instance
        self.timeout = timeout  # checked and agreed on by the creation exchange (ops.create)
        self.seq = 0
        # The step clock: set_step() stamps every later collective. None: set_step() was given
        # a bad value, held in step_error for the next collective it stamps to report.
        self.step: Optional[int] = NO_STEP
        self.step_error: Optional[str] = None
        self.policy = SlotPolicy(max_slot=self.transport.max_slot)
        self.slot = 0
        self.block = bytearray(AGREE_SIZE)
        self.counts: Dict[bytes, int] = {}  # identity fingerprint -> calls so far (occurrence)
        # identity fingerprint -> the root's class a receiver without schema= took there last
        # (core/guesses.py); the C path reads it too.
        self.guesses: Dict[bytes, SchemaInfo] = {}
        # site identity -> the role identities (receiver's, root's) of a call proved a role
        # branch there (core/roles.py); the C path reads it too.
        self.roles: Dict[bytes, Tuple[bytes, Optional[bytes]]] = {}
        capacity = capacity_from_env()
        self.recorder: Optional[FlightRecorder] = FlightRecorder(capacity) if capacity else None
        # key -> (value, code, lasti, step): the latest decisions (comm.note), made into Notes
        # only when read (decisions()).
        self.notes: Dict[str, Any] = {}
        self.freed = False
        # Called with the protocol after each successful collective (debug logging). Setting it
        # turns the C fast path off for this communicator: only Python paths call it.
        self.observer: Optional[Callable[["Protocol"], None]] = None
        # Deferred device checks with calls still unverified (tensor collectives): while set,
        # every typed call verifies what has arrived before it starts.
        self.deferred: Any = None
        # Set by diagnostics: (protocol, call) -> (missing ranks or None, report text).
        self.hang_reporter: Optional[Callable[["Protocol", Call], Tuple[Any, str]]] = None
        self.extensions: Dict[str, Any] = {}  # per-communicator state of other layers
        self.fast: Optional[List[Any]] = None
        # The backend's failure of the C path's last exchange, until verdict.timed_out reports
        # it (fast._exchange_or_failure).
        self.failure: Optional[BaseException] = None
        self._alloc(self.policy.size)
        LIVE.add(self)
        for hook in list(NEW_PROTOCOL_HOOKS):
            try:
                hook(self)
            except Exception:  # diagnostics never break communicator creation
                pass

    def _alloc(self, slot: int) -> None:
        # Fixed-size buffers written through memoryviews: resizing per call costs more than one
        # copy.
        self.slot = slot
        self.send = bytearray(slot)
        self.send_view = memoryview(self.send)
        self.recv = bytearray(slot * self.size)
        self.recv_view = memoryview(self.recv)
        self.recv_u32 = self.recv_view.cast("I") if NATIVE_LITTLE else None
        self.refresh_fast()

    def refresh_fast(self) -> None:
        """Rebuild the C fast path's view of this communicator (``fast.bind``), or turn it off
        where only the Python steps may run. Whatever it holds must be refreshed when it can
        change: new buffers, a slot-size decision, a timeout, a break."""
        from . import fast
        self.fast = fast.bind(self)

    # --- step 1: start --------------------------------------------------------------------
    def start(self, call: Call) -> None:
        """Refuse a call that must not run, then number it and find its identity."""
        channel = self.channel
        if self.freed:
            raise CollectiveError(f"collective #{self.seq} on {self.name}: {call.op} refused: "
                                  f"the communicator was freed", seq=self.seq, comm=self.name)
        if channel.broken is not None:
            verdict.refuse_broken(self, call)
        if self.deferred is not None:
            self.deferred.verify_ready(self)  # raises the first failed check, before seq moves
        if not channel.claim():
            self._collide(call)
        busy = channel.busy
        if self.slot != self.policy.size:
            try:
                self._alloc(self.policy.size)
            except BaseException:  # out of memory: this thread leaves the channel as it found it
                channel.unclaim()
                raise
        frame, call.via = call_site(2)
        call.code = frame.f_code if frame is not None else None
        call.lasti = frame.f_lasti if frame is not None else 0
        if call.name is None:
            call.callers = callers_of(frame, call.root != NO_ROOT)
        busy[BUSY_CODE] = call.code  # where this thread is, for one that collides with it
        busy[BUSY_LASTI] = call.lasti
        if call.seq != CREATE_SEQ:
            call.seq = self.seq
            self.seq += 1
        if call.step is None and call.clocked:
            if self.step is None:
                call.error = call.error or self.step_error
            elif self.step != NO_STEP:
                call.step = self.step
        identity = self.identity(call)
        if call.wild:
            guesses.guess(self, call, identity)
        call.occurrence = self.counts.get(identity, 0) + 1
        self.counts[identity] = call.occurrence
        if channel.poison is not None and call.error is None:
            call.error = channel.poison
        if self.recorder is not None:
            self.recorder.start(call)

    def identity(self, call: Call) -> bytes:
        if call.name is not None:
            return name_fingerprint(call.name)
        site = site_fingerprint(call.code, call.lasti, call.via)
        return callers.fingerprint(site, call.callers) if call.callers else site

    def _collide(self, call: Call) -> None:
        """Another thread is inside a collective on this channel: refuse, and poison it."""
        frame = user_frame(3)
        site = format_site(frame.f_code, frame.f_lasti) if frame is not None else "?"
        mine = thread_label()
        other, code, lasti = self.channel.inside()
        # One thread inside twice: a signal handler or a callback interrupted its collective.
        again = other == mine
        entered = "re-entered while it was" if again else f"entered while thread {other} was"
        text = (f"ConcurrentCallError: {call.op} at {site} in thread {mine} {entered} inside a "
                f"collective at {format_site(code, lasti)} on {self.channel.label}")
        self.channel.poison = text
        advice = ("a collective run from a signal handler or a callback in the middle of "
                  "another: run it after that one returns") if again else \
            "a communicator serves one thread at a time (give each thread its own: comm.dup())"
        raise ConcurrentCallError(
            f"collective #{self.seq} on {self.name}: {call.op} at {site} refused: thread {mine} "
            f"{entered} inside a collective on the same channel ({self.channel.label}); "
            f"{advice}", seq=self.seq, comm=self.name, threads=(other, mine), ranks=(self.rank,))

    # --- steps 2 to 4 -----------------------------------------------------------------------
    def exchange(self, call: Call) -> None:
        """Encode, exchange and reach the verdict every rank reaches; raise it if it is an error.

        The busy marker names the call for a thread that collides with it.
        """
        payload = b""
        if call.error is None and call.mode != MODE_EMPTY:
            payload, call.error = self.encode(call)
        flags = 0
        if call.error is not None:
            # The whole text: one longer than the slot travels like any overflowing payload.
            flags = FLAG_LOCAL_ERROR
            call.error = sendable(call.error)
            payload = call.error.encode()[:_MAX_ERROR_TEXT]
        self.write(call, payload, flags)
        if self.recorder is not None:
            self.recorder.set_bytes(len(payload))
        call.deadline = self.deadline(CREATION_MIN_TIMEOUT if call.seq == CREATE_SEQ else 0.0)
        self.run_exchange(call, call.shape)
        self.after_exchange(call)

    def run_exchange(self, call: Call, shape: int) -> None:
        """The transport's exchange of this rank's slot, bounded by the call's deadline (a
        timeout raises the CollectiveTimeout every waiting rank raises)."""
        try:
            self.transport.exchange(self.send, self.recv, self.block, shape, call.deadline)
        except TransportTimeout:
            verdict.timed_out(self, call)

    def deadline(self, at_least: float = 0.0) -> Optional[float]:
        """When this call's backend operations must be done by (None: never; an infinite
        timeout waits forever too, without polling for a deadline that cannot come)."""
        if self.timeout is None or self.timeout == float("inf"):
            return None
        return time.monotonic() + max(self.timeout, at_least)

    def after_exchange(self, call: Call) -> None:
        """Step 4 from the agreement block (the C fast path calls this after its own exchange)."""
        guesses.unguess_if_differ(self, call, call.shape)
        block = self.block
        flags = block_flags(block)
        # Every rank feeds the same number to the slot rule, once per exchange; except when the
        # ranks were on different communicators sharing the channel: each gives this exchange
        # back to its own (verdict.disagreement), so none may count it.
        if not call.observed and not instances_differ(block):
            self.policy.observe(block_length(block))
        if self.policy.size != self.slot:
            self.fast = None  # the next call re-allocates (start), then binds the C path again
        if flags & FLAG_LOCAL_ERROR or not agreed(block):
            verdict.disagreement(self, call)
        if flags & FLAG_RECEIVERS_ARM and agreed(block):  # one site, the receivers' arm
            verdict.root_in_receivers_arm(self, call)
        call.settles = bool(flags & FLAG_DECODE_HOOK)

    def settle(self, call: Call, error: Optional[str], hook: bool = False) -> None:
        """Agree on an outcome only some ranks could judge (a class found by name): one more
        REDUCE exchange, after which every rank raises the same error, or none does. ``hook``:
        the class this rank found runs user code when decoding; where any rank's does, every
        rank settles its decoding too (``call.settles``)."""
        error = self.settle_exchange(call, error, FLAG_DECODE_HOOK if hook else 0)
        guesses.unguess_if_differ(self, call, REDUCE)
        if block_flags(self.block) & FLAG_LOCAL_ERROR or not agreed(self.block):
            call.error = error
            verdict.disagreement(self, call, receiving=True)
        call.settles = call.settles or bool(block_flags(self.block) & FLAG_DECODE_HOOK)

    def settle_exchange(self, call: Call, error: Optional[str], flags: int = 0) -> Optional[str]:
        """One more REDUCE exchange, op ``settle``, of this rank's outcome (``error``, flagged;
        None: it succeeded) and ``flags``; returns ``error`` as it travelled (``sendable``)."""
        error = None if error is None else sendable(error)
        payload = b"" if error is None else error.encode()[:_MAX_ERROR_TEXT]
        self.write(call, payload, flags | (FLAG_LOCAL_ERROR if error is not None else 0),
                   OPS["settle"])
        self.run_exchange(call, REDUCE)
        return error

    def write(self, call: Call, payload: bytes, flags: int, opcode: int = 0) -> None:
        """This rank's slot: header, and the payload inline when it fits and the op wants it
        there (else it waits in ``call.overflow`` for phase 2)."""
        n = len(payload)
        slot = self.slot
        call.overflow = None
        if call.split is not None and not flags & FLAG_LOCAL_ERROR \
                and n <= slot - HEADER_SIZE:
            self.send_view[HEADER_SIZE:HEADER_SIZE + n] = payload
            call.overflow = call.split[1]
            n = len(call.overflow)
            flags |= FLAG_OVERFLOW | FLAG_SPLIT_ARRAY
        elif call.split is not None and not flags & FLAG_LOCAL_ERROR:
            call.overflow = payload + bytes(call.split[1])  # a prefix too long for the slot
            flags |= FLAG_OVERFLOW
            n = len(call.overflow)
        elif not call.inline and not flags & FLAG_LOCAL_ERROR:
            call.overflow = payload
            n = 0
        elif n > slot - HEADER_SIZE:
            call.overflow = payload
            flags |= FLAG_OVERFLOW
        else:
            self.send_view[HEADER_SIZE:HEADER_SIZE + n] = payload
        info = call.info
        if info is not None and info.hook is not None and not opcode:
            flags |= FLAG_DECODE_HOOK
        if call.wild:
            flags |= FLAG_WILD_SCHEMA
        elif call.guessed:
            flags |= FLAG_GUESSED
        identity = self.identity(call)
        if self.roles and not opcode:
            role = roles.wire_identity(self, call, identity)
            if role is not None:
                identity, flags = role, flags | FLAG_ROLE
        _pack(self.send, 0, MAGIC, opcode or OPS[call.op], call.reduce_op, slot_log2(slot),
              call.root,
              call.seq, call.wire_step,
              info.fingerprint if info is not None and not call.wild else _ZEROS,
              call.array_fp, identity, self.instance, slot, flags, n)

    def decisions(self) -> Tuple[Note, ...]:
        """The latest recorded decisions (``comm.note``), one per key."""
        return tuple(Note(key=key, value=value, site=format_site(code, lasti),
                          step=None if step == NO_STEP else step)
                     for key, (value, code, lasti, step) in self.notes.items())

    def note(self, key: str, value: Any, frame: FrameType) -> None:
        """``comm.note(key, value)``, made at ``frame``: kept raw (a few hundred ns), made into
        Notes only when an error reads them (``decisions``)."""
        self.notes[key] = (value, frame.f_code, frame.f_lasti, self.step)

    # --- bookkeeping ------------------------------------------------------------------------
    def completed(self, call: Optional[Call] = None) -> None:
        self.channel.unclaim()
        if self.recorder is not None:
            self.recorder.complete()
        if self.observer is not None:
            try:
                self.observer(self)
            except Exception:  # diagnostics never raise into user code
                pass

    def __del__(self) -> None:
        try:
            if GONE_HOOKS and not self.freed:
                for hook in list(GONE_HOOKS):
                    hook(self)
        except Exception:  # at interpreter shutdown, or a hook's failure: nothing to keep
            pass

    def failed(self, exc: BaseException) -> None:
        """A call that started ended with ``exc``: release the channel, record, tell hooks."""
        self.channel.unclaim()
        if self.recorder is not None and self.recorder.in_flight:
            text = str(exc)
            self.recorder.fail(f"{type(exc).__name__}: "
                               f"{text.splitlines()[0] if text else ''}")
        if isinstance(exc, CollectiveError):
            for hook in list(ERROR_HOOKS):
                try:
                    hook(self, exc)
                except Exception:  # diagnostics never raise into user code
                    pass


register_internal(__file__)
