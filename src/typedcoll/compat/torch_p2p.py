"""The torch drop-in's tensor point to point: ``send``, ``recv``, ``isend``, ``irecv`` and
``batch_isend_irecv``.

Tensors travel as typed messages (:class:`TensorMessage`: dtype, shape, bytes) on the private
point-to-point channel, through the host whatever their device: right for the small tensors of
a control plane, not for bulk data. The receiver checks the sender's dtype and shape against its
own tensor before it writes a byte: a DesyncError naming both sides where they differ (torch
would reinterpret the bytes or fail in the backend). As for every typed receive, only the
receiver raises: the send has completed by then.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import msgspec

from ..core import p2p
from ..core.errors import DesyncError
from ..core.plumbing import register_internal
from ..core.mismatch import MismatchKind
from ..core.protocol import Protocol
from .torch_group import GroupBinding, raise_if


class TensorMessage(msgspec.Struct, array_like=True, frozen=True):
    """One tensor sent point to point: what the receiver checks, then its bytes."""

    dtype: str
    shape: Tuple[int, ...]
    data: bytes


class TensorPointToPoint(GroupBinding):
    """torch.distributed's tensor point to point over one group's TypedComm."""

    def send(self, tensor: Any, dst: Optional[int] = None, group: Any = None, tag: int = 0,
             group_dst: Optional[int] = None, *, name: Optional[str] = None) -> None:
        """Send ``tensor`` to ``dst``; returns once the receiver took it, as torch's does."""
        peer = self._peer("send", dst, group_dst, group, receiving=False)
        message, refused = _message(tensor)
        p2p.send(self._p, message, peer, tag, TensorMessage, name, refused, complete=True)

    def isend(self, tensor: Any, dst: Optional[int] = None, group: Any = None, tag: int = 0,
              group_dst: Optional[int] = None, *, name: Optional[str] = None) -> Any:
        """Start sending ``tensor`` (its bytes are read now); ``wait()`` on the handle."""
        peer = self._peer("isend", dst, group_dst, group, receiving=False)
        message, refused = _message(tensor)
        return _Sending(p2p.isend(self._p, message, peer, tag, TensorMessage, name, refused))

    def recv(self, tensor: Any, src: Optional[int] = None, group: Any = None, tag: int = 0,
             group_src: Optional[int] = None, *, name: Optional[str] = None) -> int:
        """Fill ``tensor`` from ``src``; returns the sender's global rank. ``src=None`` (any rank)
        is refused on torch's transports, which cannot look for a message without waiting."""
        return self._receive("recv", tensor, src, group, tag, group_src, name).wait_rank()

    def irecv(self, tensor: Any, src: Optional[int] = None, group: Any = None, tag: int = 0,
              group_src: Optional[int] = None, *, name: Optional[str] = None) -> Any:
        """Start receiving into ``tensor``; ``wait()`` on the handle fills it."""
        return self._receive("irecv", tensor, src, group, tag, group_src, name)

    def batch_isend_irecv(self, p2p_op_list: List[Any]) -> List[Any]:
        """Start every ``torch.distributed.P2POp`` of the list (its ``op`` torch's ``isend`` or
        ``irecv``, or this object's) and return their handles in the list's order, as torch
        does. Each item's ``op`` is checked before any starts (a ValueError names the first
        that is no P2POp of isend or irecv), and the sends start before the receives: a ring
        of ranks that each receive from the left and send to the right meets, whatever order
        the list has."""
        kinds = []
        for index, item in enumerate(p2p_op_list):
            kind = getattr(getattr(item, "op", None), "__name__", None)
            if kind not in ("isend", "irecv") or not hasattr(item, "tensor"):
                raise ValueError(f"batch_isend_irecv: expected a P2POp whose op is isend or "
                                 f"irecv at index {index}, got {item!r}"[:300])
            kinds.append(kind)
        handles: List[Any] = [None] * len(kinds)
        for index in sorted(range(len(kinds)), key=lambda i: kinds[i] != "isend"):
            item = p2p_op_list[index]
            group_peer = getattr(item, "group_peer", None)
            peer = item.peer if group_peer is None else None
            call = self.isend if kinds[index] == "isend" else self.irecv
            handles[index] = call(item.tensor, peer, getattr(item, "group", None),
                                  getattr(item, "tag", 0), group_peer)
        return handles

    def _receive(self, op: str, tensor: Any, src: Optional[int], group: Any, tag: int,
                 group_src: Optional[int], name: Optional[str]) -> "_Receiving":
        peer = self._peer(op, src, group_src, group, receiving=True)
        raise_if(_tensor_error(tensor))
        return _Receiving(self, tensor, p2p.irecv(self._p, peer, tag, TensorMessage, name))


class _Sending:
    """The handle of an ``isend``: ``wait()`` raises what the send met (EncodeError where the
    tensor could not be sent)."""

    def __init__(self, request: Any) -> None:
        self._request = request

    def wait(self, timeout: Any = None) -> bool:
        self._request.wait()
        return True

    def is_completed(self) -> bool:
        return bool(self._request.test()[0])


class _Receiving:
    """The handle of an ``irecv``: ``wait()`` checks the sender's dtype and shape against the
    receiving tensor, then fills it."""

    def __init__(self, owner: TensorPointToPoint, tensor: Any, request: Any) -> None:
        self._owner, self._tensor, self._request = owner, tensor, request
        self._rank: Optional[int] = None

    def wait(self, timeout: Any = None) -> bool:
        self.wait_rank()
        return True

    def is_completed(self) -> bool:
        return self._rank is not None or bool(self._request.test()[0])

    def source_rank(self) -> int:
        return self.wait_rank()

    def wait_rank(self) -> int:
        """Fill the tensor (once); the sender's global rank."""
        if self._rank is None:
            message = self._request.wait()
            p = self._owner._p
            source, _, seq = p2p.matched(self._request)
            _fill(p, self._request, self._tensor, message, source, seq)
            self._rank = self._owner._global_rank(source)
        return self._rank


def _fill(p: Protocol, request: Any, tensor: Any, message: TensorMessage, source: int,
          seq: int) -> None:
    """Write ``message`` into ``tensor``, or raise DesyncError where they differ."""
    import torch

    from ..tensor.envelope import dtype_name
    mine = (dtype_name(tensor.dtype), tuple(tensor.shape))
    if (message.dtype, message.shape) != mine:
        kinds = [k for k, same in ((MismatchKind.DTYPE, message.dtype == mine[0]),
                                   (MismatchKind.SHAPE, message.shape == mine[1])) if not same]
        env = request.message.envelope
        raise DesyncError(
            f"{p2p.head(p, request)} diverged ({', '.join(k.value for k in kinds)}): rank "
            f"{source} sent a tensor of shape {message.shape} {message.dtype} at {env.site}; "
            f"rank {p.rank} expected shape {mine[1]} {mine[0]} at {request.caller.place} (the "
            f"receiving tensor's)",
            seq=seq, comm=p.name, kinds=kinds)
    if not tensor.numel():
        return
    flat = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    with torch.no_grad():  # as the backend's own receive writes: past autograd's checks
        tensor.copy_(flat.view(tensor.dtype).reshape(tensor.shape))


def _tensor_error(tensor: Any) -> Optional[str]:
    import torch
    if not isinstance(tensor, torch.Tensor):
        return f"TypeError: expected a torch.Tensor, got {type(tensor).__name__}"
    if tensor.layout != torch.strided:
        return f"ValueError: expected a dense tensor, got layout {tensor.layout}"
    return None


def _message(tensor: Any) -> Tuple[Optional[TensorMessage], Optional[str]]:
    """(the message of ``tensor``, None) or (None, why it cannot be sent)."""
    error = _tensor_error(tensor)
    if error is not None:
        return None, error
    import torch

    from ..tensor.envelope import dtype_name
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return TensorMessage(dtype_name(tensor.dtype), tuple(tensor.shape),
                         flat.numpy().tobytes()), None


register_internal(__file__)
