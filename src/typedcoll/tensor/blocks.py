"""What one tensor call's device envelope block holds, written where the call is made.

The block is a ``wire.HEADER`` followed by the call's ``DeviceMeta`` (``tensor.envelope``): its
name, dtype, device, shape, call site and column, occurrence, error, role branch and callers.
Role-branch keys are digested so that a block of fixed size carries any of them; ranks compare
keys and never read them.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..codecs.digest import digest8
from ..core.arms import branch_of
from ..core.mismatch import Branch
from ..core.plumbing import register_internal
from ..core.protocol import Protocol
from ..core.site_walk import via_name
from ..core.sites import CodeTable, column_of, format_column, format_site
from ..core.wire import FLAG_LOCAL_ERROR, HEADER, HEADER_SIZE, MAGIC, OPS, ROOTED_OPS, slot_log2
from .envelope import BLOCK, DeviceBranch, DeviceMeta, TensorCall, dtype_name, encode_meta

_BRANCHES = CodeTable()  # a call site's role branch as blocks carry it (role_branch_of)
_UNSET = object()


def role_branch_of(call: TensorCall) -> Optional[Branch]:
    """The role branch of an unnamed rooted call (``core.arms``), its key digested to 16 hex
    characters so that any key fits the block: ranks compare keys, never read them."""
    if call.name is not None or call.op not in ROOTED_OPS:
        return None
    return _branch_at(call.code, call.lasti)


def _branch_at(code: Any, lasti: int) -> Optional[Branch]:
    found = _BRANCHES.get(code, lasti, _UNSET)
    if found is _UNSET:
        branch = branch_of(code, lasti)
        found = _BRANCHES.put(code, lasti, None if branch is None else
                              Branch(digest8(branch.key).hex(), branch.arm,
                                     tuple((digest8(k).hex(), a) for k, a in branch.outer)))
    return found  # type: ignore[no-any-return]


def callers_of(call: TensorCall) -> Tuple[Tuple[str, Optional[DeviceBranch]], ...]:
    """The callers of a call in a role branch (``core.callers``), as the block carries them:
    each its site, column and thin wrapper in one text, and its branch, the key digested as the
    call's own is."""
    return tuple((format_column(format_site(code, lasti), column_of(code, lasti)) +
                  (f" through {via_name(via)}" if via is not None else ""),
                  DeviceBranch.of(_branch_at(code, lasti))) for code, lasti, via in call.callers)


def pack_block(view: Any, p: Protocol, call: TensorCall) -> None:
    """Write ``call``'s device envelope (header, then DeviceMeta) at ``view[:BLOCK]``."""
    tensor = call.tensor
    is_tensor = isinstance(tensor, torch.Tensor)
    meta = DeviceMeta(call.name, dtype_name(tensor.dtype) if is_tensor else "?",
                      tensor.device.type if is_tensor else "?",
                      tuple(tensor.shape) if is_tensor else (), format_site(call.code, call.lasti),
                      call.occurrence, p.name, call.error, column_of(call.code, call.lasti),
                      DeviceBranch.of(role_branch_of(call)), via_name(call.via), callers_of(call))
    payload = encode_meta(meta)
    info = call.info
    assert info is not None
    HEADER.pack_into(view, 0, MAGIC, OPS[call.op], call.reduce_op, slot_log2(BLOCK), call.root,
                     call.seq, call.wire_step, info.fingerprint, call.array_fp,
                     p.identity(call), p.instance, BLOCK,
                     FLAG_LOCAL_ERROR if call.error is not None else 0, len(payload))
    view[HEADER_SIZE:HEADER_SIZE + len(payload)] = payload


register_internal(__file__)
