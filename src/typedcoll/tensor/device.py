"""The device path of tensor collectives: envelopes all-gathered by NCCL, verified later.

The design is in ``tensor.ops``' module docstring (device path, steps 1-3); the streams that
carry one envelope's trip are described at :class:`DeviceChecks`.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import msgspec
import torch
from torch._C._distributed_c10d import AllgatherOptions

from ..core import verdict
from ..core.plumbing import register_internal
from ..core.protocol import Protocol
from ..core.wire import CHECKED, FLAG_LOCAL_ERROR, FLAGS_OFFSET, HEADER_SIZE
from .blocks import pack_block
from .envelope import BLOCK, MODES, RING, TensorCall, desync_error, infos_from_blocks

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
# torch declares no types for these constructors: called through Any, strict mypy accepts them.
_Event: Any = torch.cuda.Event
_Stream: Any = torch.cuda.Stream


def stream_ordered(kind: Any) -> Any:
    """Options of a device collective that runs on the caller's stream, as the dist.* calls
    with ``async_op=False`` do (the payload and the envelope alike)."""
    opts = kind()
    opts.asyncOp = False
    return opts


def enqueued(work: Any) -> None:
    """Order the caller's stream after ``work`` (NCCL may have done so already and return
    None: with ``asyncOp=False`` it runs on the caller's stream)."""
    if work is not None:
        work.wait()


class Pending:
    """One device call whose envelope is not verified yet: its record and ring slot."""

    __slots__ = ("call", "index", "checks")

    def __init__(self, call: TensorCall, index: int, checks: "DeviceChecks") -> None:
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


class DeviceChecks:
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
    can overwrite an envelope that an earlier collective or copy still reads. As the protocol's
    ``deferred`` hook, :meth:`verify_ready` runs before every typed call while checks are
    pending.
    """

    def __init__(self, size: int, rank: int, mode: str) -> None:
        self.size = size
        self.rank = rank
        self.mode = mode
        self.pending: Deque[Pending] = collections.deque()
        self.owners: List[Optional[Pending]] = [None] * RING
        self.next = 0
        self.device: Optional[torch.device] = None
        self.uncopied: List[Tuple[int, Any]] = []  # (slot, caller's stream), gathered, in order
        self.last_copy: Optional[Any] = None
        self.callers: Dict[int, Any] = {}  # raw stream handle -> torch Stream
        self.gather_opts = stream_ordered(AllgatherOptions)

    def _build(self, device: torch.device) -> None:
        row = self.size * BLOCK
        self.sends = torch.empty((RING, BLOCK), dtype=torch.uint8, pin_memory=True)
        self.recvs = torch.empty((RING, row), dtype=torch.uint8, pin_memory=True)
        self.send_view = self.sends.view(-1).numpy().data
        self.recv_view = self.recvs.view(-1).numpy().data
        self.outs = torch.empty((RING, row), dtype=torch.uint8, device=device)
        self.send_rows = list(self.sends)
        self.owns = [self.outs[i, self.rank * BLOCK:(self.rank + 1) * BLOCK]
                     for i in range(RING)]
        self.staged = [_Event() for _ in range(RING)]
        self.gathered = [_Event() for _ in range(RING)]
        self.copied = [_Event() for _ in range(RING)]
        self.done: List[Optional[Any]] = [None] * RING  # the event of the slot's copy back
        self.h2d = _Stream(device)
        self.d2h = _Stream(device)
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
        enqueued(group._allgather_base(self.outs[index], own, self.gather_opts))
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

    def arrived(self, rec: Pending, wait: bool) -> Any:
        """``rec``'s copy-back event, issuing the copy if it is still waiting (None: not yet)."""
        event = self.done[rec.index]
        if event is None:
            self.copy_back(force=wait)
            event = self.done[rec.index]
        return event

    def track(self, p: Protocol, rec: Pending) -> None:
        """Add an unverified call; the protocol then verifies before every typed call."""
        self.owners[rec.index] = rec
        self.pending.append(rec)
        if p.deferred is not self:
            p.deferred = self
            p.refresh_fast()

    def _drained(self, p: Protocol) -> None:
        if not self.pending and p.deferred is self:
            p.deferred = None
            p.refresh_fast()

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
        error = check(p, rec.call, bytes(rec.blocks), bytes(rec.own[:CHECKED]), self.mode)
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


def check(p: Any, call: TensorCall, blocks: bytes, own: bytes,
          mode: str) -> Optional[Exception]:
    """The error (or None) that every rank derives from the same gathered envelope blocks."""
    size = len(blocks) // BLOCK
    failed = [r for r in range(size) if blocks[r * BLOCK + FLAGS_OFFSET] & FLAG_LOCAL_ERROR]
    if not failed and all(blocks.startswith(own, r * BLOCK) for r in range(size)):
        return None
    infos = infos_from_blocks(blocks, size)
    fine = [r for r in range(size) if r not in failed]
    # The ranks that did not fail must agree with each other and with what this rank sent. The
    # message names rank 0's seq, so that every rank's text is the same.
    ref = own if p.rank not in failed else blocks[fine[0] * BLOCK:][:CHECKED] if fine else b""
    if any(not blocks.startswith(ref, r * BLOCK) for r in fine):
        headers = [blocks[r * BLOCK:r * BLOCK + HEADER_SIZE] for r in range(size)]
        if not verdict.role_branch(headers, infos, failed):
            return desync_error(p, infos[0].seq, infos, [infos[r] for r in fine])
        if not failed:
            # One broadcast written in a role branch's two arms (the root's side, the
            # receivers'): the same acceptance as the host path's, read from the blocks.
            return None
        # else a receiver failed before it knew its root: its error is the verdict, as on the
        # host path, not a call-site desync
    if p.rank in failed and call.error is not None and mode == "deferred":
        return None  # this rank raised its EncodeError when it made the call
    if p.rank in failed:
        infos[p.rank] = whole_error(infos[p.rank], call)
    return verdict.failure(p, call, failed, infos)


def whole_error(info: Any, call: TensorCall) -> Any:
    """``info`` with this rank's own error whole: a full block keeps a few dozen characters."""
    if call.error is None:
        return info
    kind, _, detail = call.error.partition(": ")
    return msgspec.structs.replace(info, error_type=kind, error=detail)


def _wait_event(p: Protocol, event: Any, rec: Pending) -> None:
    if p.timeout is None:
        event.synchronize()
        return
    deadline = time.monotonic() + p.timeout
    pause = 1e-5
    while not event.query():
        if time.monotonic() >= deadline:
            verdict.timed_out(p, rec.call)
        time.sleep(pause)
        pause = min(pause * 2, 0.002)


def checks_of(p: Protocol) -> DeviceChecks:
    checks: Optional[DeviceChecks] = p.extensions.get("tensor")
    if checks is None:
        mode = os.environ.get("TYPEDCOLL_TENSOR_CHECK", "deferred") or "deferred"
        if mode not in MODES:
            raise ValueError(f"TYPEDCOLL_TENSOR_CHECK: expected one of {MODES}, got {mode!r}")
        checks = p.extensions["tensor"] = DeviceChecks(p.size, p.rank, mode)
    return checks


def set_tensor_check(p: Protocol, mode: str) -> None:
    """Choose how a communicator verifies its CUDA tensor envelopes: "deferred" or "eager"."""
    if mode not in MODES:
        raise ValueError(f"expected mode 'deferred' or 'eager', got {mode!r}")
    checks_of(p).mode = mode


def run(p: Protocol, call: TensorCall, launch: Callable[[Any], None]) -> None:
    """The device path of one call; ``launch(group)`` enqueues the payload collective."""
    checks = checks_of(p)
    p.start(call)  # verifies every pending check that has arrived, numbers the call
    try:
        tensor = call.tensor
        device = tensor.device if call.on_device and isinstance(tensor, torch.Tensor) \
            else torch.device("cuda", torch.cuda.current_device())
        index = checks.claim(p, device)
        pack_block(checks.send_view[index * BLOCK:], p, call)
        group = p.transport.device_group
        checks.exchange(index, group)
        checks.track(p, Pending(call, index, checks))
        if checks.mode == "eager":
            checks.verify_all(p)
        if call.error is not None:
            # Deferred: its peers learn why from its envelope at their next check, having
            # enqueued their payload collective already. Where the tensor itself passed every
            # check (the error is the caller's own: a drop-in's output list, say), this rank
            # enqueues its payload too, so that theirs completes instead of hanging the stream.
            if call.payload_ok:
                launch(group)
            own = whole_error(infos_from_blocks(
                bytes(checks.send_view[index * BLOCK:(index + 1) * BLOCK]), 1)[0], call)
            raise verdict.failure(p, call, [p.rank], [own] * p.size)
        launch(group)
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed(call)


register_internal(__file__)
