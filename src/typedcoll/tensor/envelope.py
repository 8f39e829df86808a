"""What a rank says it calls in a tensor collective: the per-call record and its readable form.

Both paths (``tensor.ops``) start from one :class:`TensorCall`: the core's per-call record with
the tensor's dtype, device type and shape hashed into the header's array fingerprint (checked on
every rank like the rest of the header) and shown as ``shape=`` and ``dtype=`` in messages.
Argument errors become the call's flagged error, never a raise: every rank must still reach the
exchange. The device path also writes a small :class:`DeviceMeta` after each header, so that a
rank can build every peer's readable envelope from the gathered blocks alone.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import msgspec
import torch

from ..codecs import KIND_ARRAY, ENCODER, SchemaInfo, array_fingerprint
from ..codecs.digest import digest8
from ..core.args import check_root, check_step, first_error
from ..core.call import MODE_EMPTY, Call
from ..core.errors import DesyncError
from ..core.identity import check_name
from ..core.plumbing import register_internal
from ..core.desync import desync_message
from ..core.mismatch import Branch, Caller, EnvelopeInfo, group_envelopes, mismatch_kinds
from ..core.verdict import heading
from ..core.wire import (FLAG_LOCAL_ERROR, HEADER, HEADER_SIZE, NO_ROOT, NO_STEP, REDUCE,
                         REDUCE_OPS, REDUCING_OPS, ROOTED_OPS, op_name, reduce_op_name)

BLOCK = 256  # envelope bytes per rank on the device path: header, then DeviceMeta
META_MAX = BLOCK - HEADER_SIZE
RING = 64  # pinned envelope slots per communicator: unverified device calls in flight, at most
MODES = ("deferred", "eager")
TENSOR_OPS = ("sum", "prod", "max", "min")  # what both gloo and NCCL reduce
BITWISE_OPS = ("band", "bor", "bxor")  # what gloo reduces too, of integer and bool tensors
# Tensor collectives carry no payload schema: an empty name (messages show the bare op) and one
# fingerprint for every tensor call (an object collective still differs from it in its op).
TENSOR_INFO = SchemaInfo(None, "", array_fingerprint("tensor", ()), KIND_ARRAY, None)
# Dtypes gloo reduces (the host path); moving bytes (gather, broadcast) works for every dtype.
GLOO_REDUCIBLE = frozenset({torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64,
                            torch.float16, torch.bfloat16, torch.float32, torch.float64,
                            torch.complex64, torch.complex128})


class TensorCall(Call):
    """A tensor collective's record: the core's :class:`Call` plus the tensor itself."""

    __slots__ = ("tensor", "on_device", "payload_ok")
    tensor: Any  # what this rank passed (not necessarily a tensor: then call.error says so)
    on_device: bool  # the device path (CUDA tensor, NCCL) rather than the host path
    payload_ok: bool  # the tensor passed every check: any error is the caller's own


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_call(p: Any, op: str, tensor: Any, name: Any, step: Any, *, root: Any = None,
                reduce_op: Any = None, error: Optional[str] = None) -> TensorCall:
    """The record of one tensor collective on this rank, its argument errors flagged (``error``:
    one its caller found, such as a drop-in's output list of the wrong size)."""
    name = None if name == "" else name
    name_error, step_error = check_name(name), check_step(step)
    is_tensor = isinstance(tensor, torch.Tensor)
    device_group = p.transport.device_group if p.transport.kind == "torch" else None
    # A rank that passes no tensor at all takes the path its peers most likely take.
    on_device = tensor.is_cuda if is_tensor else device_group is not None
    on_device = on_device and device_group is not None
    errors: List[Optional[str]] = [
        name_error, step_error,
        None if is_tensor else f"TypeError: expected a torch.Tensor, got {type(tensor).__name__}"]
    code = 0
    if op in REDUCING_OPS:
        known = TENSOR_OPS if on_device else TENSOR_OPS + BITWISE_OPS
        if isinstance(reduce_op, str) and reduce_op in known:
            code = REDUCE_OPS[reduce_op]
        else:
            names = ", ".join(repr(k) for k in known[:-1])
            why = (" (NCCL reduces no bitwise op: a CPU tensor's goes through gloo)"
                   if isinstance(reduce_op, str) and reduce_op in BITWISE_OPS else "")
            errors.append(f"ValueError: expected op {names} or {known[-1]!r}, got "
                          f"{reduce_op!r}{why}"[:300])
    root_error = check_root(root, p.size) if op in ROOTED_OPS else None
    errors.append(root_error)
    meta = None
    fingerprint = bytes(8)
    if is_tensor:
        errors.append(_tensor_error(op, tensor, p.size, reduce_op, on_device, device_group))
        meta = (tuple(tensor.shape), dtype_name(tensor.dtype))
        fingerprint = array_fingerprint(f"{meta[1]}@{tensor.device.type}", meta[0])
    payload_ok = first_error(*errors) is None
    errors.insert(0, error)  # the caller's own words first: it knows what its user passed
    call = TensorCall(op, REDUCE, TENSOR_INFO, MODE_EMPTY, None,
                      root=int(root) if op in ROOTED_OPS and root_error is None else NO_ROOT,
                      reduce_op=code, step=None if step_error else step,
                      name=None if name_error else name, error=first_error(*errors),
                      array_fp=fingerprint, array_meta=meta)
    call.tensor = tensor
    call.on_device = on_device
    call.payload_ok = payload_ok
    return call


def _tensor_error(op: str, tensor: torch.Tensor, size: int, reduce_op: Any, on_device: bool,
                  device_group: Any) -> Optional[str]:
    if tensor.is_cuda and not on_device:
        return (f"ValueError: expected a CPU tensor (the group has no NCCL backend), got one on "
                f"{tensor.device}")
    if not on_device and (tensor.layout != torch.strided or tensor.device.type != "cpu"):
        return (f"ValueError: expected a dense CPU or CUDA tensor, got layout "
                f"{str(tensor.layout).removeprefix('torch.')} on {tensor.device}")
    if tensor.is_conj() or tensor.is_neg():
        # Collectives move memory: a pending conjugate or negation would be lost on the way.
        return ("ValueError: expected a tensor without a pending conjugate or negation, got a "
                "view with one (call .resolve_conj() or .resolve_neg() first)")
    if op in ("all_reduce_tensor", "broadcast_tensor", "reduce_tensor") and \
            not tensor.is_contiguous():
        return "ValueError: expected a contiguous tensor (the collective works in place)"
    if op in ("reduce_scatter_tensor", "all_to_all_tensor") and \
            (tensor.dim() == 0 or tensor.shape[0] % size):
        return (f"ValueError: expected dim 0 to be a multiple of the group size {size}, got "
                f"shape {tuple(tensor.shape)}")
    if op in REDUCING_OPS:
        if tensor.is_complex() and reduce_op != "sum":
            return f"TypeError: expected a real tensor for op {reduce_op!r}, got {tensor.dtype}"
        if not on_device and tensor.dtype not in GLOO_REDUCIBLE:
            return f"TypeError: expected a dtype gloo can reduce, got {tensor.dtype}"
        bitwise = isinstance(reduce_op, str) and reduce_op in BITWISE_OPS
        if bitwise and (tensor.is_floating_point() or tensor.is_complex()):
            return (f"TypeError: expected an integer or bool tensor for op {reduce_op!r}, got "
                    f"{tensor.dtype}")
    return None


# --- the device path's envelope as data --------------------------------------------------------
class DeviceBranch(msgspec.Struct, array_like=True, frozen=True):
    """A role branch (``core.mismatch.Branch``) as the block carries it: an array, not a map,
    its keys digested (``blocks.role_branch_of``), so that a call and its callers' branches
    fit."""

    key: str
    arm: int
    outer: Tuple[Tuple[str, int], ...] = ()

    @classmethod
    def of(cls, branch: Optional[Branch]) -> Optional["DeviceBranch"]:
        return None if branch is None else cls(branch.key, branch.arm, branch.outer)

    def branch(self) -> Branch:
        return Branch(self.key, self.arm, self.outer)


class DeviceMeta(msgspec.Struct, array_like=True, frozen=True):
    """One rank's device-path envelope, after the header: what messages show."""

    name: Optional[str]
    dtype: str
    device: str
    shape: Tuple[int, ...]
    site: str
    occurrence: int
    comm: str
    error: Optional[str] = None
    column: Optional[int] = None  # where on the site's line the call starts, 0-based
    # An unnamed broadcast's role branch (core.arms), its key digested to fit the block.
    branch: Optional[DeviceBranch] = None
    via: Optional[str] = None  # the thin wrapper the call went through (core.identity)
    # An unnamed broadcast's callers where its site is a role branch's (core.callers): each its
    # site (column and wrapper included) and its branch, the key digested, as the verdict
    # compares them; texts are cut with a digest of the whole kept (``_cut_kept_apart``).
    callers: Tuple[Tuple[str, Optional[DeviceBranch]], ...] = ()


META_DECODER = msgspec.msgpack.Decoder(DeviceMeta)


def encode_meta(meta: DeviceMeta) -> bytes:
    """``meta`` in at most META_MAX bytes: long texts and shapes are cut (the header's
    fingerprints still cover them), the branch kept (the verdict reads it)."""
    payload = ENCODER.encode(meta)
    # Characters kept of each text (none of the name in the second pass, of callers' in the
    # third: their digests), dimensions of the shape.
    for name, error, site, comm, dims, callers in ((24, 64, 40, 24, 4, 40), (0, 16, 24, 8, 0, 24),
                                                   (0, 16, 24, 8, 0, 0)):
        if len(payload) <= META_MAX:
            break
        meta = DeviceMeta(None if meta.name is None or not name else meta.name[:name],
                          meta.dtype[:16], meta.device[:8],
                          meta.shape if len(meta.shape) <= dims else (), meta.site[-site:],
                          meta.occurrence, meta.comm[:comm],
                          None if meta.error is None else meta.error[:error], meta.column,
                          meta.branch, _cut_kept_apart(meta.via, site),
                          _cut_callers(meta.callers, callers))
        payload = ENCODER.encode(meta)
    if len(payload) > META_MAX:  # texts of wide characters: keep what the verdict reads
        meta = DeviceMeta(None, "?", "?", (), "?", meta.occurrence, "?",
                          None if meta.error is None else "?", meta.column, meta.branch,
                          _cut_kept_apart(meta.via, 0), _cut_callers(meta.callers, 0))
        payload = ENCODER.encode(meta)
    # Still too long (callers nested deep, a branch with many enclosing candidates): give up
    # what lets calls pair, never what tells them apart, so that at worst a pair of calls raises
    # (a false alarm), never that other calls pair. Each rank cuts its own: ranks that cut
    # differently disagree, and raise.
    for cut in (_callers_without_branches, _callers_as_one_digest, _branch_alone, _no_branch):
        if len(payload) <= META_MAX:
            break
        meta = cut(meta)
        payload = ENCODER.encode(meta)
    assert len(payload) <= META_MAX, len(payload)
    return payload


def _callers_without_branches(meta: DeviceMeta) -> DeviceMeta:
    """Callers' sites alone: ranks split at a caller's level pair nothing there."""
    return msgspec.structs.replace(meta, callers=tuple((text, None) for text, _ in meta.callers))


def _callers_as_one_digest(meta: DeviceMeta) -> DeviceMeta:
    """Every caller in one digest: equal callers still pair, any difference raises."""
    if not meta.callers:
        return meta
    return msgspec.structs.replace(
        meta, callers=((f"~{digest8(repr(meta.callers)).hex()}", None),))


def _branch_alone(meta: DeviceMeta) -> DeviceMeta:
    """The call's own branch without its enclosing candidates (receivers split by ``elif``
    then raise)."""
    branch = meta.branch
    return meta if branch is None else msgspec.structs.replace(
        meta, branch=DeviceBranch(branch.key, branch.arm))


def _no_branch(meta: DeviceMeta) -> DeviceMeta:
    return msgspec.structs.replace(meta, branch=None)


def _cut_callers(callers: Tuple[Tuple[str, Optional[DeviceBranch]], ...], keep: int
                 ) -> Tuple[Tuple[str, Optional[DeviceBranch]], ...]:
    return tuple((_cut_kept_apart(text, keep) or "?", branch) for text, branch in callers)


def _cut_kept_apart(text: Optional[str], keep: int) -> Optional[str]:
    """``text`` in at most ``keep`` + 9 characters, its head and a digest of the whole: for what
    ranks compare (the thin wrapper a role branch's calls went through), where a cut alone
    could make two wrappers one."""
    if text is None or len(text) <= keep:
        return text
    return f"{text[:keep]}~{digest8(text).hex()[:8]}"


def infos_from_blocks(blocks: bytes, size: int) -> List[EnvelopeInfo]:
    """Every rank's readable envelope from the gathered device blocks alone."""
    parsed = []
    for r in range(size):
        block = blocks[r * BLOCK:(r + 1) * BLOCK]
        header = HEADER.unpack_from(block, 0)
        raw = block[HEADER_SIZE:HEADER_SIZE + min(header[-1], META_MAX)]
        try:
            meta: Optional[DeviceMeta] = META_DECODER.decode(raw)
        except msgspec.DecodeError:
            meta = None
        parsed.append((r, header, meta))
    devices = {m.device for _, _, m in parsed if m is not None}
    out = []
    for r, header, meta in parsed:
        _, opc, redop, _, root, seq, step, fp, _, _, _, _, flags, _ = header
        op = op_name(opc)
        failed = bool(flags & FLAG_LOCAL_ERROR)
        error = (meta.error or "?") if meta is not None and failed else ("?" if failed else None)
        dtype = None
        if meta is not None and not failed:
            dtype = meta.dtype if len(devices) == 1 else f"{meta.dtype} ({meta.device})"
        out.append(EnvelopeInfo(
            rank=r, seq=seq, op=op, schema="", fingerprint=fp.hex(),
            comm=meta.comm if meta else "?", site=meta.site if meta else "?",
            column=meta.column if meta else None,
            branch=meta.branch.branch() if meta and meta.branch else None,
            via=meta.via if meta else None,
            callers=tuple(Caller(text, branch=None if branch is None else branch.branch())
                          for text, branch in meta.callers)
            if meta else (),
            name=meta.name if meta else None, occurrence=meta.occurrence if meta else 0,
            step=None if step == NO_STEP else step,
            root=root if op in ROOTED_OPS else None,
            reduce_op=reduce_op_name(redop) if op in REDUCING_OPS else None,
            shape=meta.shape if meta is not None and not failed else None, dtype=dtype,
            error_type=error.partition(": ")[0] if error else None,
            error=error.partition(": ")[2] if error else None))
    return out


def desync_error(p: Any, seq: int, infos: Sequence[EnvelopeInfo],
                 compared: Sequence[EnvelopeInfo]) -> DesyncError:
    """The DesyncError of ``infos``; ``compared`` (the ranks that did not fail) gives kinds."""
    kinds = mismatch_kinds(compared)
    groups = group_envelopes(infos)
    return DesyncError(desync_message(seq, p.name, kinds, groups, head=heading(p, seq)), seq=seq,
                       comm=p.name, kinds=kinds, groups=groups)


register_internal(__file__)
