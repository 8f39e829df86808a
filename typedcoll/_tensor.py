"""Tensor collectives with envelopes (torch backend): all-gather, all-reduce, broadcast,
reduce-scatter.

Each rank's envelope says what it is calling: op, seq, step, reduce op, root, the tensor's role
(``name``), dtype, device type, shape and call site. Two paths, chosen by the tensor's device:

Host path (CPU tensors, gloo). Per call:
  1. ``Protocol.phase1`` on the private gloo group: the usual 56-byte header (op, seq, step, root,
     reduce op, role fingerprint) with the readable ``TensorMeta`` as its inline payload. Because
     every typed collective starts with this allgather, a tensor op meeting an object op, or a
     different root or reduce op, raises ``DesyncError`` before the payload moves.
  2. The metas (dtype, device, shape) are compared; they differ -> ``DesyncError`` on every rank
     (every rank saw every meta), still before the payload.
  3. The torch collective itself, on the caller's group. Two gloo round trips per call; the
     payload one dominates for anything but tiny tensors.

Device path (CUDA tensors, NCCL). A gloo round trip (~1 ms) per call would dwarf NCCL, and a
host sync would stall the GPU queue, so the envelope travels on the device, in band:
  1. The rank writes a ``BLOCK``-byte envelope (the same header, dtype+shape+device hashed into
     its array fingerprint, then the meta) into a pinned host ring slot, copies it to the GPU
     and all-gathers it over the caller's group: one tiny NCCL collective, fixed size on every
     rank and identical for every op, so ranks that disagree about op, shape or root still meet
     in a well-defined NCCL call. The gathered blocks are copied back into the pinned slot and a
     CUDA event is recorded. No host sync.
  2. The payload collective is enqueued behind it on the same group (NCCL runs a group's
     collectives in issue order).
  3. Verification, on the host, of the pinned copy: each rank's first ``CHECKED`` header bytes
     against its own. *Deferred* (default): at the next tensor collective, for every pending
     check whose event has completed, without waiting, and at ``comm.synchronize()``, waiting
     for all; a ring of ``RING`` slots bounds the unchecked calls in flight (the oldest is waited
     for when the ring is full). *Eager* (``TYPEDCOLL_TENSOR_CHECK=eager`` or
     ``set_tensor_check(comm, "eager")``): wait for this call's envelope and verify it before
     the payload is enqueued -- one host sync per call, and nothing reaches NCCL's undefined
     behaviour.
  Every rank holds every rank's block, so every rank reaches the same verdict and builds the
  same ``DesyncError`` text from the blocks alone: no further exchange, nothing to meet in. In
  deferred mode the ranks may detect it at different calls; the envelope precedes the payload on
  the stream, so it is seen even when the mismatched payload collective itself hangs.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import msgspec
import torch
import torch.distributed as dist

from ._callsite import format_site, register_internal, user_frame
from ._errors import CollectiveError, CollectiveTimeout, DesyncError, EncodeError, PeerError
from ._mismatch import EnvelopeInfo, desync_message, group_envelopes, mismatch_kinds
from ._protocol import MODE_MSG, Protocol
from ._schema import ENCODER, KIND_MSGSPEC, SchemaInfo, _digest, array_fingerprint
from ._torch import REDUCE_OPS as TORCH_OPS
from ._torch import all_gather_single, reduce_scatter_single, wait_work
from ._transport import TransportTimeout
from ._wire import (CHECKED, FLAG_LOCAL_ERROR, FLAGS_OFFSET, HEADER, HEADER_SIZE, MAGIC, NO_ROOT,
                    NO_STEP, OPS, REDUCE_OPS, REDUCING_OPS, ROOTED_OPS, op_name, reduce_op_name)

BLOCK = 256  # envelope bytes per rank on the device path: header + meta (or error text)
META_MAX = BLOCK - HEADER_SIZE
RING = 64  # pinned envelope slots per communicator: unverified device calls in flight, at most
MODES = ("deferred", "eager")
_ZEROS = bytes(8)
_INT64 = 2 ** 63


class TensorMeta(msgspec.Struct, array_like=True, frozen=True):
    """One rank's tensor as its envelope describes it; all but ``site`` must agree."""

    name: str
    dtype: str
    device: str
    shape: Tuple[int, ...]
    site: str


_META_DECODER = msgspec.msgpack.Decoder(TensorMeta)
_ROLES: Dict[str, SchemaInfo] = {}


def _role(name: str) -> SchemaInfo:
    """The envelope's schema for a tensor role: its name, fingerprinted like a schema."""
    info = _ROLES.get(name)
    if info is None:
        info = _ROLES[name] = SchemaInfo(None, name or "tensor", _digest("tensor:" + name),
                                         KIND_MSGSPEC, None)
    return info


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# --- arguments -----------------------------------------------------------------------------------
class _Call:
    """One tensor collective's arguments, validated; ``error`` set instead of raising."""

    __slots__ = ("op", "tensor", "name", "step", "root", "reduce_code", "error", "meta",
                 "payload", "array_fp", "code", "lasti", "on_device")

    def __init__(self, p: Protocol, op: str, tensor: Any, name: Any, step: Any,
                 root: Any = None, reduce_op: Any = None) -> None:
        frame = user_frame(2)
        self.code = frame.f_code if frame is not None else None
        self.lasti = frame.f_lasti if frame is not None else 0
        self.op = op
        self.tensor = tensor
        self.name = name if isinstance(name, str) else ""
        self.step = step
        self.root = NO_ROOT
        self.reduce_code = 0
        self.error: Optional[str] = None
        is_tensor = isinstance(tensor, torch.Tensor)
        self.on_device = is_tensor and tensor.is_cuda
        if not isinstance(name, str):
            self.error = f"TypeError: expected name to be a str, got {name!r}"
        elif not is_tensor:
            self.error = f"TypeError: expected a torch.Tensor, got {type(tensor).__name__}"
        elif not (step is None or (type(step) is int and -_INT64 < step < _INT64)):
            self.error = f"TypeError: expected step to be None or a 64-bit int, got {step!r}"
        if op in ROOTED_OPS:
            if type(root) is int and 0 <= root < p.size:
                self.root = root
            elif self.error is None:
                self.error = f"ValueError: expected root in 0..{p.size - 1}, got {root!r}"
        if op in REDUCING_OPS:
            code = REDUCE_OPS.get(reduce_op) if isinstance(reduce_op, str) else None
            if code is not None:
                self.reduce_code = code
            elif self.error is None:
                self.error = (f"ValueError: expected op 'sum', 'max', 'min' or 'prod', "
                              f"got {reduce_op!r}")
        if is_tensor:
            if self.error is None:
                self.error = _shape_error(op, tensor, p.size)
            key = (self.name, tensor.dtype, self.on_device, tensor.shape, self.code, self.lasti)
        else:
            key = (self.name, None, False, (), self.code, self.lasti)
        # The readable meta, its encoding and fingerprint depend only on the key: built once per
        # (role, dtype, device, shape, call site), as a training loop repeats them every step.
        cached = _META_CACHE.get(key)
        if cached is None:
            if len(_META_CACHE) > 4096:
                _META_CACHE.clear()
            site = format_site(self.code, self.lasti)[-64:]
            if is_tensor:
                meta = TensorMeta(self.name[:64], _dtype_name(tensor.dtype), tensor.device.type,
                                  tuple(tensor.shape), site)
            else:
                meta = TensorMeta(self.name[:64], "?", "?", (), site)
            payload = ENCODER.encode(meta)
            if len(payload) > META_MAX:  # a very long shape: the fingerprint still covers it
                payload = ENCODER.encode(TensorMeta(meta.name[:16], meta.dtype, meta.device, (),
                                                    site[-32:]))
            array_fp = array_fingerprint(f"{meta.dtype}@{meta.device}", meta.shape)
            cached = _META_CACHE[key] = (meta, payload, array_fp)
        self.meta, self.payload, self.array_fp = cached
        if self.error is not None:
            self.step = None  # a bad step must not also make the envelopes differ

    @property
    def site(self) -> str:
        return self.meta.site


_META_CACHE: Dict[tuple, Tuple[TensorMeta, bytes, bytes]] = {}


def _shape_error(op: str, tensor: torch.Tensor, size: int) -> Optional[str]:
    if op in ("all_reduce_tensor", "broadcast_tensor") and not tensor.is_contiguous():
        return "ValueError: expected a contiguous tensor (the collective works in place)"
    if op == "reduce_scatter_tensor" and (tensor.dim() == 0 or tensor.shape[0] % size):
        return (f"ValueError: expected dim 0 to be a multiple of the group size {size}, got "
                f"shape {tuple(tensor.shape)}")
    return None


# --- the envelope as data ------------------------------------------------------------------------
def _infos(blocks: List[Tuple[int, Tuple, Optional[TensorMeta]]]) -> List[EnvelopeInfo]:
    """Readable envelopes from (rank, header fields, meta); device shown only where it differs."""
    devices = {m.device for _, _, m in blocks if m is not None}
    out = []
    for rank, header, meta in blocks:
        _, opc, redop, _, root, seq, step, fp, _, _, _, _ = header
        op = op_name(opc)
        dtype = None
        if meta is not None:
            dtype = meta.dtype if len(devices) == 1 else f"{meta.dtype} ({meta.device})"
        out.append(EnvelopeInfo(
            rank=rank, seq=seq, op=op, schema=(meta.name or "tensor") if meta else "?",
            fingerprint=fp.hex(), site=meta.site if meta else "?",
            step=None if step == NO_STEP else step,
            root=root if op in ROOTED_OPS else None,
            reduce_op=reduce_op_name(redop) if op in REDUCING_OPS else None,
            shape=meta.shape if meta else None, dtype=dtype))
    return out


def _desync(p: Protocol, seq: int, infos: List[EnvelopeInfo]) -> DesyncError:
    kinds = mismatch_kinds(infos)
    groups = group_envelopes(infos)
    return DesyncError(desync_message(seq, p.name, kinds, groups), seq=seq, comm=p.name,
                       kinds=kinds, groups=groups)


def _local_error(p: Protocol, seq: int, call: _Call, failed: List[int],
                 texts: Dict[int, str]) -> CollectiveError:
    """EncodeError on a failing rank, PeerError naming the first failing rank elsewhere."""
    what = f"{call.op}[{call.name or 'tensor'}]"
    if p.rank in failed:
        detail = call.error.partition(": ")[2] if call.error else "?"
        return EncodeError(f"collective #{seq} on {p.name}: rank {p.rank} could not send its "
                           f"{what} contribution: {detail}", seq=seq, comm=p.name)
    first = failed[0]
    error_type, _, detail = texts[first].partition(": ")
    others = "" if len(failed) == 1 else f" (and {len(failed) - 1} more)"
    return PeerError(f"collective #{seq} on {p.name}: rank {first}{others} failed its {what} "
                     f"contribution: {detail}", seq=seq, comm=p.name, ranks=failed,
                     error_type=error_type, detail=detail)


def _timeout(p: Protocol, seq: int, call: _Call) -> CollectiveTimeout:
    err = CollectiveTimeout(
        f"collective #{seq} on {p.name}: {call.op}[{call.name or 'tensor'}] at {call.site} did "
        f"not complete within {p.timeout:g} s", seq=seq, comm=p.name, op=call.op,
        schema=call.name or "tensor", site=call.site, timeout=p.timeout or 0.0)
    p.broken = err
    return err


# --- host path (CPU tensors) ---------------------------------------------------------------------
def _host(p: Protocol, call: _Call, launch: Callable[[bool], Any]) -> None:
    info = _role(call.name)
    try:
        p1 = p.phase1(call.op, info, call.meta, MODE_MSG, root=call.root,
                      reduce_op=call.reduce_code, step=call.step, error=call.error)
        bufs = p.gather_payloads(p1)
        own = bytes(bufs[p.rank])  # type: ignore[index]
        if any(bytes(b) != own for b in bufs):  # type: ignore[union-attr]
            metas = [_META_DECODER.decode(b) for b in bufs]  # type: ignore[union-attr]
            if len({(m.name, m.dtype, m.device, m.shape) for m in metas}) > 1:
                header = (MAGIC, OPS[call.op], call.reduce_code, 0, call.root, p1.seq,
                          NO_STEP if call.step is None else call.step, info.fingerprint,
                          _ZEROS, _ZEROS, 0, 0)
                raise _desync(p, p1.seq, _infos([(r, header, m) for r, m in enumerate(metas)]))
        work = launch(p1.deadline is not None)
        if p1.deadline is not None:
            try:
                wait_work(work, p1.deadline)
            except TransportTimeout:
                raise _timeout(p, p1.seq, call) from None
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed()


# --- device path (CUDA tensors) ------------------------------------------------------------------
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
        checks.pending.append(rec)
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


def _run(p: Protocol, call: _Call, launch: Callable[[bool], Any]) -> None:
    if getattr(p.transport, "kind", None) != "torch":
        raise TypeError(f"{call.op} needs a communicator made by TypedComm.from_torch")
    if call.on_device or (not isinstance(call.tensor, torch.Tensor) and _is_device_group(p)):
        _device(p, call, launch)
    else:
        checks = p.extensions.get("tensor")
        if checks is not None:
            checks.verify_ready(p)
        _host(p, call, launch)


def _is_device_group(p: Protocol) -> bool:
    return "nccl" in str(dist.get_backend(p.transport.group))


# --- the four collectives ------------------------------------------------------------------------
# Each builds its output, then hands a launcher (async_op -> Work or None) to the checked path.

def all_gather_tensor(p: Protocol, tensor: Any, name: str, step: Optional[int]) -> Any:
    """Every rank's ``tensor`` concatenated along dim 0 (a 0-d tensor gathers to shape [size])."""
    call = _Call(p, "all_gather_tensor", tensor, name, step)
    out = None
    if call.error is None:
        src = tensor.reshape(1) if tensor.dim() == 0 else tensor.contiguous()
        out = src.new_empty((src.shape[0] * p.size,) + tuple(src.shape[1:]))
        _run(p, call, lambda a: all_gather_single(out, src, group=p.transport.group,
                                                  async_op=a))
    else:
        _run(p, call, _never)
    return out


def all_reduce_tensor(p: Protocol, tensor: Any, op: str, name: str, step: Optional[int]) -> Any:
    """Reduce ``tensor`` across ranks in place with ``op``; returns it."""
    call = _Call(p, "all_reduce_tensor", tensor, name, step, reduce_op=op)
    _run(p, call, _never if call.error else lambda a: dist.all_reduce(
        tensor, op=TORCH_OPS[op], group=p.transport.group, async_op=a))
    return tensor


def broadcast_tensor(p: Protocol, tensor: Any, root: int, name: str, step: Optional[int]) -> Any:
    """Overwrite ``tensor`` in place with ``root``'s; returns it."""
    call = _Call(p, "broadcast_tensor", tensor, name, step, root=root)
    _run(p, call, _never if call.error else lambda a: dist.broadcast(
        tensor, src=p.transport.ranks[root], group=p.transport.group, async_op=a))
    return tensor


def reduce_scatter_tensor(p: Protocol, tensor: Any, op: str, name: str,
                          step: Optional[int]) -> Any:
    """Reduce ``tensor`` across ranks with ``op``; rank r gets block r of dim 0 (a new tensor)."""
    call = _Call(p, "reduce_scatter_tensor", tensor, name, step, reduce_op=op)
    out = None
    if call.error is None:
        src = tensor.contiguous()
        out = src.new_empty((src.shape[0] // p.size,) + tuple(src.shape[1:]))
        _run(p, call, lambda a: reduce_scatter_single(out, src, op=TORCH_OPS[op],
                                                      group=p.transport.group, async_op=a))
    else:
        _run(p, call, _never)
    return out


def synchronize(p: Protocol) -> None:
    """Verify every pending device-path check now, waiting for their envelopes (not payloads)."""
    checks = p.extensions.get("tensor")
    if checks is not None:
        try:
            checks.verify_all(p)
        except BaseException as exc:
            p.failed(exc)
            raise


def _never(async_op: bool) -> Any:
    raise AssertionError("a collective with a flagged error must not launch its payload")


register_internal(__file__)
