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
     its array fingerprint, then the meta) into a pinned host ring slot, copies it into its own
     block of the slot's device buffer and all-gathers that buffer in place over the caller's
     group: one tiny NCCL collective, fixed size on every rank and identical for every op, so
     ranks that disagree about op, shape or root still meet in a well-defined NCCL call. The
     gathered blocks are copied back into pinned memory behind a CUDA event. No host sync. The
     two copies run on the ring's own streams, so on the caller's stream the check is one event
     wait, the gather and one event record (``_tensor_device._DeviceChecks`` has the streams).
  2. The payload collective is enqueued behind it on the same group (NCCL runs a group's
     collectives in issue order).
  3. Verification, on the host, of the pinned copy: each rank's first ``CHECKED`` header bytes
     against its own. *Deferred* (default): at the next typed call (tensor or object: the
     protocol's ``deferred`` hook), for every pending check whose copy back has completed,
     without waiting, and at ``comm.synchronize()``, waiting for all; a ring of ``RING`` slots
     bounds the unchecked calls in flight (the oldest is waited for when the ring is full).
     *Eager* (``TYPEDCOLL_TENSOR_CHECK=eager`` or ``TypedComm.from_torch(...,
     tensor_check="eager")``): wait for this call's envelope and verify it before the payload
     is enqueued -- one host sync per call, and nothing reaches NCCL's undefined behaviour.
  Every rank holds every rank's block, so every rank reaches the same verdict and builds the
  same ``DesyncError`` text from the blocks alone: no further exchange, nothing to meet in. In
  deferred mode the ranks may detect it at different calls; the envelope precedes the payload on
  the stream, so it is seen even when the mismatched payload collective itself hangs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ._callsite import register_internal
from ._protocol import MODE_MSG, Protocol
from ._torch import REDUCE_OPS as TORCH_OPS
from ._torch import all_gather_single, reduce_scatter_single, wait_work
from ._transport import TransportTimeout
from ._wire import (MAGIC, NO_STEP, OPS)

from ._tensor_envelope import (_Call, _META_DECODER, _ZEROS, _desync, _infos, _role, _timeout)
from ._tensor_device import _device

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
