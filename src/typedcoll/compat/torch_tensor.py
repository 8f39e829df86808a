"""The torch drop-in's tensor collectives, each one checked tensor collective.

Engines' control-plane votes are often tensors (a per-step MAX all-reduce of a batch size on the
CPU group): here each is one checked tensor collective (``tensor.ops``), CPU tensors on the
private gloo side after the envelope exchange, CUDA tensors on the group's NCCL behind the
device envelope. A caller's output tensors are filled by one copy of the result.
``async_op=True`` returns the handle of a call that has already run on the host (``Done``: on
CUDA its ``wait()`` orders the waiting stream after the call).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from ..core.plumbing import register_internal
from .torch_group import GroupBinding


class TensorCalls(GroupBinding):
    """torch.distributed's tensor collectives over one group's TypedComm."""

    def all_reduce(self, tensor: Any, op: Any = None, group: Any = None,
                   async_op: bool = False,
                   *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``tensor`` reduced across the group, in place (``op``: ``ReduceOp.SUM`` when None,
        ``PRODUCT``, ``MAX``, ``MIN``, or their names; ``BAND``, ``BOR`` and ``BXOR`` of integer
        and bool CPU tensors too, as gloo reduces them)."""
        from ..tensor import ops as tensor_ops
        tensor_ops.all_reduce_tensor(self._p, tensor, _op_name(op), name, step,
                                     error=self._check_group("all_reduce", group))
        return done(async_op, tensor)

    def reduce(self, tensor: Any, dst: Optional[int] = None, op: Any = None, group: Any = None,
               async_op: bool = False, group_dst: Optional[int] = None,
               *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``tensor`` on ``dst`` reduced across the group, in place; the other ranks' tensors
        are left as they were."""
        from ..tensor import ops as tensor_ops
        root, error = self._group_rank("reduce", dst, group_dst, 0)
        error = self._check_group("reduce", group) or error
        tensor_ops.reduce_tensor(self._p, tensor, _op_name(op), root, name, step, error=error)
        return done(async_op, tensor)

    def broadcast(self, tensor: Any, src: Optional[int] = None, group: Any = None,
                  async_op: bool = False, group_src: Optional[int] = None,
                  *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``tensor`` overwritten in place with ``src``'s."""
        from ..tensor import ops as tensor_ops
        root, error = self._group_rank("broadcast", src, group_src, 0)
        error = self._check_group("broadcast", group) or error
        # An unknown root stays None: flagged by the collective too, so that no rank enqueues
        # a payload with a root its peers do not share (the device path).
        tensor_ops.broadcast_tensor(self._p, tensor, root, name, step, error=error)
        return done(async_op, tensor)

    def all_gather(self, tensor_list: List[Any], tensor: Any, group: Any = None,
                   async_op: bool = False,
                   *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``tensor_list[i]`` = rank i's ``tensor`` (one tensor per rank, each of its shape and
        dtype)."""
        from ..tensor import ops as tensor_ops
        p = self._p
        error = self._check_group("all_gather", group) or _output_tensors(
            "tensor_list", tensor_list, tensor, p.size)
        out = tensor_ops.all_gather_tensor(p, tensor, name, step, error=error)
        _split_into(tensor_list, out, tensor, p.size)
        return done(async_op, *tensor_list)

    def gather(self, tensor: Any, gather_list: Optional[List[Any]] = None,
               dst: Optional[int] = None, group: Any = None, async_op: bool = False,
               group_dst: Optional[int] = None,
               *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """On ``dst``, ``gather_list[i]`` = rank i's ``tensor`` (one tensor per rank, each of
        its shape and dtype); the other ranks pass no list."""
        from ..tensor import ops as tensor_ops
        p = self._p
        root, error = self._group_rank("gather", dst, group_dst, 0)
        error = self._check_group("gather", group) or error
        if error is None:
            error = _output_tensors("gather_list", gather_list, tensor, p.size) \
                if p.rank == root else _no_list("gather_list", gather_list, "destination")
        out = tensor_ops.gather_tensor(p, tensor, root, name, step, error=error)
        if out is None or gather_list is None:
            return done(async_op)
        _split_into(gather_list, out, tensor, p.size)
        return done(async_op, *gather_list)

    def scatter(self, tensor: Any, scatter_list: Optional[List[Any]] = None,
                src: Optional[int] = None, group: Any = None, async_op: bool = False,
                group_src: Optional[int] = None,
                *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``tensor`` overwritten in place with ``src``'s ``scatter_list[rank]`` (one tensor
        per rank, each of ``tensor``'s shape and dtype); the other ranks pass no list."""
        from ..tensor import ops as tensor_ops
        p = self._p
        root, error = self._group_rank("scatter", src, group_src, 0)
        error = self._check_group("scatter", group) or error
        parts = None
        if error is None:
            error = _output_tensors("scatter_list", scatter_list, tensor, p.size) \
                if p.rank == root else _no_list("scatter_list", scatter_list, "source")
        if error is None and p.rank == root and scatter_list is not None:
            import torch
            parts = torch.stack([t.detach() for t in scatter_list])
        tensor_ops.scatter_tensor(p, tensor, parts, root, name, step, error=error)
        return done(async_op, tensor)

    def all_gather_into_tensor(self, output_tensor: Any, input_tensor: Any, group: Any = None,
                               async_op: bool = False,
                               *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``output_tensor`` = every rank's ``input_tensor``, concatenated along dim 0 or stacked
        (its numel: size times the input's)."""
        from ..tensor import ops as tensor_ops
        p = self._p
        error = self._check_group("all_gather_into_tensor", group) or _output_tensor(
            "output_tensor", output_tensor, input_tensor, p.size, 1)
        out = tensor_ops.all_gather_tensor(p, input_tensor, name, step, error=error)
        output_tensor.copy_(out.reshape(output_tensor.shape))
        return done(async_op, output_tensor)

    def reduce_scatter_tensor(self, output: Any, input: Any, op: Any = None, group: Any = None,
                              async_op: bool = False,
                              *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``output`` = block ``rank`` of ``input`` reduced across the group (``input``: the
        blocks concatenated along dim 0 or stacked)."""
        from ..tensor import ops as tensor_ops
        p = self._p
        error = self._check_group("reduce_scatter_tensor", group) or _output_tensor(
            "output", output, input, 1, p.size)
        out = tensor_ops.reduce_scatter_tensor(p, input, _op_name(op), name, step, error=error)
        output.copy_(out.reshape(output.shape))
        return done(async_op, output)

    def reduce_scatter(self, output: Any, input_list: List[Any], op: Any = None,
                       group: Any = None, async_op: bool = False,
                       *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``output`` = every rank's ``input_list[rank]`` reduced across the group (one tensor
        per rank, each of ``output``'s shape and dtype)."""
        from ..tensor import ops as tensor_ops
        p = self._p
        error = self._check_group("reduce_scatter", group) or _output_tensors(
            "input_list", input_list, output, p.size)
        stacked, error = _stacked(input_list, output, p.size, error)
        out = tensor_ops.reduce_scatter_tensor(p, stacked, _op_name(op), name, step,
                                               error=error)
        output.copy_(out.reshape(output.shape))
        return done(async_op, output)

    def all_to_all_single(self, output: Any, input: Any,
                          output_split_sizes: Optional[List[int]] = None,
                          input_split_sizes: Optional[List[int]] = None, group: Any = None,
                          async_op: bool = False,
                          *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """Rows of ``input`` (dim 0) to each rank, ``input_split_sizes[j]`` to rank j, and into
        ``output`` rank j's rows for this rank, ``output_split_sizes[j]`` of them, in rank
        order; split sizes None or [] cut dim 0 into ``size`` equal blocks, as torch's do.
        Two checked calls whatever the split sizes (``tensor.ops.all_to_all_rows``): the
        counts, checked against each other's on every rank, then the rows; so ranks may differ
        in passing split sizes, as torch lets them."""
        from ..tensor import ops as tensor_ops
        tensor_ops.all_to_all_rows(self._p, output, input, output_split_sizes,
                                   input_split_sizes, name, step,
                                   error=self._check_group("all_to_all_single", group))
        return done(async_op, output)

    def all_to_all(self, output_tensor_list: List[Any], input_tensor_list: List[Any],
                   group: Any = None, async_op: bool = False,
                   *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``input_tensor_list[j]`` to rank j, and into ``output_tensor_list[j]`` rank j's
        tensor for this rank (one tensor per rank each way, of one dtype; sizes may differ by
        rank, as their elements move in order)."""
        import torch

        from ..tensor import ops as tensor_ops
        p = self._p
        error = self._check_group("all_to_all", group) or \
            _tensor_lists(output_tensor_list, input_tensor_list, p.size)
        flat = out = torch.zeros(1)
        sends = receives = [1] * p.size
        if error is None:
            try:
                flat = torch.cat([t.detach().reshape(-1) for t in input_tensor_list])
                out = flat.new_empty(sum(t.numel() for t in output_tensor_list))
                sends = [t.numel() for t in input_tensor_list]
                receives = [t.numel() for t in output_tensor_list]
            except Exception as exc:  # flagged in the call: its peers are waiting in it
                error = f"ValueError: could not read input_tensor_list: {exc}"[:300]
        tensor_ops.all_to_all_rows(p, out, flat, receives, sends, name, step, error=error)
        offset = 0
        for t in output_tensor_list:
            t.copy_(out[offset:offset + t.numel()].reshape(t.shape))
            offset += t.numel()
        return done(async_op, *output_tensor_list)

    # torch's newer names for the two.
    all_gather_single = all_gather_into_tensor
    reduce_scatter_single = reduce_scatter_tensor


class Done:
    """The work handle of an ``async_op`` call, which has already run on the host. A CUDA call
    is ordered on the stream it was issued on: ``wait()`` makes the stream current at the wait
    wait for it (an event recorded there), as torch's ``Work.wait()`` does."""

    __slots__ = ("_event", "_result")

    def __init__(self, event: Any = None, result: Optional[List[Any]] = None) -> None:
        self._event = event
        self._result = result if result is not None else []

    def wait(self, timeout: Any = None) -> bool:
        if self._event is not None:
            import torch
            torch.cuda.current_stream().wait_event(self._event)
        return True

    def is_completed(self) -> bool:
        return self._event is None or bool(self._event.query())

    def is_success(self) -> bool:
        return True

    def exception(self) -> None:
        return None

    def result(self) -> List[Any]:
        return self._result

    def get_future(self) -> Any:
        import torch
        future: Any = torch.futures.Future()
        future.set_result(self._result)
        return future


def done(async_op: bool, *tensors: Any) -> Optional[Done]:
    """None, or with ``async_op`` the handle of a call that wrote ``tensors``."""
    if not async_op:
        return None
    event = None
    if any(t.is_cuda for t in tensors):
        import torch
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()  # on the current stream, where the call and its copies were issued
    return Done(event, list(tensors))


def _op_name(op: Any) -> Any:
    """torch's ``ReduceOp`` as the name the tensor collectives take (anything else as it is:
    their argument check names it)."""
    if op is None:
        return "sum"
    if isinstance(op, str):
        return op
    from ..transports.torch_tensors import TORCH_OPS
    for name, torch_op in TORCH_OPS.items():
        try:
            if op == torch_op:
                return name
        except Exception:  # an array, say: the collective's check names it, on every rank
            return op
    return op


def _split_into(outputs: List[Any], out: Any, tensor: Any, size: int) -> None:
    """``outputs[i]`` = block ``i`` of ``out``, every rank's ``tensor`` gathered along dim 0."""
    parts = out.reshape((size,) + tuple(tensor.shape))
    for i in range(size):
        outputs[i].copy_(parts[i])


def _stacked(tensors: List[Any], like: Any, size: int, error: Optional[str]
             ) -> Tuple[Any, Optional[str]]:
    """``tensors`` along a new dim 0 (one per rank), or a stand-in and why not (``error``, or
    what stacking them raised: flagged in the call, where the peers are waiting)."""
    import torch
    if error is None:
        try:
            return torch.stack([t.detach() for t in tensors]), None
        except Exception as exc:
            error = f"ValueError: could not stack input_list: {exc}"[:300]
    return (like.new_zeros((size,) + tuple(like.shape)) if isinstance(like, torch.Tensor)
            else torch.zeros(size)), error


def _tensor_lists(outputs: Any, inputs: Any, size: int) -> Optional[str]:
    """Why ``outputs`` and ``inputs`` cannot be an all-to-all's lists, or None."""
    import torch
    for what, value in (("output_tensor_list", outputs), ("input_tensor_list", inputs)):
        if not isinstance(value, (list, tuple)) or len(value) != size or \
                not all(isinstance(t, torch.Tensor) for t in value):
            got = (f"{len(value)} items" if isinstance(value, (list, tuple))
                   else type(value).__name__)
            return f"ValueError: expected {what} to be {size} tensors, one per rank, got {got}"
    if any(t.layout != torch.strided for t in list(outputs) + list(inputs)):
        return "ValueError: expected dense tensors in both lists, got a sparse one"
    dtypes = {t.dtype for t in list(outputs) + list(inputs)}
    devices = {t.device for t in list(outputs) + list(inputs)}
    if len(dtypes) > 1 or len(devices) > 1:
        return (f"ValueError: expected the tensors of both lists to share one dtype and "
                f"device, got {sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
    return None


def _no_list(what: str, value: Any, role: str) -> Optional[str]:
    """torch's rule: only the root passes the list."""
    if value is None or (isinstance(value, list) and not value):
        return None
    return f"ValueError: expected no {what} on a rank other than the {role}, got one"


def _output_tensors(what: str, outputs: Any, tensor: Any, size: int) -> Optional[str]:
    """Why ``outputs`` cannot hold one ``tensor`` per rank, or None."""
    import torch
    if not isinstance(outputs, list) or len(outputs) != size:
        got = f"a list of {len(outputs)}" if isinstance(outputs, list) else \
            type(outputs).__name__
        return f"ValueError: expected {what} to be a list of {size} tensors, got {got}"
    if not isinstance(tensor, torch.Tensor):
        return None  # the collective's own check names it
    for i, out in enumerate(outputs):
        if not isinstance(out, torch.Tensor) or out.shape != tensor.shape or \
                out.dtype != tensor.dtype:
            got = (f"shape {tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            return (f"ValueError: expected {what}[{i}] to be a tensor of shape "
                    f"{tuple(tensor.shape)} {tensor.dtype}, got {got}")
    return None


def _output_tensor(what: str, out: Any, tensor: Any, times: int, per: int) -> Optional[str]:
    """Why ``out`` cannot hold ``tensor``'s numel x ``times`` / ``per`` items, or None."""
    import torch
    if not isinstance(tensor, torch.Tensor):
        return None  # the collective's own check names it
    numel = tensor.numel() * times // per
    if not isinstance(out, torch.Tensor) or out.numel() != numel or out.dtype != tensor.dtype:
        got = (f"{out.numel()} elements of {out.dtype}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        return (f"ValueError: expected {what} to be a tensor of {numel} elements of "
                f"{tensor.dtype}, got {got}")
    return None


register_internal(__file__)
