"""The torch transport's tensor operations: the tensor layer's host path, CPU tensors moved on
the private gloo group as the bytes they hold (complex tensors reduced as their real pairs).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (AllgatherOptions, AllreduceOptions, AllToAllOptions,
                                        BroadcastOptions, ReduceScatterOptions)

from ..core.plumbing import register_internal
from .gloo import options
from .torch_failures import FailureReports

TORCH_OPS = {"sum": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT, "max": dist.ReduceOp.MAX,
             "min": dist.ReduceOp.MIN, "band": dist.ReduceOp.BAND, "bor": dist.ReduceOp.BOR,
             "bxor": dist.ReduceOp.BXOR}


class TensorOps(FailureReports):
    """Collectives over CPU tensors on ``control`` (the private gloo group), waited for as the
    byte operations are; the torch transport's base."""

    control: Any

    def all_gather_tensor(self, out: torch.Tensor, src: torch.Tensor,
                          deadline: Optional[float]) -> None:
        self._wait(self.control._allgather_base(_bytes_of(out), _bytes_of(src),
                                               options(AllgatherOptions, deadline)),
                  deadline)

    def all_reduce_tensor(self, tensor: torch.Tensor, op: str,
                          deadline: Optional[float]) -> None:
        opts = options(AllreduceOptions, deadline)
        opts.reduceOp = TORCH_OPS[op]
        target = torch.view_as_real(tensor) if tensor.is_complex() else tensor
        self._wait(self.control.allreduce([target], opts), deadline)

    def broadcast_tensor(self, tensor: torch.Tensor, root: int,
                         deadline: Optional[float]) -> None:
        opts = options(BroadcastOptions, deadline)
        opts.rootRank = root
        self._wait(self.control.broadcast([_bytes_of(tensor)], opts), deadline)

    def reduce_scatter_tensor(self, out: torch.Tensor, src: torch.Tensor, op: str,
                              deadline: Optional[float]) -> None:
        opts = options(ReduceScatterOptions, deadline)
        opts.reduceOp = TORCH_OPS[op]
        if src.is_complex():
            out, src = torch.view_as_real(out), torch.view_as_real(src)
        self._wait(self.control._reduce_scatter_base(out, src, opts), deadline)

    def all_to_all_tensor(self, out: torch.Tensor, src: torch.Tensor,
                          deadline: Optional[float], receives: Optional[List[int]] = None,
                          sends: Optional[List[int]] = None) -> None:
        """Block j of ``src`` to rank j, rank j's block for this rank into block j of ``out``:
        equal blocks along dim 0, or ``sends``/``receives`` rows to and from each rank."""
        row = math.prod(src.shape[1:]) * src.element_size()
        counts = ([], []) if sends is None or receives is None else \
            ([n * row for n in receives], [n * row for n in sends])
        self._wait(self.control.alltoall_base(_bytes_of(out), _bytes_of(src), counts[0],
                                              counts[1], options(AllToAllOptions, deadline)),
                   deadline)


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as flat uint8: moving bytes works for every dtype."""
    return tensor.reshape(-1).view(torch.uint8)


register_internal(__file__)
