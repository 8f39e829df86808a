"""The device path of tensor collectives: envelopes all-gathered by NCCL, verified later.

The design is described in ``_tensor``'s module docstring (device path, steps 1-3); the streams
that carry one envelope's trip are described at :class:`_DeviceChecks`.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import msgspec
import torch

from ._callsite import register_internal
from ._errors import CollectiveError
from ._protocol import Protocol
from ._torch import all_gather_single
from ._wire import (CHECKED, FLAG_LOCAL_ERROR, FLAGS_OFFSET, HEADER, HEADER_SIZE, MAGIC, NO_STEP,
                    OPS)

from ._tensor_envelope import (BLOCK, META_MAX, MODES, RING, _Call, _META_DECODER, _ZEROS,
    _desync, _infos, _local_error, _role, _timeout)

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


class _Pending:
    """One device call whose envelope is not verified yet: its seq, arguments and ring slot."""

    __slots__ = ("seq", "call", "index", "checks")

    def __init__(self, seq: int, call: _Call, index: int, checks: "_DeviceChecks") -> None:
        self.seq = seq
        self.call = call
        self.index = index
        self.checks = checks

    @property
    def own(self) -> memoryview:
        """This rank's envelope as sent (pinned host memory)."""
        return self.checks.send_view[self.index * BLOCK:(self.index + 1) * BLOCK]

    @property
    def blocks(self) -> memoryview:
        """Every rank's envelope as gathered, once copied back (pinned host memory)."""
        row = self.checks.size * BLOCK
        return self.checks.recv_view[self.index * row:(self.index + 1) * row]


class _DeviceChecks:
    """One communicator's envelope ring on one device, and its unverified calls, oldest first.

    The ring: ``RING`` slots of pinned host memory (``sends``: this rank's envelope; ``recvs``:
    every rank's, copied back) and their device twin ``outs``, each slot an in-place all-gather's
    output whose own block is also its input (which moves nothing at world size 1 and copies no
    own block elsewhere). One envelope's trip, on three streams:

    1. copy in, on the ring's ``h2d`` stream, which waits for nothing, so the copy has landed
       long before the caller's stream reaches step 2 whenever the host runs ahead of the GPU;
    2. on the caller's stream: wait for that copy (``staged``), the all-gather, then the event
       ``gathered`` -- the payload follows. This wait and this event are all the check adds to
       the payload's own stream;
    3. copy back, on the ring's ``d2h`` stream after ``gathered``, then the event ``done[i]``.
       A copy back is issued only when the previous one has finished; the slots gathered
       meanwhile wait and go back together, as one copy of consecutive rows, so the copies
       cost the device little however fast the calls come. Step 3 never waits for a payload,
       so a payload collective that hangs still has its envelope checked.

    A slot is reused only after its check was verified, i.e. after ``done`` completed: no call
    can overwrite an envelope that an earlier collective or copy still reads.
    """

    def __init__(self, size: int, rank: int, mode: str) -> None:
        self.size = size
        self.rank = rank
        self.mode = mode
        self.pending: Deque[_Pending] = collections.deque()
        self.owners: List[Optional[_Pending]] = [None] * RING
        self.next = 0
        self.device: Optional[torch.device] = None
        self.uncopied: List[Tuple[int, Any]] = []  # (slot, caller's stream), gathered, in order
        self.last_copy: Optional[Any] = None
        self.callers: Dict[int, Any] = {}  # raw stream handle -> torch Stream

    def _build(self, device: torch.device) -> None:
        row = self.size * BLOCK
        self.sends = torch.empty((RING, BLOCK), dtype=torch.uint8, pin_memory=True)
        self.recvs = torch.empty((RING, row), dtype=torch.uint8, pin_memory=True)
        self.send_view = memoryview(self.sends.view(-1).numpy())
        self.recv_view = memoryview(self.recvs.view(-1).numpy())
        self.outs = torch.empty((RING, row), dtype=torch.uint8, device=device)
        self.send_rows = list(self.sends)
        self.owns = [self.outs[i, self.rank * BLOCK:(self.rank + 1) * BLOCK]
                     for i in range(RING)]
        self.staged = [torch.cuda.Event() for _ in range(RING)]
        self.gathered = [torch.cuda.Event() for _ in range(RING)]
        self.copied = [torch.cuda.Event() for _ in range(RING)]
        self.done: List[Optional[Any]] = [None] * RING  # the event of the slot's copy back
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        # Freed (a dropped communicator, a ring moved to another device), the buffer must not be
        # reused before the copies already enqueued on these streams have run.
        self.outs.record_stream(self.h2d)
        self.outs.record_stream(self.d2h)
        self.device = device
        self.callers.clear()
        self.uncopied.clear()
        self.last_copy = None

    def streams(self) -> List[Any]:
        """The ring's own streams (none before its first device call)."""
        return [] if self.device is None else [self.h2d, self.d2h]

    def claim(self, p: Protocol, device: torch.device) -> int:
        """The next ring slot, verifying (and if need be waiting for) its previous check."""
        if device != self.device:
            self.verify_all(p)  # the ring moves to this device; nothing may still use it
            self._build(device)
        index = self.next
        self.next = (index + 1) % RING
        while self.owners[index] is not None:
            self.verify_oldest(p, wait=True)
        self.done[index] = None
        return index

    def exchange(self, index: int, group: Any) -> None:
        """Enqueue slot ``index``'s trip (steps 1-3 of the class doc); the send is packed."""
        device = self.device
        assert device is not None
        raw = _raw_stream(device.index) if _raw_stream is not None else None
        caller = self.callers.get(raw) if raw is not None else None
        if caller is None:
            caller = torch.cuda.current_stream(device)
            if raw is not None:
                if len(self.callers) > 64:
                    self.callers.clear()
                self.callers[raw] = caller
        own = self.owns[index]
        _copy(self.h2d, caller, own, self.send_rows[index])
        staged = self.staged[index]
        staged.record(self.h2d)
        caller.wait_event(staged)
        all_gather_single(self.outs[index], own, group=group)
        self.gathered[index].record(caller)
        self.uncopied.append((index, caller))
        self.copy_back(force=False)

    def copy_back(self, force: bool) -> None:
        """Copy back the gathered slots not yet copied, if the previous copy is done (or now)."""
        uncopied = self.uncopied
        if not uncopied or (not force and self.last_copy is not None
                            and not self.last_copy.query()):
            return
        d2h = self.d2h
        newest = {id(caller): (index, caller) for index, caller in uncopied}
        for index, _ in newest.values():
            d2h.wait_event(self.gathered[index])
        first, last = uncopied[0][0], uncopied[-1][0]
        caller = uncopied[-1][1]
        # Slots are claimed in ring order, so the uncopied ones are consecutive rows (a slot
        # claimed but never gathered, after a failed call, is copied for nothing, harmlessly).
        if first <= last:
            _copy(d2h, caller, self.recvs[first:last + 1], self.outs[first:last + 1])
        else:
            _copy(d2h, caller, self.recvs[first:], self.outs[first:])
            _copy(d2h, caller, self.recvs[:last + 1], self.outs[:last + 1])
        event = self.copied[last]
        event.record(d2h)
        for index, _ in uncopied:
            self.done[index] = event
        self.last_copy = event
        uncopied.clear()

    def arrived(self, rec: _Pending, wait: bool) -> Any:
        """``rec``'s copy-back event, issuing the copy if it is still waiting (None: not yet)."""
        event = self.done[rec.index]
        if event is None:
            self.copy_back(force=wait)
            event = self.done[rec.index]
        return event

    def track(self, p: Protocol, rec: "_Pending") -> None:
        """Add an unverified call; the protocol then verifies before every typed call."""
        self.owners[rec.index] = rec
        self.pending.append(rec)
        if p.deferred is not self:
            p.deferred = self
            p._refresh_fast()

    def _drained(self, p: Protocol) -> None:
        if not self.pending and p.deferred is self:
            p.deferred = None
            p._refresh_fast()

    def verify_ready(self, p: Protocol) -> None:
        """Verify, oldest first, every pending check whose envelope has arrived; never waits."""
        pending = self.pending
        while pending:
            event = self.arrived(pending[0], wait=False)
            if event is None or not event.query():
                return
            self.verify_oldest(p, wait=False)

    def verify_all(self, p: Protocol) -> None:
        while self.pending:
            self.verify_oldest(p, wait=True)

    def verify_oldest(self, p: Protocol, wait: bool) -> None:
        rec = self.pending[0]
        if wait:
            event = self.arrived(rec, wait=True)
            if not event.query():
                _wait_event(p, event, rec)
        self.pending.popleft()
        self.owners[rec.index] = None
        error = verdict(p, rec, bytes(rec.blocks), bytes(rec.own[:CHECKED]), self.mode)
        if error is not None:
            # The calls after a failed one ran on a desynchronised group: drop their checks.
            for later in self.pending:
                self.owners[later.index] = None
            self.pending.clear()
        self._drained(p)
        if error is not None:
            raise error


def _copy(stream: Any, caller: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` enqueued on ``stream``; ``caller`` is the current stream, restored.

    ``torch.cuda.set_stream`` also makes the stream's device current, so the cheap switch is
    taken only where that device is current already; elsewhere the (slower) context manager.
    """
    if torch.cuda.current_device() == stream.device_index:
        torch.cuda.set_stream(stream)
        try:
            dst.copy_(src, non_blocking=True)
        finally:
            torch.cuda.set_stream(caller)
    else:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)


def verdict(p: Any, rec: _Pending, blocks: bytes, own: bytes,
            mode: str) -> Optional[CollectiveError]:
    """The error (or None) that every rank derives from the same gathered envelope blocks."""
    size = len(blocks) // BLOCK
    failed = [r for r in range(size) if blocks[r * BLOCK + FLAGS_OFFSET] & FLAG_LOCAL_ERROR]
    agree = all(blocks.startswith(own, r * BLOCK) for r in range(size) if r not in failed)
    if agree and not failed:
        return None
    parsed = []
    for r in range(size):
        block = blocks[r * BLOCK:(r + 1) * BLOCK]
        header = HEADER.unpack_from(block, 0)
        raw = block[HEADER_SIZE:HEADER_SIZE + min(header[-1], META_MAX)]
        meta = None
        if not header[10] & FLAG_LOCAL_ERROR:
            try:
                meta = _META_DECODER.decode(raw)
            except msgspec.DecodeError:
                meta = None
        parsed.append((r, header, meta, raw))
    if failed:
        if rec.call.error is not None and p.rank in failed and mode == "deferred":
            return None  # this rank raised its EncodeError when it made the call
        texts = {r: raw.decode(errors="replace") for r, _, _, raw in parsed}
        return _local_error(p, rec.seq, rec.call, failed, texts)
    return _desync(p, rec.seq, _infos([(r, h, m) for r, h, m, _ in parsed]))


def pack_block(view: Any, call: _Call, seq: int) -> None:
    """Write ``call``'s device envelope (header, then meta or error text) at ``view[:BLOCK]``."""
    if call.error is None:
        payload, array_fp, flags = call.payload, call.array_fp, 0
    else:
        payload, array_fp, flags = call.error.encode()[:META_MAX], _ZEROS, FLAG_LOCAL_ERROR
    HEADER.pack_into(view, 0, MAGIC, OPS[call.op], call.reduce_code, 0, call.root, seq,
                     NO_STEP if call.step is None else call.step, _role(call.name).fingerprint,
                     array_fp, _ZEROS, flags, len(payload))
    view[HEADER_SIZE:HEADER_SIZE + len(payload)] = payload


def _wait_event(p: Protocol, event: Any, rec: _Pending) -> None:
    if p.timeout is None:
        event.synchronize()
        return
    deadline = time.monotonic() + p.timeout
    pause = 1e-5
    while not event.query():
        if time.monotonic() >= deadline:
            raise _timeout(p, rec.seq, rec.call)
        time.sleep(pause)
        pause = min(pause * 2, 0.002)


def _checks(p: Protocol) -> _DeviceChecks:
    checks = p.extensions.get("tensor")
    if checks is None:
        mode = os.environ.get("TYPEDCOLL_TENSOR_CHECK", "deferred") or "deferred"
        if mode not in MODES:
            raise ValueError(f"TYPEDCOLL_TENSOR_CHECK: expected one of {MODES}, got {mode!r}")
        checks = p.extensions["tensor"] = _DeviceChecks(p.size, p.rank, mode)
    return checks


def set_tensor_check(comm: Any, mode: str) -> None:
    """Choose how a communicator verifies its CUDA tensor envelopes: "deferred" or "eager"."""
    if mode not in MODES:
        raise ValueError(f"expected mode 'deferred' or 'eager', got {mode!r}")
    _checks(comm._p if hasattr(comm, "_p") else comm).mode = mode


def _device(p: Protocol, call: _Call, launch: Callable[[bool], Any]) -> None:
    checks = _checks(p)
    try:
        checks.verify_ready(p)
        if p.broken is not None:
            raise p.broken
        seq = p.seq
        p.seq = seq + 1
        if p.recorder is not None:
            p.recorder.start(seq, call.op, _role(call.name), call.code, call.lasti,
                             NO_STEP if call.step is None else call.step, 0)
        device = call.tensor.device if call.on_device else \
            torch.device("cuda", torch.cuda.current_device())
        index = checks.claim(p, device)
        pack_block(checks.send_view[index * BLOCK:], call, seq)
        checks.exchange(index, p.transport.group)
        rec = _Pending(seq, call, index, checks)
        checks.track(p, rec)
        if checks.mode == "eager":
            checks.verify_all(p)
        if call.error is not None:
            # Deferred: this rank cannot take part in the payload; its peers learn why from
            # its envelope at their next check.
            raise _local_error(p, seq, call, [p.rank], {})
        launch(False)
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed()


register_internal(__file__)
