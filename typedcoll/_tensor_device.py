"""The device path of tensor collectives: envelopes all-gathered by NCCL, verified later.

The design is described in ``_tensor``'s module docstring (device path, steps 1-3).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Deque, List, Optional

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

class _Pending:
    __slots__ = ("seq", "call", "slot")

    def __init__(self, seq: int, call: _Call, slot: "_Slot") -> None:
        self.seq = seq
        self.call = call
        self.slot = slot


class _Slot:
    """One ring entry: a pinned host block pair, its device twin, and the event after its copy.

    The device buffers belong to the slot, not to a stream: a slot is reused only after its
    event (recorded behind the gather and the copy back) has completed, so no later call can
    overwrite an envelope that an earlier collective still reads, whatever streams are in use.
    """

    __slots__ = ("pinned", "send", "recv", "view", "event", "dev_in", "dev_out", "pending")

    def __init__(self, size: int, device: torch.device) -> None:
        self.pinned = torch.empty(BLOCK * (size + 1), dtype=torch.uint8, pin_memory=True)
        self.send = self.pinned[:BLOCK]
        self.recv = self.pinned[BLOCK:]
        self.view = memoryview(self.pinned.numpy())
        self.event = torch.cuda.Event()
        self.dev_in = torch.empty(BLOCK, dtype=torch.uint8, device=device)
        self.dev_out = torch.empty(BLOCK * size, dtype=torch.uint8, device=device)
        self.pending: Optional[_Pending] = None


class _DeviceChecks:
    """One communicator's pinned envelope ring and its unverified device calls, oldest first."""

    def __init__(self, size: int, mode: str) -> None:
        self.size = size
        self.mode = mode
        self.slots: List[Optional[_Slot]] = [None] * RING
        self.pending: Deque[_Pending] = collections.deque()
        self.next = 0

    def slot(self, p: Protocol, device: torch.device) -> _Slot:
        """The next ring slot, verifying (and if need be waiting for) its previous check."""
        index = self.next
        self.next = (index + 1) % RING
        slot = self.slots[index]
        if slot is None or slot.dev_in.device != device:
            slot = self.slots[index] = _Slot(self.size, device)
        while slot.pending is not None:
            self.verify_oldest(p, wait=True)
        return slot

    def track(self, p: Protocol, rec: "_Pending") -> None:
        """Add an unverified call; the protocol then verifies before every typed call."""
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
        while pending and pending[0].slot.event.query():
            self.verify_oldest(p, wait=False)

    def verify_all(self, p: Protocol) -> None:
        while self.pending:
            self.verify_oldest(p, wait=True)

    def verify_oldest(self, p: Protocol, wait: bool) -> None:
        rec = self.pending[0]
        if wait and not rec.slot.event.query():
            _wait_event(p, rec.slot.event, rec)
        self.pending.popleft()
        rec.slot.pending = None
        error = verdict(p, rec, bytes(rec.slot.view[BLOCK:]), bytes(rec.slot.view[:CHECKED]),
                        self.mode)
        if error is not None:
            # The calls after a failed one ran on a desynchronised group: drop their checks.
            for later in self.pending:
                later.slot.pending = None
            self.pending.clear()
        self._drained(p)
        if error is not None:
            raise error


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
        checks = p.extensions["tensor"] = _DeviceChecks(p.size, mode)
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
        slot = checks.slot(p, device)
        pack_block(slot.view, call, seq)
        slot.dev_in.copy_(slot.send, non_blocking=True)
        all_gather_single(slot.dev_out, slot.dev_in, group=p.transport.group)
        slot.recv.copy_(slot.dev_out, non_blocking=True)
        slot.event.record()
        rec = slot.pending = _Pending(seq, call, slot)
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
