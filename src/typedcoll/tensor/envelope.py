"""The tensor envelope shared by the host and device paths: what a rank says it calls.

See ``_tensor`` for the two paths and how they use it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import msgspec
import torch

from ._callsite import format_site, register_internal, user_frame
from ._errors import CollectiveError, CollectiveTimeout, DesyncError, EncodeError, PeerError
from ._mismatch import EnvelopeInfo, desync_message, group_envelopes, mismatch_kinds
from ._protocol import Protocol
from .codecs import ENCODER, KIND_MSGSPEC, SchemaInfo, array_fingerprint
from .codecs._schema import _digest
from ._wire import (HEADER_SIZE, NO_ROOT, NO_STEP, REDUCE_OPS, REDUCING_OPS, ROOTED_OPS, op_name,
                    reduce_op_name)

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


register_internal(__file__)
