"""Tensor collectives with envelopes (torch backend): all-gather, all-reduce, broadcast,
reduce-scatter, all-to-all, and the rooted reduce, gather and scatter.

Each rank's envelope is the core's 64-byte header: op, seq, step, root, reduce op, the call's
identity (its ``name=``, else its call site), the communicator instance, and the tensor's dtype,
device type and shape hashed into the array fingerprint. Two paths, chosen by the tensor's device:

Host path (CPU tensors). Per call:
  1. The core's exchange on the private gloo group (``core.ops.run``: start, exchange, verdict):
     the header says everything that must agree. A tensor op meeting an object op, a different
     shape, dtype, root, reduce op, step or call site raises the same ``DesyncError`` on every
     rank before the payload moves; a rank's bad argument raises ``EncodeError`` there and
     ``PeerError`` on the others.
  2. The torch collective on the same private gloo group: two gloo round trips per call. A
     tensor of at most ``inline.INLINE_MAX`` bytes (a vote) instead rides in the exchange of
     step 1, and every rank finishes the op from the gathered slots (``inline``): one.

Device path (CUDA tensors, the group's NCCL backend). A gloo round trip (~1 ms) per call would
dwarf NCCL, and a host sync would stall the GPU queue, so the envelope travels on the device, in
band:
  1. The rank writes a ``BLOCK``-byte envelope (the same header, then a small readable
     ``DeviceMeta``) into a pinned host ring slot, copies it into its own block of the slot's
     device buffer and all-gathers that buffer in place over the group: one tiny NCCL collective,
     the same size for every op, so ranks that disagree about op, shape or root still meet in a
     well-defined NCCL call. The blocks are copied back into pinned memory behind a CUDA event.
     No host sync; the copies run on the ring's own streams (``device.DeviceChecks``).
  2. The payload collective is enqueued behind it on the same group (NCCL runs a group's
     collectives in issue order).
  3. Verification, on the host, of the pinned copy: each rank's checked header bytes against its
     own. *Deferred* (default): at the next typed call, tensor or object (the protocol's
     ``deferred`` hook), for every pending check whose copy back has completed, without waiting,
     and at ``comm.synchronize()``, waiting for all; a ring of ``RING`` slots bounds the
     unchecked calls in flight. *Eager* (``TYPEDCOLL_TENSOR_CHECK=eager`` or
     ``TypedComm.from_torch(..., tensor_check="eager")``): this call's envelope is verified
     before its payload is enqueued -- one host sync per call, and nothing reaches NCCL's
     undefined behaviour.
  Every rank holds every rank's block, so every rank builds the same error from the blocks
  alone: no further exchange, nothing to meet in. In deferred mode the ranks may detect it at
  different calls; the envelope precedes the payload on the stream, so it is seen even when the
  mismatched payload collective itself hangs.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch._C._distributed_c10d import (AllgatherOptions, AllreduceOptions, AllToAllOptions,
                                        BroadcastOptions, ReduceScatterOptions)

from ..core import ops as core_ops
from ..core import verdict
from ..core.args import check_root
from ..core.call import Call
from ..core.errors import DesyncError
from ..core.plumbing import register_internal
from ..core.site_walk import call_site, via_name
from ..core.sites import format_site
from ..core.mismatch import MismatchKind
from ..core.protocol import Protocol
from ..core.transport import TransportTimeout
from ..core.wire import GATHER
from ..transports.torch_tensors import TORCH_OPS
from . import device, inline
from .counts import AllToAllCounts, describe_unmatched, rows_differ, split_counts, unmatched
from .envelope import TensorCall, dtype_name, tensor_call


def _run(p: Protocol, call: TensorCall, host: Callable[[Optional[float]], None],
         on_device: Callable[[Any], None],
         from_slots: Optional[Callable[[], None]] = None, op: Any = None,
         payload: Any = None) -> None:
    """One checked tensor collective: ``host(deadline)`` or ``on_device(group)`` moves the
    payload once every rank agreed (host) or behind the envelope (device); ``from_slots()``
    finishes a small host tensor that rode in the exchange (``inline``). ``payload``: the
    tensor the host path moves where it is not the caller's (a rooted op's working copy)."""
    if call.on_device:
        device.run(p, call, on_device)
        return
    if payload is not None:
        call.tensor = payload  # the envelope (its fingerprint, its shape) is already written
    inline.on_host(call)
    rides = from_slots is not None and inline.ride(p, call, op)

    def rest(c: Call) -> None:
        if rides:
            assert from_slots is not None
            from_slots()
            return
        try:
            host(c.deadline)
        except TransportTimeout:
            verdict.timed_out(p, c)
    core_ops.run(p, call, rest)


def _torch_comm(p: Protocol, op: str) -> None:
    if p.transport.kind != "torch":
        raise TypeError(f"{op} needs a communicator made by TypedComm.from_torch")


def _opts(kind: Any, **fields: Any) -> Any:
    opts = device.stream_ordered(kind)
    for key, value in fields.items():
        setattr(opts, key, value)
    return opts


def _real(tensor: Any) -> Any:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _gather(p: Protocol, op: str, tensor: Any, root: Any, name: Any, step: Any,
            error: Optional[str]) -> Tuple[Any, TensorCall]:
    """Every rank's ``tensor`` concatenated along dim 0, on every rank (a 0-d tensor gathers to
    shape [size]), and the call's record: ``all_gather_tensor``, or ``gather_tensor`` whose
    root alone keeps it."""
    _torch_comm(p, op)
    call = tensor_call(p, op, tensor, name, step, root=root, error=error)
    out = src = None
    if call.payload_ok:
        src = tensor.reshape(1) if tensor.dim() == 0 else tensor.contiguous()
        out = src.new_empty((src.shape[0] * p.size,) + tuple(src.shape[1:]))
    _run(p, call, lambda deadline: p.transport.all_gather_tensor(out, src, deadline),
         lambda group: device.enqueued(group._allgather_base(_real(out), _real(src),
                                                             _opts(AllgatherOptions))),
         lambda: inline.all_gather(p, call, out))
    return out, call


# --- the four collectives ------------------------------------------------------------------------
def all_gather_tensor(p: Protocol, tensor: Any, name: Any, step: Any,
                      error: Optional[str] = None) -> Any:
    """Every rank's ``tensor`` concatenated along dim 0 (a 0-d tensor gathers to shape [size])."""
    return _gather(p, "all_gather_tensor", tensor, None, name, step, error)[0]


def all_reduce_tensor(p: Protocol, tensor: Any, op: Any, name: Any, step: Any,
                      error: Optional[str] = None) -> Any:
    """Reduce ``tensor`` across ranks in place with ``op``; returns it."""
    _torch_comm(p, "all_reduce_tensor")
    call = tensor_call(p, "all_reduce_tensor", tensor, name, step, reduce_op=op,
                       error=error)
    _run(p, call, lambda deadline: p.transport.all_reduce_tensor(tensor, op, deadline),
         lambda group: device.enqueued(group.allreduce([_real(tensor)], _opts(
             AllreduceOptions, reduceOp=TORCH_OPS[op]))),
         lambda: inline.all_reduce(p, call, op), op)
    return tensor


def broadcast_tensor(p: Protocol, tensor: Any, root: Any, name: Any, step: Any,
                     error: Optional[str] = None) -> Any:
    """Overwrite ``tensor`` in place with ``root``'s; returns it."""
    _torch_comm(p, "broadcast_tensor")
    call = tensor_call(p, "broadcast_tensor", tensor, name, step, root=root, error=error)
    _run(p, call, lambda deadline: p.transport.broadcast_tensor(tensor, call.root, deadline),
         lambda group: device.enqueued(group.broadcast([_real(tensor)], _opts(
             BroadcastOptions, rootRank=call.root))),
         lambda: inline.broadcast(p, call))
    return tensor


def reduce_scatter_tensor(p: Protocol, tensor: Any, op: Any, name: Any, step: Any,
                          error: Optional[str] = None) -> Any:
    """Reduce ``tensor`` across ranks with ``op``; rank r gets block r of dim 0 (a new tensor)."""
    _torch_comm(p, "reduce_scatter_tensor")
    call = tensor_call(p, "reduce_scatter_tensor", tensor, name, step, reduce_op=op,
                       error=error)
    out = src = None
    if call.payload_ok:
        src = tensor.contiguous()
        out = src.new_empty((src.shape[0] // p.size,) + tuple(src.shape[1:]))
    _run(p, call, lambda deadline: p.transport.reduce_scatter_tensor(out, src, op, deadline),
         lambda group: device.enqueued(group._reduce_scatter_base(_real(out), _real(src), _opts(
             ReduceScatterOptions, reduceOp=TORCH_OPS[op]))))
    return out


# --- all-to-all ----------------------------------------------------------------------------------
def all_to_all_tensor(p: Protocol, tensor: Any, name: Any, step: Any,
                      error: Optional[str] = None) -> Any:
    """Block j of ``tensor`` (dim 0 cut into ``size`` equal blocks) to rank j; returns a new
    tensor of its shape whose block j is rank j's block for this rank."""
    _torch_comm(p, "all_to_all_tensor")
    call = tensor_call(p, "all_to_all_tensor", tensor, name, step, error=error)
    out = src = None
    if call.payload_ok:
        src = tensor.contiguous()
        out = torch.empty_like(src)
    _run(p, call, lambda deadline: p.transport.all_to_all_tensor(out, src, deadline),
         lambda group: device.enqueued(group.alltoall_base(_real(out), _real(src), [], [], _opts(
             AllToAllOptions))),
         lambda: inline.all_to_all(p, call, out))
    return out


def all_to_all_rows(p: Protocol, out: Any, tensor: Any, receives: Any, sends: Any, name: Any,
                    step: Any, error: Optional[str] = None,
                    labels: Tuple[str, str] = ("output_split_sizes", "input_split_sizes")
                    ) -> Any:
    """``sends[j]`` rows of ``tensor`` (dim 0) to rank j, and ``receives[j]`` rows from rank j
    into ``out``, in rank order (None or []: equal blocks); returns ``out``. Two checked calls
    (``tensor.counts``): every rank's counts and what one of its rows is, read alike on every
    rank, then the rows. ``labels``: how errors name the receive and send
    counts."""
    _torch_comm(p, "all_to_all_tensor")
    error = error or _rows_error(out, tensor)
    if error is None:
        sends, error = split_counts(sends, tensor.shape[0], labels[1], p.size)
    if error is None:
        receives, error = split_counts(receives, out.shape[0], labels[0], p.size)
    if error is not None:
        core_ops.refuse(p, "all_to_all_tensor", GATHER, error, step, name,
                        schema=AllToAllCounts)
    mine = AllToAllCounts(tuple(sends), tuple(receives), dtype_name(tensor.dtype),
                          tuple(tensor.shape[1:]), tensor.device.type)
    table = core_ops.allgather(p, mine, AllToAllCounts, step, name, op="all_to_all_tensor")
    rows, kinds = rows_differ(table)
    if rows is not None:
        raise _counts_disagree(p, name, f"the ranks' rows differ: {rows}", kinds)
    pairs = unmatched(table)
    if pairs:
        raise _counts_disagree(p, name, f"the ranks' split sizes disagree: "
                               f"{describe_unmatched(pairs)}", [MismatchKind.SHAPE])
    # The rows' own checked call, its envelope a tensor of no rows (the counts' exchange
    # compared what a row is already): on the device path the envelope NCCL runs before them.
    call = tensor_call(p, "all_to_all_tensor", tensor.new_empty((0,) + tuple(tensor.shape[1:])),
                       name, step)
    src = tensor.contiguous()
    into = out if out.is_contiguous() else \
        torch.empty_like(out, memory_format=torch.contiguous_format)
    _run(p, call, lambda deadline: p.transport.all_to_all_tensor(into, src, deadline,
                                                                  receives, sends),
         lambda group: device.enqueued(group.alltoall_base(_real(into), _real(src), receives,
                                                           sends, _opts(AllToAllOptions))))
    if into is not out:
        out.copy_(into)
    return out


def _counts_disagree(p: Protocol, name: Any, why: str, kinds: List[MismatchKind]
                     ) -> DesyncError:
    """The error of counts or rows that disagree, in one text on every rank: the call's name
    where it has one (ranks may call it from different lines), else its site."""
    if name is not None:
        which = f"name={name!r}"
    else:
        frame, via = call_site()
        site = format_site(frame.f_code, frame.f_lasti) if frame is not None else "?"
        which = f"at {site}" + (f" through {via_name(via)}" if via is not None else "")
    seq = p.seq - 1
    exc = DesyncError(f"{verdict.heading(p, seq)}: all_to_all_tensor {which}: {why}", seq=seq,
                      comm=p.name, kinds=kinds)
    p.failed(exc)  # logged and dumped as any collective's error
    return exc


def all_to_all_any(p: Protocol, tensor: Any, sends: Any, receives: Any, name: Any,
                   step: Any) -> Any:
    """TypedComm's all-to-all: a CPU tensor without counts in one checked call; otherwise
    ``all_to_all_rows`` into a new tensor of the rows received. A CUDA tensor always takes the
    counted path, whose first exchange is on the host: ranks that differ in giving counts then
    meet in it and raise, where the one-call path's envelope on NCCL would leave them waiting
    in two different exchanges."""
    if sends is None and receives is None and not (isinstance(tensor, torch.Tensor) and
                                                   tensor.is_cuda):
        return all_to_all_tensor(p, tensor, name, step)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        return all_to_all_rows(p, tensor, tensor, receives, sends, name, step,
                               labels=("receive_counts", "send_counts"))
    rows = tensor.shape[0]
    if receives is not None and len(receives):
        try:
            rows = max(0, sum(operator.index(n) for n in receives))
        except TypeError:  # split_counts says why
            rows = 0
    out = tensor.new_empty((rows,) + tuple(tensor.shape[1:]))
    return all_to_all_rows(p, out, tensor, receives, sends, name, step,
                           labels=("receive_counts", "send_counts"))


def _rows_error(out: Any, tensor: Any) -> Optional[str]:
    """Why ``out`` cannot take rows of ``tensor``, or None (checked before the first exchange:
    nothing may fail on one rank alone after it)."""
    for what, value in (("input", tensor), ("output", out)):
        if not isinstance(value, torch.Tensor):
            return (f"TypeError: expected the {what} to be a torch.Tensor, got "
                    f"{type(value).__name__}")
        if value.dim() == 0:
            return f"ValueError: expected the {what} to have rows (dim 0), got a 0-d tensor"
        if value.layout != torch.strided:
            return (f"ValueError: expected the {what} to be a dense tensor, got layout "
                    f"{str(value.layout).removeprefix('torch.')}")
        if value.is_conj() or value.is_neg():
            return (f"ValueError: expected the {what} without a pending conjugate or "
                    f"negation, got a view with one (call .resolve_conj() or .resolve_neg() "
                    f"first)")
    if out.dtype != tensor.dtype or out.device != tensor.device or \
            out.shape[1:] != tensor.shape[1:]:
        return (f"ValueError: expected the output to hold rows of the input's, "
                f"{tuple(tensor.shape[1:])} of {tensor.dtype} on {tensor.device}, got "
                f"{tuple(out.shape[1:])} of {out.dtype} on {out.device}")
    return None


# --- the rooted three ----------------------------------------------------------------------------
# Each moves its payload on a symmetric collective (every rank sends and receives alike), so a
# root that ranks disagree on, found by the deferred device check after the payload was
# enqueued, pairs one complete collective with another instead of hanging NCCL.
def reduce_tensor(p: Protocol, tensor: Any, op: Any, root: Any, name: Any, step: Any,
                  error: Optional[str] = None) -> Any:
    """Reduce ``tensor`` across ranks with ``op`` into ``root``'s, in place; the other ranks'
    tensors are left as they were. Returns ``tensor``."""
    _torch_comm(p, "reduce_tensor")
    call = tensor_call(p, "reduce_tensor", tensor, name, step, root=root, reduce_op=op,
                       error=error)
    work = tensor
    if call.payload_ok and p.rank != call.root:
        work = tensor.clone()
    _run(p, call, lambda deadline: p.transport.all_reduce_tensor(work, op, deadline),
         lambda group: device.enqueued(group.allreduce([_real(work)], _opts(
             AllreduceOptions, reduceOp=TORCH_OPS[op]))),
         lambda: inline.all_reduce(p, call, op), op, payload=work)
    return tensor


def gather_tensor(p: Protocol, tensor: Any, root: Any, name: Any, step: Any,
                  error: Optional[str] = None) -> Any:
    """On ``root``, every rank's ``tensor`` concatenated along dim 0 (a 0-d tensor gathers to
    shape [size]); None on the other ranks."""
    out, call = _gather(p, "gather_tensor", tensor, root, name, step, error)
    return out if p.rank == call.root else None


def scatter_tensor(p: Protocol, tensor: Any, parts: Any, root: Any, name: Any, step: Any,
                   error: Optional[str] = None) -> Any:
    """``tensor`` overwritten in place with block ``rank`` of ``root``'s ``parts`` (every
    rank's share stacked along a new dim 0: shape ``(size,) + tensor.shape``; None elsewhere).
    Returns ``tensor``."""
    _torch_comm(p, "scatter_tensor")
    if error is None and check_root(root, p.size) is None and int(root) == p.rank and \
            isinstance(tensor, torch.Tensor):
        error = _parts_error(parts, tensor, p.size)
    call = tensor_call(p, "scatter_tensor", tensor, name, step, root=root, error=error)
    stacked = None
    if call.payload_ok:
        shape = (p.size,) + tuple(tensor.shape)
        # A root whose parts are flagged still moves a payload: on the device path its peers'
        # broadcast is enqueued before they can know.
        stacked = parts.reshape(shape).contiguous() if p.rank == call.root and \
            call.error is None else tensor.new_empty(shape)
    _run(p, call, lambda deadline: p.transport.broadcast_tensor(stacked, call.root, deadline),
         lambda group: device.enqueued(group.broadcast([_real(stacked)], _opts(
             BroadcastOptions, rootRank=call.root))),
         lambda: inline.broadcast(p, call), payload=stacked)
    if stacked is not None:
        tensor.copy_(stacked[p.rank])
    return tensor


def _parts_error(parts: Any, tensor: Any, size: int) -> Optional[str]:
    """Why a scatter's root cannot send ``parts`` (one ``tensor``-like block per rank), or
    None: flagged in the call, since raising here would leave the peers waiting."""
    numel = tensor.numel() * size
    if isinstance(parts, torch.Tensor) and parts.numel() == numel and \
            parts.dtype == tensor.dtype and parts.device == tensor.device:
        return None
    got = (f"{parts.numel()} elements of {parts.dtype} on {parts.device}"
           if isinstance(parts, torch.Tensor) else type(parts).__name__)
    return (f"ValueError: expected the root's parts to be a tensor of {numel} elements of "
            f"{tensor.dtype} on {tensor.device}, got {got}")


def synchronize(p: Protocol) -> None:
    """Verify every pending device-path check now, waiting for their envelopes (not payloads)."""
    checks: Optional[device.DeviceChecks] = p.extensions.get("tensor")
    if checks is not None:
        try:
            checks.verify_all(p)
        except BaseException as exc:
            p.failed(exc)
            raise


register_internal(__file__)
