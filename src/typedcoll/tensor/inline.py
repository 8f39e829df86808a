"""Small CPU tensors ride in the envelope exchange itself: one gloo round trip per call.

The host path (``tensor.ops``) checks every rank's envelope in one exchange, then moves the
payload on a second gloo collective. A tensor of at most ``INLINE_MAX`` bytes -- an engine's
per-step vote, a few numbers of per-rank stats -- travels in its rank's slot of that exchange
instead, and every rank finishes the op from the gathered slots:

  all_gather_tensor   every rank's bytes, in rank order
  all_to_all_tensor   block ``rank`` of every rank's bytes, in rank order
  broadcast_tensor    the root's bytes (the other ranks send none)
  all_reduce_tensor   integer dtypes only (int8, uint8, int32, int64), reduced in rank order:
                      sums and products wrap, max, min and the bitwise ops are exact, so the
                      result is gloo's, bit for bit, on every rank. Floats keep gloo's own
                      reduction (its order, its NaN rule) on the second collective.
  reduce_tensor, gather_tensor, scatter_tensor
                      as all_reduce_tensor, all_gather_tensor and broadcast_tensor (of the
                      root's stacked parts): the root keeps, or every rank takes, its share.

Whether a call rides inline depends only on what its header carries (op, dtype, shape, reduce
op), so ranks whose headers agree choose alike; ranks whose headers differ get the verdict first.
Every host-path call uses the GATHER exchange, inline or not, so ranks meet in one exchange shape.
"""

from __future__ import annotations

from typing import Any, List

import numpy as np
import torch

from ..core import payloads
from ..core.call import MODE_BYTES
from ..core.errors import DecodeError
from ..core.plumbing import register_internal
from ..core.protocol import Protocol
from ..core.verdict import where
from ..core.wire import GATHER
from .envelope import TensorCall

INLINE_MAX = 256  # bytes of one rank's tensor that ride in its slot
_REDUCIBLE = {torch.int8: np.int8, torch.uint8: np.uint8, torch.int32: np.int32,
              torch.int64: np.int64}
_UFUNCS = {"sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum,
           "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}


def on_host(call: TensorCall) -> None:
    """Every host-path call takes the GATHER exchange (inline or not)."""
    call.shape = GATHER
    call.inline = True


def ride(p: Protocol, call: TensorCall, op: Any = None) -> bool:
    """Make a host-path ``call`` carry its tensor in its slot, where it may; True if it does."""
    tensor = call.tensor
    if call.error is not None:
        return False
    if not 0 < tensor.nbytes <= INLINE_MAX:
        return False
    if call.op in ("all_reduce_tensor", "reduce_tensor") and (tensor.dtype not in _REDUCIBLE
                                                             or op not in _UFUNCS):
        return False
    sends = call.op not in ("broadcast_tensor", "scatter_tensor") or p.rank == call.root
    try:
        # A strided or expanded view is copied whole first: its own memory is not its values.
        value = _raw(tensor.contiguous()).tobytes() if sends else b""
    except Exception as exc:  # flagged in the call: raising here would leave the peers waiting
        call.error = f"ValueError: could not read the tensor's memory: {exc}"[:300]
        return False
    call.mode = MODE_BYTES
    call.value = value
    return True


def _raw(tensor: torch.Tensor) -> Any:
    """A contiguous tensor's memory as a flat uint8 numpy array (writes bypass autograd and
    inference-mode checks, as the backend's own in-place collectives do)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def _payloads(p: Protocol, call: TensorCall, expected: List[int]) -> List[Any]:
    """Every rank's bytes, each of the length its header promised (the same check on every
    rank: lengths come from the gathered headers)."""
    bufs = payloads.gathered(p, call)
    for r, (buf, n) in enumerate(zip(bufs, expected)):
        if len(buf) != n:
            raise DecodeError(f"{where(p, call)}: rank {r} sent {len(buf)} bytes of its "
                              f"{call.op} tensor, expected {n}", seq=call.seq, comm=p.name,
                              source=r, schema="tensor")
    return bufs


def all_gather(p: Protocol, call: TensorCall, out: Any) -> None:
    """``out`` (every rank's tensor along dim 0) from the gathered slots."""
    nbytes = call.tensor.nbytes
    bufs = _payloads(p, call, [nbytes] * p.size)
    dst = _raw(out)
    for r, buf in enumerate(bufs):
        dst[r * nbytes:(r + 1) * nbytes] = np.frombuffer(buf, dtype=np.uint8)


def all_to_all(p: Protocol, call: TensorCall, out: Any) -> None:
    """``out``'s block j: block ``rank`` of rank j's tensor, from the gathered slots."""
    nbytes = call.tensor.nbytes
    block = nbytes // p.size
    bufs = _payloads(p, call, [nbytes] * p.size)
    dst, mine = _raw(out), p.rank * block
    for r, buf in enumerate(bufs):
        dst[r * block:(r + 1) * block] = np.frombuffer(buf, dtype=np.uint8)[mine:mine + block]


def broadcast(p: Protocol, call: TensorCall) -> None:
    """The root's tensor into every other rank's, from the gathered slots."""
    tensor = call.tensor
    bufs = _payloads(p, call, [tensor.nbytes if r == call.root else 0 for r in range(p.size)])
    if p.rank != call.root:
        _raw(tensor)[:] = np.frombuffer(bufs[call.root], dtype=np.uint8)


def all_reduce(p: Protocol, call: TensorCall, op: str) -> None:
    """Every rank's tensor reduced in rank order into this rank's, from the gathered slots."""
    tensor = call.tensor
    dtype = _REDUCIBLE[tensor.dtype]
    bufs = _payloads(p, call, [tensor.nbytes] * p.size)
    acc = np.frombuffer(bufs[0], dtype=dtype).copy()
    ufunc = _UFUNCS[op]
    for buf in bufs[1:]:
        ufunc(acc, np.frombuffer(buf, dtype=dtype), out=acc)
    _raw(tensor)[:] = acc.view(np.uint8)


register_internal(__file__)
