"""TypedComm's checked tensor collectives (torch backend), a base of ``_comm.TypedComm``.

Each method is one call into ``tensor.ops``, imported when first called: importing typedcoll
must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

from .core.plumbing import register_internal

if TYPE_CHECKING:
    from .core.protocol import Protocol


class TensorCollectives:
    """The tensor collectives of :class:`typedcoll.TypedComm` (torch backend)."""

    __slots__ = ()
    _p: Protocol

    def all_gather_tensor(self, tensor: Any, *, name: Optional[str] = None,
                          step: Optional[int] = None) -> Any:
        """Checked all-gather of ``tensor`` along dim 0 (torch backend)."""
        from .tensor import ops as tensor_ops
        return tensor_ops.all_gather_tensor(self._p, tensor, name, step)

    def all_reduce_tensor(self, tensor: Any, op: str = "sum", *, name: Optional[str] = None,
                          step: Optional[int] = None) -> Any:
        """Checked all-reduce of ``tensor`` (torch backend)."""
        from .tensor import ops as tensor_ops
        return tensor_ops.all_reduce_tensor(self._p, tensor, op, name, step)

    def broadcast_tensor(self, tensor: Any, root: int = 0, *, name: Optional[str] = None,
                         step: Optional[int] = None) -> Any:
        """Checked broadcast of ``root``'s ``tensor`` (torch backend)."""
        from .tensor import ops as tensor_ops
        return tensor_ops.broadcast_tensor(self._p, tensor, root, name, step)

    def reduce_scatter_tensor(self, tensor: Any, op: str = "sum", *,
                              name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """Checked reduce-scatter of ``tensor`` along dim 0 (torch backend)."""
        from .tensor import ops as tensor_ops
        return tensor_ops.reduce_scatter_tensor(self._p, tensor, op, name, step)

    def all_to_all_tensor(self, tensor: Any, *, send_counts: Optional[Sequence[int]] = None,
                          receive_counts: Optional[Sequence[int]] = None,
                          name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """Checked all-to-all of ``tensor`` (torch backend). Without counts, block j of dim 0
        (``size`` equal blocks) goes to rank j, and the new tensor returned holds rank j's block
        for this rank as its block j. With ``send_counts`` and ``receive_counts`` (rows of dim 0
        to and from each rank; one of them alone: equal blocks the other way), it holds
        ``sum(receive_counts)`` rows, rank j's in rank order; every rank's counts are checked
        against its peers' first (one more checked call, which a CUDA tensor always takes)."""
        from .tensor import ops as tensor_ops
        return tensor_ops.all_to_all_any(self._p, tensor, send_counts, receive_counts, name,
                                         step)

    def reduce_tensor(self, tensor: Any, op: str = "sum", root: int = 0, *,
                      name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """Checked reduce of ``tensor`` into ``root``'s, in place (torch backend)."""
        from .tensor import ops as tensor_ops
        return tensor_ops.reduce_tensor(self._p, tensor, op, root, name, step)

    def gather_tensor(self, tensor: Any, root: int = 0, *, name: Optional[str] = None,
                      step: Optional[int] = None) -> Any:
        """Checked gather along dim 0 on ``root``, None elsewhere (torch backend)."""
        from .tensor import ops as tensor_ops
        return tensor_ops.gather_tensor(self._p, tensor, root, name, step)

    def scatter_tensor(self, tensor: Any, parts: Any = None, root: int = 0, *,
                       name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """Checked scatter: ``tensor`` gets block ``rank`` of ``root``'s ``parts`` (shape
        ``(size,) + tensor.shape``), in place (torch backend)."""
        from .tensor import ops as tensor_ops
        return tensor_ops.scatter_tensor(self._p, tensor, parts, root, name, step)

    def synchronize(self) -> None:
        """Verify every deferred tensor check now (torch/NCCL backend); no-op elsewhere."""
        from .tensor import ops as tensor_ops
        tensor_ops.synchronize(self._p)


register_internal(__file__)
